"""The draft/verify loop's bookkeeping on a scripted backend: acceptance, stops, limits, context end, prefill."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mtp.model.contract import causal_mask, drafter_mask
from edge_mtp.runtime.speculative import SpeculativeDecoder, Stats, generate_tokens
from edge_mtp.util.errors import EdgeMtpError

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


class Recording(ScriptedBackend):
    """Counts embedder calls and keeps, per target/drafter call, the input arrays and a copy of their values."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embeds, self.target_inputs, self.drafter_inputs = 0, [], []

    def embed(self, token):
        self.embeds += 1
        return super().embed(token)

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        self.target_inputs.append((signature, embeddings, input_pos, mask, input_pos.copy(), mask.copy()))
        return super().run_target(signature, embeddings, per_layer_embeddings, input_pos, mask)

    def run_drafter(self, activations, input_pos, mask):
        self.drafter_inputs.append((activations, mask, int(input_pos[0]), mask.copy()))
        return super().run_drafter(activations, input_pos, mask)


@pytest.mark.parametrize("g", [2, 3])
def test_inputs_are_rewritten_in_place_with_the_contracts_masks_and_one_embedding_per_token(g):
    backend = Recording(context=64, draft_len=3, prefill=(8,), wrong_step=lambda pos, step: (pos + step) % 3 == 0)
    prompt = [5, 9, 2, 11, 7, 1]  # prefill_8 over 5 tokens: 3 padding rows
    tokens, stats = generate_tokens(backend, prompt, max_tokens=30, draft_len=g)
    assert tokens == plain_reference(prompt, 30)
    valid = {"prefill_8": 5, "decode": 1, "verify": g + 1}
    arrays: dict[str, set] = {}
    for signature, emb, pos, mask, pos_then, mask_then in backend.target_inputs:
        arrays.setdefault(signature, set()).update({id(emb), id(pos), id(mask)})
        start, rows = int(pos_then[0]), len(pos_then)
        assert (pos_then == np.arange(start, start + rows)).all()
        assert np.array_equal(mask_then, causal_mask(start, rows, 64, valid=valid[signature])), signature
    assert all(len(ids) == 3 for ids in arrays.values()), arrays  # one array each, whatever the number of calls
    assert len({id(a) for a, *_ in backend.drafter_inputs}) == len({id(m) for _, m, *_ in backend.drafter_inputs}) == 1
    for _, _, last_committed, mask_then in backend.drafter_inputs:
        assert np.array_equal(mask_then, drafter_mask(last_committed, 64))
    # every token through the embedders once: the prompt, then per round the token and its g drafts
    assert backend.embeds == len(prompt) + stats.verifies * (g + 1) + stats.plain_decodes
