"""The draft/verify loop's bookkeeping on a scripted backend: acceptance, stops, limits, context end, prefill."""

from __future__ import annotations

import pytest

from edge_mtp.errors import EdgeMtpError
from edge_mtp.runtime.speculative import SpeculativeDecoder, Stats, generate_tokens

from scripted_backend import ScriptedBackend, plain_reference

PROMPT = [5, 9, 2, 11, 7]


@pytest.mark.parametrize("g", [1, 2, 3, 4, 5, 6])
def test_partial_acceptance_keeps_greedy_output(g):
    backend = ScriptedBackend(context=96, draft_len=g, wrong_step=lambda pos, step: (pos + step) % 3 == 0)
    tokens, stats = generate_tokens(backend, PROMPT, max_tokens=40)
    assert tokens == plain_reference(PROMPT, 40)
    assert 0 < stats.accepted < stats.drafted
    assert stats.drafted == g * stats.verifies
    assert stats.mean_accepted_length == pytest.approx((stats.accepted + stats.verifies) / stats.verifies)


def test_perfect_drafter_accepts_everything():
    tokens, stats = generate_tokens(ScriptedBackend(), PROMPT, max_tokens=21)
    assert tokens == plain_reference(PROMPT, 21)
    assert stats.accepted_per_round == [3] * 5 and stats.draft_acceptance_rate == 1.0
    assert stats.per_position_acceptance == [1.0, 1.0, 1.0] and stats.mean_accepted_length == 4.0


def test_statistics_definitions():
    s = Stats(draft_len=3, drafted=12, accepted=5, verifies=4, accepted_per_round=[3, 0, 1, 1])
    assert s.draft_acceptance_rate == 5 / 12
    assert s.acceptance_rate == 5 / (5 + 3)
    assert s.mean_accepted_length == 9 / 4
    assert s.per_position_acceptance == [0.75, 0.25, 0.25]


def test_never_more_than_max_tokens_even_inside_an_accepted_run():
    tokens, stats = generate_tokens(ScriptedBackend(), PROMPT, max_tokens=6)
    assert tokens == plain_reference(PROMPT, 6) and stats.generated == 6


def test_stop_token_inside_an_accepted_run_ends_generation():
    ref = plain_reference(PROMPT, 30)
    stop = ref[6]  # falls inside the second fully accepted round
    tokens, _ = generate_tokens(ScriptedBackend(), PROMPT, max_tokens=30, stop_tokens=[stop])
    assert tokens == ref[: ref.index(stop) + 1]


def test_context_end_falls_back_to_plain_decode_and_stays_inside():
    backend = ScriptedBackend(context=20, draft_len=3)
    decoder = SpeculativeDecoder(backend)
    stats = Stats()
    tokens = list(decoder.generate(PROMPT, max_tokens=100, stats=stats))
    assert tokens == plain_reference(PROMPT, len(tokens))
    assert len(PROMPT) + len(tokens) == 20 + 1  # last token emitted from position 19 is never written
    assert stats.plain_decodes > 0
    verify_positions = [p for sig, p in backend.calls if sig == "verify"]
    assert max(max(p) for p in verify_positions) <= 19


def test_prompts_longer_than_the_largest_prefill_are_chunked():
    backend = ScriptedBackend(context=64, prefill=(4, 8))
    prompt = list(range(1, 20))
    tokens, _ = generate_tokens(backend, prompt, max_tokens=5)
    assert tokens == plain_reference(prompt, 5)
    prefills = [(sig, p) for sig, p in backend.calls if sig.startswith("prefill")]
    assert [sig for sig, _ in prefills] == ["prefill_8", "prefill_8", "prefill_4"]
    assert list(backend.cache[:18]) == prompt[:18]


def test_prompt_longer_than_the_context_is_a_clear_error():
    with pytest.raises(EdgeMtpError, match="prompt has 70 tokens but the bundle's context is 64"):
        generate_tokens(ScriptedBackend(context=64), list(range(70)), max_tokens=4)


def test_draft_length_beyond_the_verify_signature_is_refused():
    with pytest.raises(EdgeMtpError, match="Draft length 5 is not available"):
        generate_tokens(ScriptedBackend(draft_len=3), PROMPT, max_tokens=4, draft_len=5)


def test_shorter_draft_length_than_exported_works():
    tokens, stats = generate_tokens(ScriptedBackend(draft_len=4), PROMPT, max_tokens=20, draft_len=2)
    assert tokens == plain_reference(PROMPT, 20) and stats.drafted == 2 * stats.verifies


def test_prompt_filling_the_context_yields_one_token():
    backend = ScriptedBackend(context=16)
    prompt = list(range(1, 17))
    tokens, _ = generate_tokens(backend, prompt, max_tokens=5)
    assert tokens == plain_reference(prompt, 1)
