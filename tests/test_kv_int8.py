"""The int8 KV cache (export --kv-cache int8): int8 cache buffers shared by the target and the drafter, quantized and
dequantized inside the graphs with static scales; LiteRT-LM, our LiteRT loop and our PyTorch loop agree, MTP on and
off, and validate holds the bundle to the cost its export recorded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from edge_mtp.bundle.litertlm import read_litertlm
from edge_mtp.bundle.manifest import checked_contract
from edge_mtp.checks.validate import validate
from edge_mtp.cli import main
from edge_mtp.export.driver import TOLERANCE
from edge_mtp.model.contract import contract_from_dict
from edge_mtp.model.kv_quant import QMAX, KvScales, derive_scales, dequantize_caches, quantize_rows, rounded_as
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.backends.litert import LiteRTBackend
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import generate_tokens
from edge_mtp.util.errors import EdgeMtpError

from bundle_tools import rewrap
from conftest import BUNDLE_CONTEXT as CONTEXT, BUNDLE_PREFILL as PREFILL

PROMPTS = ["Hello world", "The quick brown fox", "abc", "Speculative decoding on a phone, exactly."]


@pytest.fixture(scope="module")
def int8_kv(synth_pair, tmp_path_factory):
    """The tiny pair exported once through the command with --kv-cache int8: (path, --json summary)."""
    out = tmp_path_factory.mktemp("kv-int8") / "tiny-kv8.litertlm"
    result = CliRunner().invoke(main, [
        "export", "--target", str(synth_pair / "target"), "--assistant", str(synth_pair / "assistant"),
        "--out", str(out), "--context", str(CONTEXT), "--prefill", ",".join(map(str, PREFILL)), "--quant", "fp32",
        "--kv-cache", "int8", "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    return out, json.loads(result.stdout[result.stdout.index("{"):])


def test_quantized_rows_round_trip_within_half_a_step_and_zero_stays_zero():
    width = 8
    weight = torch.linspace(0.5, 2.0, width)
    scales = derive_scales("sliding", [weight, weight * 0.5])
    key = torch.tensor(scales.key)
    # a channel's scale is its RoPE pair's larger weight times the clip (capped at sqrt(hd)), over QMAX
    pair_max = torch.maximum(weight, weight.roll(width // 2))
    assert torch.allclose(key, pair_max * min(5.0, math.sqrt(width)) / QMAX)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 5, width, generator=g), torch.randn(1, 2, 5, width, generator=g)
    k[0, 0, 0], k[0, 0, 1] = 2 * key * QMAX, -2 * key * QMAX  # beyond the clip
    kq, vq = quantize_rows(k, v, scales)
    assert kq.dtype == vq.dtype == torch.int8 and int(kq.abs().max()) <= QMAX
    kd, vd = dequantize_caches(kq, vq, scales)
    inside = k.abs() <= key * QMAX
    assert int((~inside).sum()) >= 2 * width
    half_step = 0.5 + 1e-4  # and float rounding of the scaling
    assert bool(((kd - k).abs() <= key * half_step)[inside].all())
    assert torch.equal(kd[~inside].abs(), (key * QMAX).expand_as(k)[~inside])  # clipped to the range, sign kept
    assert bool(((vd - v).abs() <= scales.value * half_step).all())
    zeros = torch.zeros(1, 2, 5, width, dtype=torch.int8)
    assert not dequantize_caches(zeros, zeros, scales)[0].any()  # LiteRT-LM's zero-filled buffers mean zero


def test_a_checked_graph_may_round_apart_only_at_a_rounding_boundary():
    """The converted graph computes rows in another order, so a value at x.5 may round the other way there; the
    check adopts such a one-step difference and no other (a wrong quantizer must still fail the check)."""
    scales = KvScales("sliding", (1.0, 1.0, 1.0, 1.0), 1.0)
    rows = torch.tensor([2.5 + 1e-4, 0.3, -3.5 - 1e-4, 7.0]).reshape(1, 1, 1, 4)
    graph = np.array([2, 1, -3, 9], np.int8).reshape(1, 1, 1, 4)  # boundary flip, off-boundary, flip, two steps
    with rounded_as([(graph, graph)]):
        k, v = quantize_rows(rows, rows, scales)
    assert k.flatten().tolist() == v.flatten().tolist() == [2, 0, -3, 7]
    assert quantize_rows(rows, rows, scales)[0].flatten().tolist() == [3, 0, -4, 7]  # outside a check: its own


def test_the_bundle_declares_int8_caches_the_drafter_shares(int8_kv):
    from ai_edge_litert.interpreter import Interpreter

    path, summary = int8_kv
    # every converted piece, int8 caches in and out, matched its PyTorch module
    assert set(summary["checks"]) == {"embedder", "per_layer_embedder", "prelude", "head", "drafter"} | {
        f"layer_{i}" for i in range(6)}
    assert all(0 <= error <= TOLERANCE for error in summary["checks"].values()), summary["checks"]
    bundle = read_litertlm(path)
    contract = checked_contract(bundle.manifest, str(path))
    assert contract.kv_dtype == "int8" and {s.kind for s in contract.kv_scales} == {"sliding", "full"}
    kv = {}
    for model_type in ("tf_lite_prefill_decode", "tf_lite_mtp_drafter"):
        interpreter = Interpreter(model_content=bundle.read(bundle.model_section(model_type)))
        for name in interpreter.get_signature_list():
            runner = interpreter.get_signature_runner(name)
            for details in (runner.get_input_details(), runner.get_output_details()):
                for tensor, d in details.items():
                    if tensor.startswith("kv_cache_"):
                        q = d["quantization_parameters"]
                        kv.setdefault(tensor, set()).add((np.dtype(d["dtype"]).name, tuple(d["shape"]),
                                                          len(q["scales"]), len(q["zero_points"])))
    assert set(kv) == {s.name for s in contract.kv_tensors()}
    # one type, shape and (absent) quantization per buffer, in every signature of the target and the drafter
    assert all(len(uses) == 1 and next(iter(uses))[0] == "int8" and next(iter(uses))[2:] == (0, 0)
               for uses in kv.values()), kv
    assert LiteRTBackend(path).read_kv("kv_cache_k_0").dtype == np.int8


def test_litert_lm_and_our_loops_run_it_with_mtp_identically(int8_kv, synth_pair):
    path, summary = int8_kv
    on = run_litertlm(path, PROMPTS, max_tokens=20, context=CONTEXT, mtp=True)
    off = run_litertlm(path, PROMPTS, max_tokens=20, context=CONTEXT, mtp=False)
    assert on.supports_mtp and on.texts == off.texts
    tok = AutoTokenizer.from_pretrained(synth_pair / "target")
    models = load_target(synth_pair / "target")
    drafter = load_drafter(synth_pair / "assistant", models.spec)
    contract = contract_from_dict(read_litertlm(path).manifest)
    ours = {"litert": LiteRTBackend(path), "torch": TorchBackend(models, drafter, contract)}
    for name, backend in ours.items():
        texts = {}
        for mtp in (True, False):
            texts[mtp] = [tok.decode(generate_tokens(backend, tok(p)["input_ids"], max_tokens=20, mtp=mtp,
                                                     stop_tokens=list(models.spec.eos_token_ids))[0],
                                     skip_special_tokens=False) for p in PROMPTS]
        assert texts[True] == texts[False] == on.texts, name
    assert all(t.dtype == torch.int8 for t in ours["torch"].kv.values())


def test_the_export_records_the_kv_cost_and_validate_holds_the_bundle_to_it(int8_kv, synth_pair, tmp_path):
    path, summary = int8_kv
    report = read_litertlm(path).manifest["quantization_report"]
    # measured against the fp32-KV PyTorch reference: the rounding of the cache shows, and it keeps top-1
    assert report["reference"] == "streamed PyTorch fp32"
    assert 1e-3 < report["logit_relative_error"] < 0.3 and report["top1_agreement"] >= 0.9
    result = validate(path, synth_pair / "target", synth_pair / "assistant", prompts=PROMPTS[:2], max_tokens=8,
                      use_litert_lm=False)
    assert result.passed, [c for c in result.checks if not c.passed]
    graphs = [c for c in result.checks if c.kind == "graph" and c.subject.startswith("target")]
    assert graphs and all("int8 KV cost measured at export" in c.criterion for c in graphs)

    def understate(manifest: dict) -> None:  # the same graphs, recorded as if the int8 cache cost nothing
        manifest["quantization_report"]["logit_relative_error"] = 1e-6

    understated = rewrap(path, tmp_path / "understated.litertlm", understate)
    result = validate(understated, synth_pair / "target", synth_pair / "assistant", prompts=PROMPTS[:2],
                      max_tokens=8, use_litert_lm=False)
    failed = {c.subject for c in result.checks if not c.passed}
    assert not result.passed and failed and all(s.startswith(("target", "drafter")) for s in failed), failed


def test_an_int8_manifest_without_scales_is_refused(int8_kv):
    manifest = dict(read_litertlm(int8_kv[0]).manifest)
    manifest["kv_scales"] = manifest["kv_scales"][:1]
    with pytest.raises(EdgeMtpError, match="kv_dtype is int8 but kv_scales"):
        checked_contract(manifest, "m.litertlm")
    corrupt = dict(manifest, kv_scales=[dict(r, key_half_f32="not base64!") for r in read_litertlm(int8_kv[0]).manifest[
        "kv_scales"]])
    with pytest.raises(EdgeMtpError, match="kv_dtype is int8 but kv_scales"):
        checked_contract(corrupt, "m.litertlm")


def test_gemma_4_scales_fit_the_header_litert_lm_reads_and_a_larger_header_is_refused(int8_kv, synth_pair, tmp_path):
    """E2B's scales (head dims 256 and 512) take under 3 KB of the manifest and read back exactly; a bundle whose
    header would pass the 16 KiB LiteRT-LM reads is refused at export instead of failing at load."""
    from edge_mtp.bundle.litertlm import HEADER_READ, SECTION_MODEL_TYPES, BundleMetadata, write_litertlm
    from edge_mtp.model.kv_quant import derive_scales, scales_from_dicts

    gen = torch.Generator().manual_seed(0)
    scales = tuple(derive_scales(kind, [torch.rand(hd, generator=gen) + 0.5 for _ in range(3)])
                   for kind, hd in (("sliding", 256), ("full", 512)))
    records = [s.to_dict() for s in scales]
    assert len(json.dumps(records)) < 3000 and scales_from_dicts(records) == scales
    bundle = read_litertlm(int8_kv[0])
    models = {}
    for name, model_type in SECTION_MODEL_TYPES.items():
        section = bundle.model_section(model_type)
        if section is not None:
            models[name] = tmp_path / f"{name}.tflite"
            models[name].write_bytes(bundle.read(section))
    manifest = {k: v for k, v in bundle.manifest.items() if k != "sections"}
    too_big = dict(manifest, padding="x" * HEADER_READ)
    (tmp_path / "work").mkdir()
    with pytest.raises(EdgeMtpError, match="more than the 16384 LiteRT-LM reads"):
        write_litertlm(tmp_path / "big.litertlm", models, checked_contract(manifest, "m"),
                       synth_pair / "target" / "tokenizer.json", BundleMetadata(2, [1]), too_big, tmp_path / "work")
