"""The static GPU-delegability check (edge_mtp.runtime.gpu_check), and that our bundles pass it; no GPU needed.

That the check agrees with the real delegate is tested on the software Vulkan device in test_gpu.py.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from edge_mtp.cli import main
from edge_mtp.runtime.gpu_check import check_bundle, check_model

from gpu_legacy import legacy_attention_model


def test_every_op_of_every_signature_of_our_bundle_is_gpu_delegable(tiny_bundle):
    reports = check_bundle(tiny_bundle[0])
    assert set(reports) == {"embedder", "per_layer_embedder", "target", "drafter"}
    assert set(reports["target"]) == {"prefill_8", "prefill_16", "decode", "verify"}
    for model, signatures in reports.items():
        for signature, report in signatures.items():
            assert report.total > 0 and report.findings == [], (model, signature, report.findings[:3])


def test_the_pre_gpu_attention_forms_are_flagged_with_their_reasons(tmp_path):
    report = check_model(legacy_attention_model(tmp_path).read_bytes())["serving_default"]
    reasons = {f.op: f.reason for f in report.findings}
    assert set(reasons) == {"BROADCAST_TO", "GATHER_ND", "RESHAPE", "TRANSPOSE"}
    assert reasons["GATHER_ND"] == "operation is not supported"
    assert "has rank 5 (at most 4)" in reasons["TRANSPOSE"]
    assert report.delegated == report.total - len(report.findings) < report.total


def test_inspect_gpu_check_lists_refused_ops_per_signature(tiny_bundle, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["inspect", "--gpu-check", str(tiny_bundle[0])])
    assert ok.exit_code == 0, ok.output
    assert "target/decode: every op delegable" in ok.output
    data = json.loads(runner.invoke(main, ["inspect", "--gpu-check", "--json", str(tiny_bundle[0])]).output)
    assert data["target"]["verify"]["delegated"] == data["target"]["verify"]["total"] > 0
    missing = runner.invoke(main, ["inspect", "--gpu-check", str(tmp_path / "none.litertlm")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ") and "Traceback" not in missing.output
