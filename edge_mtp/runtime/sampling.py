"""Token choice: greedy, or temperature / top-k / top-p sampling with exact speculative acceptance, and the loop's
two acceptance strategies built on them (Greedy, Sampled)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax, ties to the smallest id)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Distribution over the vocabulary after temperature, top-k and top-p (nucleus) filtering."""
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, cfg.top_p) + 1)]
        filtered = np.zeros_like(p)
        filtered[keep] = p[keep]
        p = filtered / filtered.sum()
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from distribution p."""
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), p.size - 1))


def accept_draft(token: int, p: np.ndarray, q: np.ndarray, rng: np.random.Generator) -> int | None:
    """Leviathan et al.: keep `token` (drawn from q) with probability min(1, p/q); else return a draw from the
    residual normalise(max(0, p - q)) as the replacement, i.e. None means accepted."""
    if q[token] > 0 and rng.random() < min(1.0, p[token] / q[token]):
        return None
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    return sample(residual / total if total > 0 else p, rng)


def accept_sampled(drafts: list[int], qs: list[np.ndarray], rows: np.ndarray, cfg: SamplingConfig,
                   rng: np.random.Generator) -> tuple[int, int]:
    """Exact speculative sampling over one verify: (number of drafts accepted, the token that follows them)."""
    for i, (d, q) in enumerate(zip(drafts, qs)):
        replacement = accept_draft(d, probabilities(rows[i], cfg), q, rng)
        if replacement is not None:
            return i, replacement
    return len(drafts), sample(probabilities(rows[len(drafts)], cfg), rng)


class Greedy:
    """Acceptance as LiteRT-LM does it: argmax everywhere; keep the drafts the target agrees with, then its token."""

    def choose(self, logits: np.ndarray) -> int:
        """The target's next token from one row of logits."""
        return int(np.argmax(logits))

    propose = choose  # the drafter's next draft, from one row of its logits

    def accept(self, drafts: list[int], rows: np.ndarray, argmax: list[int]) -> tuple[int, int]:
        """(drafts accepted, the token after them) from the verify's logit rows and their argmax."""
        k = next((i for i, d in enumerate(drafts) if d != argmax[i]), len(drafts))
        return k, argmax[k]


class Sampled:
    """Acceptance by exact speculative sampling: the output follows the target's distribution under `cfg`, whatever
    the drafter proposes; it remembers each round's draft distributions between propose and accept."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg, self.rng = cfg, np.random.default_rng(cfg.seed)
        self.qs: list[np.ndarray] = []

    def choose(self, logits: np.ndarray) -> int:
        """A draw from the target's distribution of one row of logits."""
        return sample(probabilities(logits, self.cfg), self.rng)

    def propose(self, logits: np.ndarray) -> int:
        """A draw from the drafter's distribution, which accept() will need."""
        q = probabilities(logits, self.cfg)
        self.qs.append(q)
        return sample(q, self.rng)

    def accept(self, drafts: list[int], rows: np.ndarray, argmax: list[int]) -> tuple[int, int]:
        """(drafts accepted, the token after them), drawn against the distributions the drafts came from."""
        qs, self.qs = self.qs, []
        return accept_sampled(drafts, qs, rows, self.cfg, self.rng)

