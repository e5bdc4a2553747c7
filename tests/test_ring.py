"""Ring-buffer sliding caches: a LiteRT bundle's sliding layers keep a ring of about the window, not the context.

The tiny bundle (window 4, prefill 8 and 16, verify 4, context 64) has rings of 4 + 16 - 1 = 19 slots; every run
here goes past the window and around the ring more than once.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from edge_mtp.bundle.litertlm import read_litertlm
from edge_mtp.model.contract import Contract, k_name, v_name
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.backends.litert import LiteRTBackend
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import generate_tokens

from conftest import BUNDLE_CONTEXT as CONTEXT, BUNDLE_PREFILL as PREFILL
from helpers import assert_verify_rows_are_decodes

RING = 4 + max(PREFILL) - 1
PROMPTS = ["Hello world", "abc"]
MAX_TOKENS = 40  # with the prompts' tokens: past the ring twice, inside the context


def test_sliding_caches_are_rings_declared_local(tiny_bundle):
    """Sliding caches are [1,Hkv,RING,hd] / [1,Hkv,hd,RING] in the target and the drafter, full ones keep the
    context, and the executor metadata declares the rings LOCAL with the window as minimum and the ring as maximum."""
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as em

    bundle = read_litertlm(tiny_bundle[0])
    contract = Contract(*_specs(bundle.manifest), CONTEXT, 3, PREFILL, sliding_ring=True)
    assert contract.ring_size == RING and bundle.manifest["sliding_ring"] is True
    shapes = {s.name: s.shape for s in contract.kv_tensors()}
    assert shapes[k_name(0)] == (1, 2, RING, 16) and shapes[v_name(0)] == (1, 2, 16, RING)
    assert shapes[k_name(2)] == (1, 2, CONTEXT, 32)
    for model_type, signature in (("tf_lite_prefill_decode", "verify"), ("tf_lite_mtp_drafter", "mtp_drafter")):
        got = _input_shapes(bundle, model_type, signature)
        assert got[k_name(1)] == [1, 2, RING, 16] and got[v_name(1)] == [1, 2, 16, RING], model_type
        assert got[k_name(2)] == [1, 2, CONTEXT, 32], model_type
    meta = em.ExecutorMetadata.FromString(bundle.read(bundle.section("executor_metadata")))
    llm = meta.llm_executor_metadata
    local = {b.decode_input_name: b for b in llm.state_buffers if b.type in (
        em.StateBuffer.TYPE_LOCAL_KEY_CACHE, em.StateBuffer.TYPE_LOCAL_VALUE_CACHE)}
    assert sorted(local) == sorted([k_name(0), v_name(0), k_name(1), v_name(1)])
    assert {(b.minimum_sequence_length, b.maximum_sequence_length) for b in local.values()} == {(4, RING)}
    assert llm.attention_mask_settings.sliding_window_size == 4


def test_a_ring_bundle_runs_past_its_ring_as_the_full_cache_model(tiny_bundle, synth_pair):
    """LiteRT-LM and our loop on the bundle give the same text, MTP on and off, as our loop over whole-context caches
    in PyTorch; in the bundle a verify row is a decode bit for bit at positions around the ring."""
    path = tiny_bundle[0]
    tok = AutoTokenizer.from_pretrained(synth_pair / "target")
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert all(RING < len(p) + MAX_TOKENS < CONTEXT for p in prompts)
    models = load_target(synth_pair / "target")
    drafter = load_drafter(synth_pair / "assistant", models.spec)
    full = TorchBackend(models, drafter, Contract(models.spec, drafter.spec, CONTEXT, 3, PREFILL))
    want = [generate_tokens(full, p, max_tokens=MAX_TOKENS, mtp=False)[0] for p in prompts]
    assert len(want[0]) == MAX_TOKENS  # no stop token cut it short
    ring = LiteRTBackend(path)
    assert ring.contract.ring_size == RING
    for mtp in (False, True):
        assert [generate_tokens(ring, p, max_tokens=MAX_TOKENS, mtp=mtp)[0] for p in prompts] == want
    assert_verify_rows_are_decodes(ring, (2, 17, RING + 3, 2 * RING + 5), [], 0)
    texts = [tok.decode(t, skip_special_tokens=False) for t in want]
    on = run_litertlm(path, PROMPTS, max_tokens=MAX_TOKENS, context=CONTEXT, mtp=True)
    off = run_litertlm(path, PROMPTS, max_tokens=MAX_TOKENS, context=CONTEXT, mtp=False)
    assert on.supports_mtp and on.texts == off.texts == texts


def _specs(manifest: dict):
    from edge_mtp.checkpoint.spec import DrafterSpec, TargetSpec, spec_from_dict

    return spec_from_dict(TargetSpec, manifest["target"]), spec_from_dict(DrafterSpec, manifest["drafter"])


def _input_shapes(bundle, model_type: str, signature: str) -> dict[str, list[int]]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=bundle.read(bundle.model_section(model_type)))
    details = runner.get_signature_runner(signature).get_input_details()
    return {name: list(d["shape"]) for name, d in details.items()}


def test_a_ring_resumes_an_earlier_position_only_within_its_reach(synth_pair):
    """A chat turn continues the cache from the common prefix; a ring still holds the window behind it only when
    the rows written past it do not reach around (Contract.can_resume): there the continuation gives a fresh
    prefill's logits, beyond it the window is lost."""
    import numpy as np

    from edge_mtp.model.contract import DECODE
    from edge_mtp.runtime.speculative import SpeculativeDecoder

    models = load_target(synth_pair / "target")
    drafter = load_drafter(synth_pair / "assistant", models.spec)
    contract = Contract(models.spec, drafter.spec, CONTEXT, 3, PREFILL, sliding_ring=True)
    backend = TorchBackend(models, drafter, contract)
    decoder, rng = SpeculativeDecoder(backend), np.random.default_rng(0)
    first, end = [int(t) for t in rng.integers(3, 250, 40)], 40
    reach = RING - 4 + 1
    for at, resumable in ((end - reach, True), (end - reach - 3, False)):
        second = first[:at] + [int(t) for t in rng.integers(3, 250, end - at)]
        backend.reset()
        decoder.prefill(second[:-1])
        fresh = decoder.step(DECODE, second[-1:], end - 1)["logits"]
        backend.reset()
        decoder.prefill(first)
        decoder.prefill(second[at:-1], at)
        resumed = decoder.step(DECODE, second[-1:], end - 1)["logits"]
        assert contract.can_resume(end, at) is resumable
        assert np.allclose(resumed, fresh, atol=1e-5) is resumable, at
