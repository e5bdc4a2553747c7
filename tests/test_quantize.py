"""Quantization recipes in both formats, on the trained demo pair (so acceptance means something): every quantized
bundle runs MTP with greedy output equal to its own plain output, sizes shrink as the recipe says, and the
quantization report holds measured numbers (acceptance equal to what the loop gives when rerun)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DEMO_CONTEXT
from helpers import assert_verify_rows_are_decodes
from test_onnx import DEMO_CONTEXT as CONTEXT, PREFILL, demo_fp32_bundle
from edge_mtp import demo
from edge_mtp.bundle import open_bundle
from edge_mtp.bundle.onnx_folder import MANIFEST, read_manifest
from edge_mtp.export.driver import MIXED_SENSITIVITY
from edge_mtp.export.onnx_quantize import graph_bytes, weight_bytes
from edge_mtp.export.onnx_requantize import quantize_onnx_bundle
from edge_mtp.export.options import INT8_KV_REASON, RECIPES, check_recipe
from edge_mtp.export.pipeline import export_onnx
from edge_mtp.runtime.backends.ort import OnnxBackend
from edge_mtp.runtime.speculative import SpeculativeDecoder, generate_tokens
from edge_mtp.util.errors import EdgeMtpError

PROMPTS = ["The quick brown fox", "def main():", "import os"]
ONNX_BY_QUANTIZING = ("fp16", "int8", "int4-b32", "int4-b64", "int4-b128", "mixed")  # from the fp32 bundle, no re-export
ONNX_RECIPES = ("int4",) + ONNX_BY_QUANTIZING  # int4 goes through export_onnx(quant=...) itself; int4-b32 is the
# same recipe by quantizing, so the two bundles must be the same graphs with the same weight bytes
# the target's matmul weight bytes, at most this fraction of fp32
WEIGHT_RATIO = {"fp16": 0.51, "int8": 0.27, "int4": 0.35, "int4-b32": 0.35, "int4-b64": 0.35, "int4-b128": 0.35, "mixed": 0.35}

pytestmark = pytest.mark.skipif(not (demo.target_dir() / "model.safetensors").is_file(),
                                reason="the demo pair is not shipped here")


@pytest.fixture(scope="module")
def onnx_bundles(tmp_path_factory) -> dict:
    """The demo pair as an fp32 ONNX bundle (shared with test_onnx), one int4 export, and the other recipes quantized
    from the fp32 one."""
    root = tmp_path_factory.mktemp("quant-onnx")
    out = {"fp32": demo_fp32_bundle(tmp_path_factory), "int4": root / "int4"}
    export_onnx(demo.target_dir(), demo.assistant_dir(), out["int4"], context=CONTEXT, prefill=PREFILL, check=False,
                quant="int4")
    for recipe in ONNX_BY_QUANTIZING:
        out[recipe] = root / recipe
        quantize_onnx_bundle(out["fp32"], out[recipe], recipe)
    return out


def _loop_acceptance(backend, prompts, max_tokens) -> float:
    accepted = drafted = 0
    for prompt in prompts:
        _, stats = generate_tokens(backend, prompt, max_tokens=max_tokens)
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    return accepted / drafted


def _greedy(backend, tokenizer, mtp):
    return [generate_tokens(backend, tokenizer.encode(p), max_tokens=24, mtp=mtp)[0] for p in PROMPTS]


@pytest.mark.parametrize("recipe", ONNX_RECIPES)
def test_onnx_recipe_runs_mtp_like_plain(onnx_bundles, recipe):
    bundle = onnx_bundles[recipe]
    backend = OnnxBackend(bundle, threads=1)  # also checks every file against the manifest's sha256
    tokenizer = open_bundle(bundle).tokenizer
    mtp, plain = _greedy(backend, tokenizer, True), _greedy(backend, tokenizer, False)
    for prompt, a, b in zip(PROMPTS, mtp, plain):
        _assert_equal_or_near_tie(backend, tokenizer.encode(prompt), a, b)
    assert read_manifest(bundle)["quantization"] == recipe


def _assert_equal_or_near_tie(backend, prompt, mtp, plain, tie=0.02):
    """MTP output equals plain output, or first differs where plain decoding's top-2 logits are a near-tie.

    A quantized target's verify (T = G+1 rows) and decode (T = 1) run different kernels whose rounding differs;
    with integer weights that can flip the argmax where two logits nearly tie (fp32 bundles stay exact).
    """
    if mtp == plain:
        return
    at = next(i for i, (x, y) in enumerate(zip(mtp, plain)) if x != y)
    decoder = SpeculativeDecoder(backend)
    backend.reset()
    sequence = list(prompt) + plain[:at]
    decoder.prefill(sequence[:-1])
    row = decoder.step("decode", [sequence[-1]], len(sequence) - 1)["logits"][0, 0]
    top = np.sort(row)[-2:]
    assert top[1] - top[0] <= tie * np.abs(row).max(), (at, top, mtp, plain)


@pytest.mark.parametrize("recipe", ONNX_RECIPES)
def test_onnx_sizes_shrink(onnx_bundles, recipe):
    fp32, bundle = onnx_bundles["fp32"], onnx_bundles[recipe]
    want = weight_bytes(fp32 / "target.onnx")["matmul"]
    got = weight_bytes(bundle / "target.onnx")["matmul"]
    assert 0 < got <= WEIGHT_RATIO[recipe] * want, (recipe, got, want)
    if recipe.startswith("int4"):  # the size bound alone would pass a silent fall-back to int8
        import onnx

        graph = onnx.load(str(bundle / "target.onnx"), load_external_data=False).graph
        blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
        assert blocks == {int(recipe.split("-b")[1]) if "-b" in recipe else 32}, (recipe, blocks)
    report = read_manifest(bundle)["quantization_report"]
    for model, row in report["components"].items():
        assert row["bytes"] == graph_bytes(bundle / f"{model}.onnx")
        if recipe in ONNX_BY_QUANTIZING:  # measured against the fp32 bundle's own graphs
            assert row["fp32_bytes"] == graph_bytes(fp32 / f"{model}.onnx")
        else:  # the export's fp32 pieces, before they were joined (a few hundred bytes of graph apart)
            assert abs(row["fp32_bytes"] - graph_bytes(fp32 / f"{model}.onnx")) <= 0.01 * row["fp32_bytes"]
        assert row["bytes"] < row["fp32_bytes"]
    if recipe in ONNX_BY_QUANTIZING:
        assert report["components"]["target"]["fp32_matmul_weight_bytes"] == want
    total = {r: sum(graph_bytes(onnx_bundles[r] / f"{m}.onnx") for m in report["components"])
             for r in ("fp32", "fp16", "int8", "int4")}
    assert total["int4"] < total["int8"] < total["fp16"] < total["fp32"]


@pytest.mark.parametrize("recipe", ONNX_RECIPES)
def test_onnx_report_is_measured(onnx_bundles, recipe):
    manifest = json.loads((onnx_bundles[recipe] / MANIFEST).read_text())
    report = manifest["quantization_report"]
    assert report["logit_relative_error"] > 0 and 0 < report["top1_agreement"] <= 1
    prompts, max_tokens = report["prompt_token_ids"], report["max_tokens"]
    assert len(prompts) == report["prompts"] >= 3
    if recipe not in ONNX_BY_QUANTIZING:  # an export: measured against the streamed PyTorch reference, as in LiteRT
        assert report["reference"] == "streamed PyTorch fp32"
        assert report["logit_relative_error"] > 1e-3 and report["top1_agreement"] >= 0.8
        assert 0.6 <= report["drafter_top1_agreement"] <= 1
        return
    quantized = _loop_acceptance(OnnxBackend(onnx_bundles[recipe], threads=1), prompts, max_tokens)
    fp32 = _loop_acceptance(OnnxBackend(onnx_bundles["fp32"], threads=1), prompts, max_tokens)
    assert report["drafter_acceptance_quantized"] == pytest.approx(quantized, abs=1e-12)
    assert report["drafter_acceptance_fp32"] == pytest.approx(fp32, abs=1e-12)
    assert 0 < quantized <= 1
    if recipe.startswith("int4"):
        assert report["logit_relative_error"] > 1e-3  # 4 bits really changed the logits


def _graph(path) -> tuple[dict, list]:
    """A graph's initializers (name -> dims, type, stored bytes) and nodes (name, op, inputs, outputs, attributes)."""
    import onnx

    from edge_mtp.export.onnx_data import stored_bytes

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name: (list(i.dims), i.data_type, stored_bytes(i, path.parent)) for i in graph.initializer}
    nodes = sorted((n.name, n.op_type, list(n.input), list(n.output), [str(a) for a in n.attribute])
                   for n in graph.node)
    return weights, nodes


def test_quantizing_fp32_gives_what_exporting_at_the_recipe_gives(onnx_bundles):
    """`quantize` rewrites a finished bundle one weight group at a time; the result must be the export's own format,
    weight for weight: every graph has the same nodes and the same initializers, byte for byte (tables included)."""
    for model in read_manifest(onnx_bundles["int4"])["models"]:
        exported = _graph(onnx_bundles["int4"] / f"{model}.onnx")
        quantized = _graph(onnx_bundles["int4-b32"] / f"{model}.onnx")
        assert quantized[0].keys() == exported[0].keys(), model
        assert [n for n in exported[0] if quantized[0][n] != exported[0][n]] == [], model
        assert quantized[1] == exported[1], model


def test_onnx_error_grows_as_bits_shrink(onnx_bundles):
    error = {r: read_manifest(onnx_bundles[r])["quantization_report"]["logit_relative_error"]
             for r in ("fp16", "int8", "int4")}
    assert error["fp16"] < error["int8"] < error["int4"]


def test_onnx_mixed_is_decided_per_component(onnx_bundles):
    components = read_manifest(onnx_bundles["mixed"])["quantization_report"]["components"]
    assert components["drafter"]["recipe"] == "int8" and "int4_error" not in components["drafter"]
    for model in ("embedder", "per_layer_embedder", "target"):
        row = components[model]
        assert row["int4_error"] > 0
        assert row["recipe"] == ("int4" if row["int4_error"] <= MIXED_SENSITIVITY else "int8")
    assert components["embedder"]["recipe"] == components["per_layer_embedder"]["recipe"] == "int4"


def test_int8_kv_recipe_points_to_the_kv_cache_option(onnx_bundles, tmp_path):
    with pytest.raises(EdgeMtpError, match="int8-kv.*--kv-cache int8") as info:
        check_recipe("int8-kv")
    assert str(info.value) == INT8_KV_REASON and "fp32" in INT8_KV_REASON
    with pytest.raises(EdgeMtpError, match="int8-kv"):
        export_onnx(demo.target_dir(), demo.assistant_dir(), tmp_path / "x", context=CONTEXT, prefill=PREFILL,
                    quant="int8-kv")
    with pytest.raises(EdgeMtpError, match="int8-kv"):
        quantize_onnx_bundle(onnx_bundles["fp32"], tmp_path / "y", "int8-kv")
    with pytest.raises(EdgeMtpError, match="Unknown quantization recipe 'int3'"):
        quantize_onnx_bundle(onnx_bundles["fp32"], tmp_path / "z", "int3")
    assert not list(tmp_path.iterdir())


def test_quantizing_a_quantized_bundle_is_refused(onnx_bundles, tmp_path):
    with pytest.raises(EdgeMtpError, match="already quantized"):
        quantize_onnx_bundle(onnx_bundles["int8"], tmp_path / "again", "int4")


# -- LiteRT ---------------------------------------------------------------------------------------------------------

LITERT_RECIPES = ("int4", "mixed")


@pytest.fixture(scope="module")
def litert_bundles(recipe_bundle) -> dict:
    return {r: recipe_bundle("demo", r) for r in LITERT_RECIPES}


@pytest.mark.parametrize("recipe", LITERT_RECIPES)
def test_litert_recipe_runs_in_litert_lm_and_reports(litert_bundles, recipe):
    from edge_mtp.runtime.litertlm_engine import run_litertlm

    path, summary = litert_bundles[recipe]
    on = run_litertlm(path, PROMPTS, max_tokens=24, context=DEMO_CONTEXT, mtp=True)
    off = run_litertlm(path, PROMPTS, max_tokens=24, context=DEMO_CONTEXT, mtp=False)
    assert on.supports_mtp and on.success_rate is not None
    # LiteRT-LM 0.18.1 with MTP emits a verify round's accepted drafts even past max_output_tokens, so its text can
    # run a few tokens longer; up to the plain run's length it must be the same text.
    for with_mtp, plain in zip(on.texts, off.texts):
        assert with_mtp.startswith(plain) and len(plain) > 10, (with_mtp, plain)
    report = summary.quantization
    # measured against the streamed fp32 PyTorch reference along the bundle's own greedy continuation
    assert report["reference"] == "streamed PyTorch fp32"
    assert 1e-3 < report["logit_relative_error"] < 0.5 and report["top1_agreement"] >= 0.8
    assert report["drafter_top1_agreement"] >= 0.6
    components = report["components"]
    assert {"embedder", "per_layer_embedder", "prelude", "head", "drafter"} <= set(components)
    for name, row in components.items():
        assert row["fp32_error"] <= 1e-4 and row["bytes"] < row["fp32_bytes"], (name, row)
    layers = [row for name, row in components.items() if name.startswith("layer_")]
    if recipe == "int4":
        assert all(row["recipe"] == "int4" for row in components.values())
        assert sum(r["bytes"] for r in layers) <= 0.2 * sum(r["fp32_bytes"] for r in layers)
    else:
        assert components["drafter"]["recipe"] == "int8"
        assert all(row["recipe"] in ("int4", "int8") for row in components.values())
        for name, row in components.items():  # 'mixed' keeps 4 bits exactly where their measured error allows
            if name != "drafter":
                assert (row["recipe"] == "int4") == (row["int4_error"] <= MIXED_SENSITIVITY), (name, row)
    target_pieces = [row["recipe"] for name, row in components.items() if name in ("prelude", "head") or
                     name.startswith("layer_")]
    assert _weight_types(path) == set(target_pieces)


@pytest.mark.parametrize("recipe", LITERT_RECIPES)
def test_litert_verify_rows_are_decodes_and_mtp_output_is_plain_output(litert_bundles, recipe):
    from edge_mtp.runtime.backends.litert import LiteRTBackend

    path, _ = litert_bundles[recipe]
    tokenizer = open_bundle(path).tokenizer
    # before and past the sliding window (64)
    assert_verify_rows_are_decodes(LiteRTBackend(path), (20, 70, 130), [tokenizer.encode(p) for p in PROMPTS], 96)


def _weight_types(bundle) -> set[str]:
    """Integer weight types in a bundle's target model (what the recipe really wrote, not what it claims)."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edge_mtp.bundle.litertlm import read_litertlm

    file = read_litertlm(bundle)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(file.read(file.model_section("tf_lite_prefill_decode"))))
    names = {9: "int8", 17: "int4"}
    return {names[t.type] for sg in model.subgraphs for t in sg.tensors if t.buffer and t.type in names}


def test_every_recipe_name_is_exercised():
    assert set(RECIPES) - {"fp32"} <= set(ONNX_RECIPES) | set(LITERT_RECIPES)


def test_auto_is_int4_from_one_billion_target_parameters():
    from edge_mtp.export.options import AUTO, resolve_recipe
    from edge_mtp.checkpoint.spec import preset_pair

    assert resolve_recipe(AUTO, preset_pair("e2b")[0]) == "int4"
    assert resolve_recipe(AUTO, preset_pair("tiny")[0]) == "int8"
    assert resolve_recipe("int4-b64", preset_pair("e2b")[0]) == "int4-b64"
