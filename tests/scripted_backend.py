"""A deterministic numpy Backend for testing the loop's bookkeeping (positions, masks, acceptance, stops).

The 'target' predicts next = rule(token, position); the 'drafter' follows the same rule except on chosen draft
steps, where it is deliberately wrong. Every cache write is recorded so tests can check positions.
"""

from __future__ import annotations

import numpy as np

from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.model.contract import Contract
from edge_mtp.runtime.backends.base import Backend

V = 64


def rule(token: int, position: int) -> int:
    """The target's greedy next token after `token` at `position`."""
    return (token * 7 + position * 3 + 1) % V


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, context: int = 64, draft_len: int = 3, prefill=(4, 8), wrong_step=lambda pos, step: False):
        target, drafter = preset_pair("tiny")
        self.contract = Contract(target, drafter, context, draft_len, tuple(prefill))
        self.wrong_step = wrong_step
        self.calls: list[tuple[str, list[int]]] = []
        self.reset()

    def reset(self) -> None:
        self.cache = np.full(self.contract.context, -1)

    def embed(self, token: int):
        emb = np.zeros((1, 1, 2), np.float32)
        emb[0, 0, 0] = token
        return emb, None

    def _logits(self, token: int) -> np.ndarray:
        row = np.zeros(V, np.float32)
        row[token] = 1.0
        return row

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        tokens = [int(t) for t in embeddings[0, :, 0]]
        for tok, pos in zip(tokens, input_pos):
            assert 0 <= pos < self.contract.context, f"write at position {pos} outside the context"
            self.cache[pos] = tok
        self.calls.append((signature, [int(p) for p in input_pos]))
        logits = np.stack([self._logits(rule(t, int(p))) for t, p in zip(tokens, input_pos)])[None]
        acts = np.zeros((1, len(tokens), 2), np.float32)
        acts[0, :, 0] = input_pos + 1  # the position the carried row predicts
        return {"logits": logits, "activations": acts}

    def run_drafter(self, activations, input_pos, mask):
        token = int(activations[0, 0, 0])
        committed = int(input_pos[0]) + 1  # N: position of `token` for the first step
        step = int(activations[0, 0, 3])
        # the drafter's own carry counts draft steps within a round
        position = committed + step
        guess = rule(token, position)
        if self.wrong_step(committed, step):
            guess = (guess + 1) % V
        assert (mask[0, 0, 0, : committed] == 0).all() and (mask[0, 0, 0, committed:] != 0).all()
        carry = np.array([[[0, step + 1]]], np.float32)
        return {"logits": self._logits(guess)[None, None], "projected_activations": carry}


def plain_reference(prompt: list[int], count: int) -> list[int]:
    """What plain greedy decoding of the rule produces."""
    out, token, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(count):
        token = rule(token, pos)
        out.append(token)
        pos += 1
    return out
