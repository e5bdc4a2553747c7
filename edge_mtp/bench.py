"""`edge-mtp bench`: what MTP costs and earns on this backend, and which draft length (if any) to use.

All costs are measured as the loop pays them (embedding lookups, masks and argmax included), so the speed-up
model below predicts the loop's own end-to-end numbers:

    speed-up(γ) = E(γ) · decode / (γ · draft + verify(γ)),   E(γ) = 1 + Σ_{i≤γ} P(draft i accepted)

P(draft i accepted) is measured per position up to the exported draft length G and extrapolated beyond it with
the fitted per-token acceptance a (P_i ≈ a^i); verify(γ) is measured for γ ≤ G (the verify signature pads to G+1)
and extrapolated linearly in the token count beyond G, where using γ would need a re-export.

`simulate` measures MTP at a chosen acceptance A when no trained drafter is at hand: a plain greedy pass records the
target's own continuation, then the MTP pass runs every graph (the drafter included) but replaces each draft by the
true next token with probability A, else by a token the verify must reject (SimulatedDrafter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .model.contract import LOGITS
from .runtime.backends.base import Backend
from .runtime.speculative import Stats, generate_tokens
from .util.errors import EdgeMtpError

MAX_GAMMA = 8


@dataclass
class Run:
    """Aggregate of one configuration over the prompt set."""

    draft_len: int  # 0 = plain decoding
    tokens_per_second: float
    ms_per_decode: float
    ms_per_verify: float
    ms_per_draft_step: float
    per_position_acceptance: list[float]
    mean_accepted_length: float


@dataclass
class Simulated:
    """MTP at a simulated acceptance: real graphs, loop and verify; drafts replaced as SimulatedDrafter says."""

    acceptance: float  # the probability each draft is the true next token
    draft_len: int
    plain_tokens_per_second: float
    mtp_tokens_per_second: float
    speedup: float
    predicted_speedup: float  # the cost model at the per-position acceptance this run realised
    ms_per_decode: float
    ms_per_verify: float
    ms_per_draft_step: float
    measured_acceptance: float  # per-token acceptance as the verify decided it: accepted / judged_drafts
    judged_drafts: int  # drafts the verify decided on: the accepted ones and the first rejected one of each round
    rounds: int
    mean_accepted_length: float
    diverged_prompts: int  # prompts whose MTP output still left the recorded continuation after RESYNCS


@dataclass
class BenchResult:
    """Measured costs, acceptance, the fitted model's predictions, and the recommendation."""

    backend: str
    exported_draft_len: int
    baseline: Run
    mtp: list[Run]
    acceptance_fit: float
    verify_cost: dict[int, float]  # γ -> verify ms / decode ms (measured for γ ≤ G, extrapolated beyond)
    draft_cost: float  # draft step ms / decode ms
    predicted_speedup: dict[int, float]
    measured_speedup: dict[int, float]
    best_draft_len: int | None
    recommendation: str
    notes: list[str] = field(default_factory=list)
    simulated: Simulated | None = None

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def _measure(backend: Backend, prompts: Sequence[Sequence[int]], max_tokens: int, draft_len: int) -> Run:
    return _summarize([generate_tokens(backend, list(p), max_tokens=max_tokens, mtp=draft_len > 0,
                                       draft_len=draft_len or None)[1] for p in prompts], draft_len)


def _summarize(stats: Sequence[Stats], draft_len: int) -> Run:
    """One Run from the statistics of several generations (costs as the loop paid them)."""
    decode_time = sum(s.total_ms - s.time_to_first_token_ms for s in stats)
    tokens = sum(s.generated - 1 for s in stats)
    rounds = [k for s in stats for k in s.accepted_per_round]
    per_position = [float(np.mean([k > i for k in rounds])) if rounds else 0.0 for i in range(draft_len)]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return Run(draft_len, tokens / decode_time * 1000 if decode_time else 0.0,
               mean([m for s in stats for m in s.decode_ms[1:]] or [m for s in stats for m in s.decode_ms]),
               mean([m for s in stats for m in s.verify_ms]), mean([m for s in stats for m in s.draft_ms]),
               per_position, (sum(rounds) + len(rounds)) / len(rounds) if rounds else 0.0)


def fit_acceptance(per_position: Sequence[float]) -> float:
    """Per-token acceptance a such that P(draft i accepted) ≈ a^i (least squares in log space, positives only)."""
    points = [(i + 1, p) for i, p in enumerate(per_position) if p > 0]
    if not points:
        return 0.0
    x = np.array([i for i, _ in points], dtype=float)
    y = np.log([p for _, p in points])
    return float(min(1.0, np.exp((x @ y) / (x @ x))))


def expected_tokens(per_position: Sequence[float], a: float, gamma: int) -> float:
    """Tokens emitted per verify with γ drafts: 1 (the bonus) + Σ P(draft i accepted)."""
    return 1.0 + sum(per_position[i - 1] if i <= len(per_position) else a ** i for i in range(1, gamma + 1))


def predict(per_position: Sequence[float], a: float, verify_cost: dict[int, float], draft_cost: float) -> dict[int, float]:
    """speed-up(γ) over plain decoding for every γ in verify_cost (costs relative to one decode step)."""
    return {g: expected_tokens(per_position, a, g) / (g * draft_cost + cost) for g, cost in verify_cost.items()}


def bench(backend: Backend, prompts: Sequence[Sequence[int]], max_tokens: int = 48,
          simulate_acceptance: float | None = None) -> BenchResult:
    """Measure plain decoding and MTP at every available draft length, fit the model, recommend; optionally also
    MTP at a simulated acceptance (see `simulate`)."""
    g_max = backend.contract.draft_len if backend.has_drafter else 0
    if simulate_acceptance is not None and not g_max:
        raise EdgeMtpError("A simulated acceptance needs a bundle with a drafter (its cost is part of the measure).")
    _measure(backend, prompts[:1], min(max_tokens, 8), g_max)  # warm-up: first calls pay for lazy initialisation
    baseline = _measure(backend, prompts, max_tokens, 0)
    decode = baseline.ms_per_decode
    notes: list[str] = []
    if not g_max:
        return BenchResult(backend.name, 0, baseline, [], 0.0, {}, 0.0, {}, {}, None,
                           "This bundle has no drafter: export it with an assistant to use MTP.", notes)
    runs = [_measure(backend, prompts, max_tokens, g) for g in range(1, g_max + 1)]
    full = runs[-1]
    a = fit_acceptance(full.per_position_acceptance)
    verify_at_g = float(np.mean([r.ms_per_verify for r in runs])) / decode  # every γ ≤ G pays the padded verify
    slope = (verify_at_g - 1.0) / g_max  # per extra token, between decode (T=1) and verify (T=G+1)
    verify_cost = {g: verify_at_g if g <= g_max else verify_at_g + slope * (g - g_max) for g in range(1, MAX_GAMMA + 1)}
    draft_cost = float(np.mean([r.ms_per_draft_step for r in runs])) / decode
    predicted = predict(full.per_position_acceptance, a, verify_cost, draft_cost)
    measured = {r.draft_len: r.tokens_per_second / baseline.tokens_per_second for r in runs}
    best = max(range(1, g_max + 1), key=lambda g: measured[g])
    if measured[best] < 1.0:
        text = (f"MTP is slower on this backend ({measured[best]:.2f}x at best): disable it "
                "(run with --no-mtp / leave speculative decoding off).")
        best_len: int | None = None
    else:
        text = f"use draft length {best}: {measured[best]:.2f}x faster than plain decoding"
        best_len = best
        beyond = max(range(g_max + 1, MAX_GAMMA + 1), key=lambda g: predicted[g])
        if predicted[beyond] > 1.05 * predicted[best]:
            text += (f" (the model predicts {predicted[beyond]:.2f}x at draft length {beyond}: "
                     f"re-export with --draft-len {beyond} to try it)")
    notes.append(f"verify cost beyond G={g_max} is extrapolated linearly in the token count")
    simulated = None if simulate_acceptance is None else simulate(backend, prompts, [simulate_acceptance], max_tokens)[0]
    return BenchResult(backend.name, g_max, baseline, runs, a, verify_cost, draft_cost, predicted, measured, best_len,
                       text, notes, simulated)


class SimulatedDrafter(Backend):
    """Runs every graph of `inner` for its real cost, but makes each draft the true next token (read from `truth`,
    the whole sequence by position) with probability `acceptance`, else a token the verify must reject."""

    def __init__(self, inner: Backend, acceptance: float):
        if not 0.0 <= acceptance <= 1.0:
            raise EdgeMtpError(f"A simulated acceptance is a probability in [0, 1], not {acceptance}.")
        self.inner, self.contract, self.name, self.acceptance = inner, inner.contract, inner.name, acceptance
        self.start([], 0)

    def start(self, truth: Sequence[int], seed: int | Sequence[int]) -> None:
        """Before a generation: the true sequence (prompt + continuation) and the seed of the draws."""
        self.truth, self.rng, self._step = list(truth), np.random.default_rng(seed), 0

    def reset(self) -> None:
        self.inner.reset()

    def embed(self, token: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.inner.embed(token)

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        self._step = 0  # draft steps since the last target call, i.e. within this round
        return self.inner.run_target(signature, embeddings, per_layer_embeddings, input_pos, mask)

    def run_drafter(self, activations, input_pos, mask):
        out = self.inner.run_drafter(activations, input_pos, mask)
        position = int(input_pos[0]) + 2 + self._step  # input_pos = N-1; draft i (from 0) is the token at N+1+i
        self._step += 1
        if position >= len(self.truth):
            raise EdgeMtpError(f"No recorded continuation at position {position}: record a longer plain pass.")
        true, logits = self.truth[position], out[LOGITS]  # the inner backend's own fresh array: made one-hot
        token = true if self.rng.random() < self.acceptance else (true + 1) % logits.shape[-1]
        logits.fill(0.0)
        logits[0, -1, token] = 1.0
        return out


RESYNCS = 4


def _simulated_pass(sim: SimulatedDrafter, prompt: list[int], truth: list[int], max_tokens: int,
                    seed: Sequence[int]) -> tuple[Stats, bool]:
    """One MTP generation under `sim` and whether it still left the recorded continuation `truth`.

    Where the verify chose another token than plain decoding did (a near-tie the two kernels round differently),
    the continuation is recorded again from that token on and the generation rerun with the same draws, so later
    drafts are judged against the sequence the loop really produced.
    """
    g = sim.contract.draft_len
    for _ in range(RESYNCS + 1):
        sim.start(prompt + truth, seed)
        out, stats = generate_tokens(sim, prompt, max_tokens=max_tokens, draft_len=g)
        j = next((j for j, (a, b) in enumerate(zip(out, truth)) if a != b), None)
        if j is None:
            return stats, False
        rest, _ = generate_tokens(sim.inner, prompt + out[:j + 1], max_tokens=max_tokens + g - j - 1, mtp=False)
        truth = out[:j + 1] + rest
    return stats, True


def simulate(backend: Backend, prompts: Sequence[Sequence[int]], acceptances: Sequence[float], max_tokens: int = 48,
             seed: int = 0) -> list[Simulated]:
    """Per prompt, a plain greedy pass then an MTP pass at each simulated acceptance (interleaved); costs, measured
    and predicted speed-ups. The plain pass records G tokens more than the MTP pass may need."""
    g = backend.contract.draft_len
    sims = [SimulatedDrafter(backend, a) for a in acceptances]
    _measure(backend, prompts[:1], min(max_tokens, 8), 0)  # warm-up
    plain: list[Stats] = []
    mtp: list[list[Stats]] = [[] for _ in sims]
    diverged = [0] * len(sims)
    for p, prompt in enumerate(prompts):
        tokens, stats = generate_tokens(backend, list(prompt), max_tokens=max_tokens + g, mtp=False)
        plain.append(stats)
        for i, sim in enumerate(sims):
            stats, left = _simulated_pass(sim, list(prompt), tokens, max_tokens, (seed, i, p))  # independent draws
            mtp[i].append(stats)
            diverged[i] += left
    base = _summarize(plain, 0)
    results = []
    for a, stats, div in zip(acceptances, mtp, diverged):
        run = _summarize(stats, g)
        verify_cost, draft_cost = run.ms_per_verify / base.ms_per_decode, run.ms_per_draft_step / base.ms_per_decode
        predicted = predict(run.per_position_acceptance, a, {g: verify_cost}, draft_cost)[g]
        accepted, rejections = sum(s.accepted for s in stats), sum(s.rejected_rounds for s in stats)
        results.append(Simulated(a, g, base.tokens_per_second, run.tokens_per_second,
                                 run.tokens_per_second / base.tokens_per_second, predicted, base.ms_per_decode,
                                 run.ms_per_verify, run.ms_per_draft_step,
                                 accepted / (accepted + rejections) if accepted + rejections else 0.0,
                                 accepted + rejections, sum(s.verifies for s in stats), run.mean_accepted_length, div))
    return results


def plot(result: BenchResult, path: str) -> None:
    """Acceptance by draft position and speed-up against draft length, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .util.errors import EdgeMtpError

        raise EdgeMtpError("--plot needs matplotlib: pip install matplotlib.") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    pos = result.mtp[-1].per_position_acceptance if result.mtp else []
    left.bar(range(1, len(pos) + 1), pos, label="measured")
    xs = np.arange(1, MAX_GAMMA + 1)
    left.plot(xs, result.acceptance_fit ** xs, "k--", label=f"fit a^i, a={result.acceptance_fit:.2f}")
    left.set(xlabel="draft position i", ylabel="P(draft i accepted)", ylim=(0, 1.05), title="acceptance")
    left.legend()
    right.plot(list(result.predicted_speedup), list(result.predicted_speedup.values()), "o-", label="predicted")
    right.plot(list(result.measured_speedup), list(result.measured_speedup.values()), "s", label="measured")
    right.axhline(1.0, color="gray", lw=0.8)
    right.set(xlabel="draft length γ", ylabel="speed-up over plain decoding", title=result.backend)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
