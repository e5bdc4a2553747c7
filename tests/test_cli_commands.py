"""Commands and options that only the library was tested through: export --format onnx --no-assistant --json,
quantize and distill, driven through the CLI itself (in process) on the tiny synthetic pair."""

from __future__ import annotations

import json
import math

from click.testing import CliRunner

from edge_mtp.bundle import open_bundle
from edge_mtp.cli import main
from helpers import assert_only_progress
from test_quiet import OPSET_NOTICE


def _invoke(*args: str) -> dict:
    """Run a command with --json; it must succeed and print exactly one JSON object on stdout."""
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_export_onnx_without_assistant_then_quantize_and_run(synth_pair, tmp_path):
    fp32 = tmp_path / "onnx"
    exported = CliRunner().invoke(main, ["export", "--target", str(synth_pair / "target"), "--no-assistant", "--format",
                                         "onnx", "--out", str(fp32), "--context", "64", "--prefill", "8", "--quant",
                                         "fp32", "--json"])
    assert exported.exit_code == 0, exported.output
    assert_only_progress(exported.stderr)
    summary = json.loads(exported.stdout)
    # no assistant: no drafter model, and the target has no verify signature to serve it
    assert summary["signatures"]["target"] == ["prefill_8", "decode"] and "drafter" not in summary["signatures"]
    assert max(summary["checks"].values()) <= 1e-4
    bundle = open_bundle(fp32)
    assert set(bundle.models) == {"embedder", "per_layer_embedder", "target"} and bundle.contract.drafter is None
    assert not (fp32 / "drafter.onnx").exists()

    result = CliRunner().invoke(main, ["quantize", str(fp32), "--out", str(tmp_path / "int8"), "--quant", "int8"])
    assert result.exit_code == 0, result.output
    assert_only_progress(result.stderr)
    quantized = open_bundle(tmp_path / "int8")
    report = quantized.manifest["quantization_report"]
    assert quantized.manifest["quantization"] == "int8" and report["top1_agreement"] >= 0.8
    target = report["components"]["target"]
    assert target["recipe"] == "int8" and target["matmul_weight_bytes"] <= 0.27 * target["fp32_matmul_weight_bytes"]
    # int4 raises the graphs to opset 21: onnxruntime warns once per weight group, the user reads one line of ours
    result = CliRunner().invoke(main, ["quantize", str(fp32), "--out", str(tmp_path / "int4"), "--quant", "int4"])
    assert result.exit_code == 0, result.output
    assert_only_progress(result.stderr)
    notices = [ln for ln in result.stderr.splitlines() if "opset 21" in ln]
    assert len(notices) == 1 and notices[0].startswith(OPSET_NOTICE), result.stderr

    ran = _invoke("run", str(tmp_path / "int8"), "--prompt-ids", "2,5,7", "--max-tokens", "4")
    assert len(ran["tokens"]) == 4 and ran["stats"]["drafted"] == 0  # plain decoding: nothing to draft with


def test_distill_writes_an_assistant_that_pairs_with_the_target(synth_pair, tmp_path):
    from edge_mtp.model.loading import load_drafter, load_target

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\ndef main():\nimport os\n")
    out = tmp_path / "assistant"
    result = _invoke("distill", "--target", str(synth_pair / "target"), "--out", str(out), "--prompts", str(prompts),
                     "--steps", "2", "--batch", "2", "--seq-len", "24", "--draft-len", "2")
    assert result["steps"] == 2 and len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert 0.0 <= result["acceptance_after"] <= 1.0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_assistant"
    assert json.loads((out / "generation_config.json").read_text())["num_assistant_tokens"] == 2  # --draft-len
    target = load_target(synth_pair / "target")
    drafter = load_drafter(out, target.spec)  # loads only if it pairs with the target (check_pair)
    assert drafter.spec.backbone_hidden_size == target.spec.hidden_size
