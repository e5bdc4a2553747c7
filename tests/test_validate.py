"""validate passes a good bundle and fails (with the reason) a tampered one; exit codes 0 / 1 / 2."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edge_mtp.checks.validate import validate
from edge_mtp.cli import main
from edge_mtp.export.pipeline import export_bundle
from edge_mtp.model.loading import load_drafter, load_target

from helpers import ShiftedCaches
from conftest import BUNDLE_CONTEXT

PROMPTS = ["Hello world", "abc def"]


def _failed(report) -> list[str]:
    return [f"{c.kind}: {c.subject}" for c in report.checks if not c.passed]


def test_good_bundle_passes_with_json_and_markdown(tiny_bundle, synth_pair, tmp_path):
    path, _ = tiny_bundle
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    result = CliRunner().invoke(main, ["validate", str(path), "--target", str(synth_pair / "target"),
                                       "--assistant", str(synth_pair / "assistant"), "--prompts", str(prompts),
                                       "--max-tokens", "8", "--json", "--report", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.output[result.output.index("{"):])
    kinds = {c["kind"] for c in report["checks"]}
    assert report["passed"] and kinds == {"weights", "graph", "greedy", "acceptance"}
    subjects = " ".join(c["subject"] for c in report["checks"])
    for needle in ("embedder", "per_layer_embedder", "verify", "mtp_drafter", "LiteRT-LM", "transformers assisted"):
        assert needle in subjects
    assert "**Verdict: PASS**" in (tmp_path / "r.md").read_text()


def test_drafter_reading_the_wrong_cache_fails(synth_pair, tmp_path):
    models = load_target(synth_pair / "target")
    drafter = ShiftedCaches(load_drafter(synth_pair / "assistant", models.spec))
    out = tmp_path / "wired-wrong.litertlm"
    export_bundle("litert", models, drafter, out, context=BUNDLE_CONTEXT, prefill=(8,))
    report = validate(out, synth_pair / "target", synth_pair / "assistant", prompts=PROMPTS, max_tokens=8,
                      use_litert_lm=False)
    assert not report.passed
    assert _failed(report) == ["graph: drafter: mtp_drafter decisions (drafted token, scored candidates) + projected "
                               "activations"]


def test_truncated_bundle_exits_2(tiny_bundle, tmp_path):
    path, _ = tiny_bundle
    cut = tmp_path / "cut.litertlm"
    cut.write_bytes(path.read_bytes()[:200_000])
    result = CliRunner().invoke(main, ["validate", str(cut)])
    assert result.exit_code == 2 and "truncated" in result.output


def test_onnx_bundle_validates(tmp_path_factory):
    from edge_mtp.demo import assistant_dir, target_dir
    from test_onnx import demo_fp32_bundle

    out = demo_fp32_bundle(tmp_path_factory)  # the session's demo ONNX bundle: validate checks it here, not its export
    report = validate(out, target_dir(), assistant_dir(), prompts=["The file", "Return the"], max_tokens=8)
    assert report.passed, _failed(report)
    acceptance = next(c for c in report.checks if c.kind == "acceptance")
    assert acceptance.metrics["pytorch"] > 0.3 and acceptance.metrics["bundle"] == acceptance.metrics["pytorch"]


def test_mtp_may_not_diverge_from_plain_on_an_fp32_bundle(onnx_recipe_bundle, monkeypatch):
    """fp32 verify rows give decode bits: MTP equal to plain passes, and one verify logit nudged past its row's best
    fails the row however small the plain run's top-2 gap there, where a quantized bundle would call it a tie."""
    import numpy as np

    from edge_mtp.runtime.api import load
    from edge_mtp.runtime.speculative import SpeculativeDecoder
    from edge_mtp.checks.validate import STRICT_MTP, Report, Thresholds, _Validator

    model = load(onnx_recipe_bundle("fp32")[0])
    ids = model.tokenizer.encode(PROMPTS[0])
    plain = list(model.generate(ids, max_tokens=8, mtp=False))

    def row(costs: dict, noise: float = 0.0):
        report = Report("bundle", Thresholds())
        validator = _Validator(model, None, report.thresholds, report, costs)
        validator.logit_noise = noise
        validator._mtp_vs_plain("MTP vs no MTP", ids, list(model.generate(ids, max_tokens=8)), plain)
        return report.checks[0]

    faithful = row({"recipe": "fp32"})
    assert faithful.passed and faithful.criterion == STRICT_MTP
    verify = SpeculativeDecoder._verify

    def nudged(self, drafts, position):
        out = dict(verify(self, drafts, position))
        logits = out["logits"] = out["logits"].copy()
        first = logits[0, 0]
        first[np.argsort(first)[-2]] = np.nextafter(first.max(), np.inf)  # the runner-up wins by one ulp
        return out

    monkeypatch.setattr(SpeculativeDecoder, "_verify", nudged)
    diverged = row({"recipe": "fp32"})
    assert not diverged.passed and diverged.criterion == STRICT_MTP
    gaps = [d["top2_gap"] for d in diverged.metrics["divergences"]]
    assert gaps and "MTP diverges at token" in diverged.detail
    assert row({"recipe": "int8"}, noise=max(gaps)).passed  # the same divergence is a tie within quantization noise
