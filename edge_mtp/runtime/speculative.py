"""The draft/verify loop, backend-agnostic, following LiteRT-LM's MTP protocol step by step.

prefill(prompt[:-1]) -> decode(last prompt token) gives t and the carry -> per round: draft G tokens at a constant
input_pos = N-1, verify [t, d1..dG] at N..N+G, accept the agreeing prefix, emit it plus the bonus, carry the
verify activation row of the last accepted input. Rejected rows stay in the cache, masked, and are overwritten.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..contract import ACTIVATIONS, DECODE, LOGITS, PROJECTED, VERIFY, causal_mask, drafter_mask, prefill_name
from ..errors import EdgeMtpError
from .backends.base import Backend
from .sampling import SamplingConfig, accept_draft, probabilities, sample


@dataclass
class Stats:
    """Acceptance and timing statistics of one generation (the same definitions as android_demo's spec-core)."""

    draft_len: int = 0
    drafted: int = 0
    accepted: int = 0
    verifies: int = 0
    plain_decodes: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    generated: int = 0
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    verify_ms: list[float] = field(default_factory=list)
    draft_ms: list[float] = field(default_factory=list)
    total_ms: float = 0.0

    @property
    def rejected_rounds(self) -> int:
        return sum(1 for k in self.accepted_per_round if k < self.draft_len)

    @property
    def draft_acceptance_rate(self) -> float:
        """accepted / drafted: what LiteRT-LM logs as 'MTP Drafter - Success rate'."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Per-token acceptance a (i.i.d. estimate): accepted / (accepted + rounds that stopped on a rejection)."""
        denom = self.accepted + self.rejected_rounds
        return self.accepted / denom if denom else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify, bonus included."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """Fraction of verify rounds whose draft i+1 was accepted."""
        n = len(self.accepted_per_round)
        return [sum(1 for k in self.accepted_per_round if k > i) / n if n else 0.0 for i in range(self.draft_len)]

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.total_ms - self.time_to_first_token_ms
        return (self.generated - 1) / decode_time * 1000.0 if self.generated > 1 and decode_time > 0 else 0.0

    def to_dict(self) -> dict:
        """snake_case summary for --json and reports."""
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        out = {k: v for k, v in asdict(self).items() if k not in ("decode_ms", "verify_ms", "draft_ms")}
        out.update(draft_acceptance_rate=self.draft_acceptance_rate, acceptance_rate=self.acceptance_rate,
                   mean_accepted_length=self.mean_accepted_length,
                   per_position_acceptance=self.per_position_acceptance, tokens_per_second=self.tokens_per_second,
                   ms_per_decode=mean(self.decode_ms), ms_per_verify=mean(self.verify_ms),
                   ms_per_draft_step=mean(self.draft_ms))
        return out


@dataclass
class Round:
    """One verify round as the phone sees it (used for replay vectors and cross-runtime checks)."""

    position: int
    drafts: list[int]
    target_argmax: list[int]


class SpeculativeDecoder:
    """Drives a Backend: prefill, decode, draft, verify, accept. One instance per backend; one sequence at a time."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.contract = backend.contract
        self.rounds: list[Round] = []

    # -- model calls ------------------------------------------------------------------------------------------------

    def _embed_many(self, tokens: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray | None]:
        rows = [self.backend.embed(t) for t in tokens]
        pad = length - len(rows)
        emb = np.concatenate([r[0] for r in rows] + [np.zeros_like(rows[0][0])] * pad, axis=1)
        if rows[0][1] is None:
            return emb, None
        return emb, np.concatenate([r[1] for r in rows] + [np.zeros_like(rows[0][1])] * pad, axis=1)

    def _run(self, signature: str, tokens: Sequence[int], start: int, length: int) -> dict[str, np.ndarray]:
        emb, ple = self._embed_many(tokens, length)
        pos = np.arange(start, start + length, dtype=np.int32)
        mask = causal_mask(start, length, self.contract.context, valid=len(tokens))
        return self.backend.run_target(signature, emb, ple, pos, mask)

    def prefill(self, tokens: Sequence[int]) -> None:
        """Write the caches of `tokens` at positions 0..n-1, in chunks of the exported prefill lengths."""
        start, lengths, context = 0, sorted(self.contract.prefill_lengths), self.contract.context
        while start < len(tokens):
            remaining = len(tokens) - start
            fitting = [n for n in lengths if start + n <= context]
            if not fitting:  # too close to the context end for any padded prefill: one token at a time
                self._run(DECODE, tokens[start:start + 1], start, 1)
                start += 1
                continue
            length = next((n for n in fitting if n >= remaining), fitting[-1])
            chunk = tokens[start:start + min(length, remaining)]
            self._run(prefill_name(length), chunk, start, length)
            start += len(chunk)

    def draft(self, token: int, carry: np.ndarray, position: int, count: int,
              sampling: SamplingConfig, rng: np.random.Generator) -> tuple[list[int], list[np.ndarray]]:
        """`count` drafts after `token` at `position`, all at input_pos = position-1; with sampling, also q per draft."""
        mask = drafter_mask(position - 1, self.contract.context)
        input_pos = np.array([position - 1], dtype=np.int32)
        drafts, qs = [], []
        for _ in range(count):
            emb, _ = self.backend.embed(token)
            out = self.backend.run_drafter(np.concatenate([emb, carry], axis=-1), input_pos, mask)
            logits = out[LOGITS][0, -1]
            if sampling.greedy:
                token = int(np.argmax(logits))
            else:
                q = probabilities(logits, sampling)
                token = sample(q, rng)
                qs.append(q)
            drafts.append(token)
            carry = out[PROJECTED]
        return drafts, qs

    # -- the loop ---------------------------------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], max_tokens: int = 64, draft_len: int | None = None, mtp: bool = True,
                 sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
                 stats: Stats | None = None, clock: Callable[[], float] = time.perf_counter) -> Iterator[int]:
        """Yield generated tokens as they are accepted; `stats` (if given) is filled in as generation goes."""
        c = self.contract
        g = c.draft_len if draft_len is None else draft_len
        if mtp and not self.backend.has_drafter:
            raise EdgeMtpError("This bundle has no drafter; run with --no-mtp or export it with an assistant.")
        if mtp and not 1 <= g <= c.draft_len:
            raise EdgeMtpError(f"Draft length {g} is not available: this bundle's verify signature checks up to "
                               f"{c.draft_len} drafts; export with --draft-len {g} or choose 1..{c.draft_len}.")
        if not prompt:
            raise EdgeMtpError("The prompt is empty; give at least one token.")
        if len(prompt) > c.context:  # a prompt filling the context still yields the one token after it
            raise EdgeMtpError(f"The prompt has {len(prompt)} tokens but the bundle's context is {c.context}; shorten "
                               f"the prompt or export with --context larger than {len(prompt)}.")
        st = stats if stats is not None else Stats()
        st.draft_len, st.prompt_tokens = g, len(prompt)
        rng = np.random.default_rng(sampling.seed)
        stop = set(stop_tokens)
        self.rounds = []
        self.backend.reset()
        t0 = clock()
        self.prefill(prompt[:-1])
        t1 = clock()
        st.prefill_ms = (t1 - t0) * 1000

        def choose(logits: np.ndarray) -> int:
            return int(np.argmax(logits)) if sampling.greedy else sample(probabilities(logits, sampling), rng)

        position = len(prompt) - 1
        out = self._run(DECODE, [prompt[-1]], position, 1)
        st.decode_ms.append((clock() - t1) * 1000)
        token, carry = choose(out[LOGITS][0, 0]), out[ACTIVATIONS][:, :1]
        position += 1
        st.time_to_first_token_ms = (clock() - t0) * 1000
        emitted = 0

        def emit(tokens: list[int]) -> Iterator[int]:
            nonlocal emitted
            for tok in tokens:
                if emitted >= max_tokens:
                    return
                emitted += 1
                st.generated = emitted
                yield tok
                if tok in stop:
                    emitted = max_tokens  # nothing after a stop token
                    return

        yield from emit([token])
        while emitted < max_tokens and position < c.context:
            if mtp and position + c.verify_len <= c.context:
                ts = clock()
                drafts, qs = self.draft(token, carry, position, g, sampling, rng)
                tv = clock()
                out = self._run(VERIFY, [token] + drafts, position, c.verify_len)
                st.verify_ms.append((clock() - tv) * 1000)
                st.draft_ms.append((tv - ts) * 1000 / g)
                rows = out[LOGITS][0]
                argmax = [int(np.argmax(r)) for r in rows[: g + 1]]
                if sampling.greedy:
                    k = next((i for i, d in enumerate(drafts) if d != argmax[i]), g)
                    bonus = argmax[k]
                else:
                    k, bonus = self._accept_sampled(drafts, qs, rows, sampling, rng)
                self.rounds.append(Round(position, drafts, argmax))
                st.drafted += g
                st.accepted += k
                st.verifies += 1
                st.accepted_per_round.append(k)
                carry = out[ACTIVATIONS][:, k:k + 1]
                token = bonus
                position += k + 1
                yield from emit(drafts[:k] + [bonus])
            else:
                td = clock()
                out = self._run(DECODE, [token], position, 1)
                st.decode_ms.append((clock() - td) * 1000)
                self.rounds.append(Round(position, [], [int(np.argmax(out[LOGITS][0, 0]))]))
                st.plain_decodes += 1
                token, carry = choose(out[LOGITS][0, 0]), out[ACTIVATIONS]
                position += 1
                yield from emit([token])
        st.total_ms = (clock() - t0) * 1000

    @staticmethod
    def _accept_sampled(drafts: list[int], qs: list[np.ndarray], rows: np.ndarray, sampling: SamplingConfig,
                        rng: np.random.Generator) -> tuple[int, int]:
        """Exact speculative sampling over one verify: (number accepted, the token that follows them)."""
        for i, (d, q) in enumerate(zip(drafts, qs)):
            replacement = accept_draft(d, probabilities(rows[i], sampling), q, rng)
            if replacement is not None:
                return i, replacement
        return len(drafts), sample(probabilities(rows[len(drafts)], sampling), rng)


def generate_tokens(backend: Backend, prompt: Sequence[int], **kwargs) -> tuple[list[int], Stats]:
    """Run a whole generation and return (tokens, stats)."""
    stats = Stats()
    tokens = list(SpeculativeDecoder(backend).generate(prompt, stats=stats, **kwargs))
    return tokens, stats
