"""A backend that replays recorded model answers (first decode, then per round drafts and target argmaxes).

Used to produce the shared test vectors that android_demo's Kotlin loop must reproduce decision for decision, and
to drive the loop with chosen answers (e.g. a slow drafter) without any model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ...checkpoint.spec import preset_pair
from ...model.contract import Contract
from .base import Backend


@dataclass
class ReplayRound:
    """What the models answer in one round: the drafter's drafts (none for a plain decode) and the target's argmaxes."""

    position: int
    drafts: list[int]
    target_argmax: list[int]


class ReplayBackend(Backend):
    """Serves one-hot logits from a script; checks that the loop asks at the recorded positions."""

    name = "replay"

    def __init__(self, first_token: int, rounds: list[ReplayRound], context: int, draft_len: int, vocab: int = 256):
        target, drafter = preset_pair("tiny")
        self.contract = Contract(target, drafter if draft_len else None, context, max(draft_len, 1), (1,))
        self.vocab = vocab
        self.first_token = first_token
        self.script = deque(rounds)
        self.pending: deque[int] | None = None
        self.started = False

    def _one_hot(self, tokens: list[int]) -> np.ndarray:
        out = np.zeros((1, len(tokens), self.vocab), np.float32)
        out[0, np.arange(len(tokens)), tokens] = 1.0
        return out

    def reset(self) -> None:
        self.started = False

    def embed(self, token: int):
        return np.zeros((1, 1, 1), np.float32), None

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        rows = embeddings.shape[1]
        if signature.startswith("prefill"):
            return {}
        if not self.started:  # the first decode, on the last prompt token
            self.started, answer = True, [self.first_token]
        else:
            current = self.script.popleft()
            assert int(input_pos[0]) == current.position, (int(input_pos[0]), current.position)
            answer = current.target_argmax
        self.pending = None
        answer = answer + [0] * (rows - len(answer))
        return {"logits": self._one_hot(answer), "activations": np.zeros((1, rows, 1), np.float32)}

    def run_drafter(self, activations, input_pos, mask):
        if self.pending is None:  # drafting for the round about to be verified
            self.pending = deque(self.script[0].drafts)
        token = self.pending.popleft()
        return {"logits": self._one_hot([token]), "projected_activations": np.zeros((1, 1, 1), np.float32)}
