"""Token choice: greedy, or temperature / top-k / top-p sampling with exact speculative acceptance."""

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
