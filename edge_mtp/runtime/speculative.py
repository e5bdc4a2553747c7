"""The draft/verify loop, backend-agnostic, following LiteRT-LM's MTP protocol step by step.

prefill(prompt[:-1]) -> decode(last prompt token) gives t and the carry -> per round: draft G tokens at a constant
input_pos = N-1, verify [t, d1..dG] at N..N+G, accept the agreeing prefix, emit it plus the bonus, carry the
verify activation row of the last accepted input. Rejected rows stay in the cache, masked, and are overwritten.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..model.contract import (ACTIVATIONS, DECODE, LOGITS, MASK_HIDDEN, MASK_VISIBLE, PROJECTED, VERIFY,
                              prefill_name)
from ..util.errors import EdgeMtpError
from .backends.base import Backend
from .sampling import Greedy, Sampled, SamplingConfig


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


class Recorder:
    """The loop's observer: times its phases with `clock` into `stats`, which the loop's counts also go to."""

    def __init__(self, stats: Stats, clock: Callable[[], float]):
        self.stats, self.clock, self.start = stats, clock, clock()

    def since_start(self) -> float:
        """Milliseconds since the generation started."""
        return (self.clock() - self.start) * 1000

    @contextmanager
    def timed(self, times: list[float], per: int = 1) -> Iterator[None]:
        """Append the block's wall time in ms, divided by `per`, to `times`."""
        t = self.clock()
        yield
        times.append((self.clock() - t) * 1000 / per)


class TargetInputs:
    """The inputs of one target signature over `length` rows, allocated once and rewritten in place every call."""

    def __init__(self, length: int, context: int, embeddings: np.ndarray, per_layer: np.ndarray | None):
        self.embeddings = np.zeros((1, length) + embeddings.shape[2:], embeddings.dtype)
        self.per_layer = None if per_layer is None else np.zeros((1, length) + per_layer.shape[2:], per_layer.dtype)
        self.offsets = np.arange(length, dtype=np.int32)
        self.input_pos = np.zeros(length, np.int32)
        self.mask = np.zeros((1, 1, length, context), np.float32)

    def put(self, row: int, embeddings: np.ndarray, per_layer: np.ndarray | None) -> None:
        """Write one token's embedder outputs ([1,1,...] each) into `row`."""
        self.embeddings[0, row] = embeddings[0, 0]
        if self.per_layer is not None:
            self.per_layer[0, row] = per_layer[0, 0]

    def place(self, start: int, valid: int) -> None:
        """Positions start.. and contract.causal_mask(start, length, context, valid); rows from `valid` on are zero."""
        np.add(self.offsets, start, out=self.input_pos)
        self.mask.fill(MASK_HIDDEN)
        for row in range(valid):
            self.mask[0, 0, row, :start + row + 1] = MASK_VISIBLE
        self.mask[0, 0, valid:, 0] = MASK_VISIBLE
        self.embeddings[0, valid:] = 0.0
        if self.per_layer is not None:
            self.per_layer[0, valid:] = 0.0


class SpeculativeDecoder:
    """Drives a Backend: prefill, decode, draft, verify, accept. One instance per backend; one sequence at a time.

    Every input tensor lives in a buffer allocated on first use and rewritten in place; each token goes through the
    embedders once per round (a draft's embeddings are written straight into the verify rows that will reuse them).
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.contract = backend.contract
        self.rounds: list[Round] = []
        self._inputs: dict[int, TargetInputs] = {}  # by row count
        self._draft_in: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # activations, input_pos, mask

    # -- the step API (validate, the quantization report and the loop all run the models through it) --------------

    def _length(self, signature: str) -> int:
        """Rows of a target signature: 1 for decode, G+1 for verify, T for prefill_<T>."""
        if signature == DECODE:
            return 1
        return self.contract.verify_len if signature == VERIFY else int(signature.rsplit("_", 1)[1])

    def step(self, signature: str, tokens: Sequence[int], start: int) -> dict[str, np.ndarray]:
        """Run a target signature on `tokens` at positions start.. (padded to its length); logits and activations."""
        inputs = None
        for row, token in enumerate(tokens):
            emb, ple = self.backend.embed(token)
            inputs = inputs or self._target_inputs(self._length(signature), emb, ple)
            inputs.put(row, emb, ple)
        return self._run_target(signature, inputs, start, len(tokens))

    def _run_target(self, signature: str, inputs: TargetInputs, start: int, valid: int) -> dict[str, np.ndarray]:
        inputs.place(start, valid)
        return self.backend.run_target(signature, inputs.embeddings, inputs.per_layer, inputs.input_pos, inputs.mask)

    def _target_inputs(self, length: int, emb: np.ndarray, ple: np.ndarray | None) -> TargetInputs:
        if length not in self._inputs:
            self._inputs[length] = TargetInputs(length, self.contract.context, emb, ple)
        return self._inputs[length]

    def prefill(self, tokens: Sequence[int], start: int = 0) -> None:
        """Write the caches of `tokens` at positions start.., in chunks of the exported prefill lengths."""
        done, lengths, context = 0, sorted(self.contract.prefill_lengths), self.contract.context
        while done < len(tokens):
            position, remaining = start + done, len(tokens) - done
            fitting = [n for n in lengths if position + n <= context]
            if not fitting:  # too close to the context end for any padded prefill: one token at a time
                self.step(DECODE, tokens[done:done + 1], position)
                done += 1
                continue
            length = next((n for n in fitting if n >= remaining), fitting[-1])
            chunk = tokens[done:done + min(length, remaining)]
            self.step(prefill_name(length), chunk, position)
            done += len(chunk)

    def draft(self, token: int, carry: np.ndarray, position: int, count: int, rule: Greedy | Sampled) -> list[int]:
        """`count` drafts after `token` at `position`, all at input_pos = position-1, each proposed by `rule`.

        The embeddings of `token` and of every draft fed back are left in the verify rows 0..count-1.
        """
        verify = None
        drafts = []
        for row in range(count):
            emb, ple = self.backend.embed(token)
            verify = verify or self._target_inputs(self.contract.verify_len, emb, ple)
            verify.put(row, emb, ple)
            activations, input_pos, mask = self._drafter_inputs(emb, carry, position)
            activations[..., :emb.shape[-1]] = emb
            activations[..., emb.shape[-1]:] = carry
            out = self.backend.run_drafter(activations, input_pos, mask)
            token = rule.propose(out[LOGITS][0, -1])
            drafts.append(token)
            carry = out[PROJECTED]
        return drafts

    def _drafter_inputs(self, emb: np.ndarray, carry: np.ndarray,
                        position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The drafter's input buffers, input_pos and mask set for `position` (constant over a round)."""
        if self._draft_in is None:
            width = emb.shape[-1] + carry.shape[-1]
            self._draft_in = (np.zeros((1, 1, width), np.float32), np.full(1, -1, np.int32),
                              np.zeros((1, 1, 1, self.contract.context), np.float32))
        activations, input_pos, mask = self._draft_in
        if input_pos[0] != position - 1:
            input_pos[0] = position - 1
            mask.fill(MASK_HIDDEN)
            mask[..., :position] = MASK_VISIBLE  # drafter_mask(position - 1): keys [0, position-1]
        return self._draft_in

    def _verify(self, drafts: list[int], position: int) -> dict[str, np.ndarray]:
        """Verify [token, *drafts] at position.. right after draft(token, ...), whose rows are already in place."""
        emb, ple = self.backend.embed(drafts[-1])
        inputs = self._target_inputs(self.contract.verify_len, emb, ple)
        inputs.put(len(drafts), emb, ple)
        return self._run_target(VERIFY, inputs, position, len(drafts) + 1)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], max_tokens: int = 64, draft_len: int | None = None, mtp: bool = True,
                 sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
                 stats: Stats | None = None, clock: Callable[[], float] = time.perf_counter,
                 cached: int = 0) -> Iterator[int]:
        """Yield generated tokens as they are accepted; `stats` (if given) is filled in as generation goes.

        With `cached` > 0 the caches already hold the first `cached` prompt tokens (a chat's earlier turns): only
        the rest is prefilled.
        """
        c = self.contract
        g = self.check(prompt, mtp, draft_len)
        if not 0 <= cached < len(prompt):
            raise ValueError(f"cached ({cached}) must leave at least the last prompt token to decode")
        st = stats if stats is not None else Stats()
        st.draft_len, st.prompt_tokens = g, len(prompt)
        rule = Greedy() if sampling.greedy else Sampled(sampling)
        stop, self.rounds = set(stop_tokens), []
        if not cached:
            self.backend.reset()
        watch = Recorder(st, clock)
        self.prefill(prompt[cached:-1], cached)
        st.prefill_ms = watch.since_start()
        position = len(prompt) - 1
        with watch.timed(st.decode_ms):
            out = self.step(DECODE, [prompt[-1]], position)
        new, carry = [rule.choose(out[LOGITS][0, 0])], out[ACTIVATIONS]
        position += 1
        st.time_to_first_token_ms = watch.since_start()
        while max_tokens > 0:
            for token in new[:max_tokens - st.generated]:
                st.generated += 1
                yield token
                if token in stop:
                    max_tokens = 0  # nothing after a stop token
                    break
            if st.generated >= max_tokens or position >= c.context:
                break
            if mtp and position + c.verify_len <= c.context:
                new, carry = self.round(new[-1], carry, position, g, rule, watch)
            else:
                with watch.timed(st.decode_ms):
                    out = self.step(DECODE, [new[-1]], position)
                self.rounds.append(Round(position, [], [int(np.argmax(out[LOGITS][0, 0]))]))
                st.plain_decodes += 1
                new, carry = [rule.choose(out[LOGITS][0, 0])], out[ACTIVATIONS]
            position += len(new)
        st.total_ms = watch.since_start()

    def round(self, token: int, carry: np.ndarray, position: int, g: int, rule: Greedy | Sampled,
              watch: Recorder) -> tuple[list[int], np.ndarray]:
        """Draft g tokens, verify [token, drafts] once, accept what `rule` keeps: (emitted tokens, next carry)."""
        with watch.timed(watch.stats.draft_ms, per=g):
            drafts = self.draft(token, carry, position, g, rule)
        with watch.timed(watch.stats.verify_ms):
            out = self._verify(drafts, position)
        rows = out[LOGITS][0]
        argmax = [int(np.argmax(r)) for r in rows[: g + 1]]
        k, bonus = rule.accept(drafts, rows, argmax)
        self.rounds.append(Round(position, drafts, argmax))
        st = watch.stats
        st.drafted, st.accepted, st.verifies = st.drafted + g, st.accepted + k, st.verifies + 1
        st.accepted_per_round.append(k)
        return drafts[:k] + [bonus], out[ACTIVATIONS][:, k:k + 1]

    def check(self, prompt: Sequence[int], mtp: bool, draft_len: int | None) -> int:
        """The draft length to use, after refusing what this bundle cannot run."""
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
        return g


def generate_tokens(backend: Backend, prompt: Sequence[int], **kwargs) -> tuple[list[int], Stats]:
    """Run a whole generation and return (tokens, stats)."""
    stats = Stats()
    tokens = list(SpeculativeDecoder(backend).generate(prompt, stats=stats, **kwargs))
    return tokens, stats
