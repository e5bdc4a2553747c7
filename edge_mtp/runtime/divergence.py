"""Where greedy MTP output leaves greedy plain output on one backend, and how close the plain run's choice was there.

Greedy MTP emits exactly the plain tokens when every verify row gives the bits of a decode at its position. Where a
bundle's graphs or a runtime's kernels do not (a row computed in a batch rounds differently), a near-tie can flip:
each such divergence is reported with the top-2 logit gap of the plain run at that token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..model.contract import DECODE, LOGITS
from .backends.base import Backend
from .speculative import generate_tokens


@dataclass(frozen=True)
class Divergence:
    """One token where MTP and plain greedy decoding chose differently (`token` counts generated tokens from 0)."""

    token: int
    plain: int
    mtp: int
    top2_gap: float  # the plain run's best minus second-best logit at that token

    def to_dict(self) -> dict:
        """For --json and reports."""
        return {"token": self.token, "plain": self.plain, "mtp": self.mtp, "top2_gap": self.top2_gap}


class _DecodeLogits(Backend):
    """A backend passed through, keeping the logits row of every decode."""

    def __init__(self, backend: Backend):
        self.inner, self.contract, self.name = backend, backend.contract, backend.name
        self.rows: list[np.ndarray] = []

    def embed(self, token: int):
        return self.inner.embed(token)

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        out = self.inner.run_target(signature, embeddings, per_layer_embeddings, input_pos, mask)
        if signature == DECODE:
            self.rows.append(np.array(out[LOGITS][0, 0]))
        return out

    def run_drafter(self, activations, input_pos, mask):
        return self.inner.run_drafter(activations, input_pos, mask)

    def reset(self) -> None:
        self.rows = []
        self.inner.reset()


def top2_gap(logits: np.ndarray) -> float:
    """Best minus second-best logit of one row (small: a near-tie)."""
    second, best = np.partition(np.asarray(logits, np.float64), -2)[-2:]
    return float(best - second)


def plain_with_gaps(backend: Backend, prompt: Sequence[int], max_tokens: int,
                    stop_tokens: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Greedy plain tokens and the top-2 logit gap each was chosen with."""
    recorder = _DecodeLogits(backend)
    tokens, _ = generate_tokens(recorder, prompt, max_tokens=max_tokens, mtp=False, stop_tokens=stop_tokens)
    return tokens, [top2_gap(row) for row in recorder.rows[-len(tokens):]]  # one decode per token, the last ones


def divergences(backend: Backend, prompt: Sequence[int], max_tokens: int, draft_len: int | None = None,
                stop_tokens: Sequence[int] = ()) -> list[Divergence]:
    """Every token where greedy MTP differs from greedy plain decoding over `max_tokens` tokens (none: identical).

    After a divergence both runs start again from the prompt plus the plain tokens up to and including it (the text
    the two agree on, then the plain choice), so each later divergence is one of its own, not a consequence.
    """
    found: list[Divergence] = []
    context, done = list(prompt), 0
    while done < max_tokens:
        plain, gaps = plain_with_gaps(backend, context, max_tokens - done, stop_tokens)
        mtp, _ = generate_tokens(backend, context, max_tokens=max_tokens - done, draft_len=draft_len, mtp=True,
                                 stop_tokens=stop_tokens)
        k = next((i for i, (a, b) in enumerate(zip(plain, mtp)) if a != b), None)
        if k is None:
            break
        found.append(Divergence(done + k, plain[k], mtp[k], gaps[k]))
        context += plain[:k + 1]
        done += k + 1
    return found
