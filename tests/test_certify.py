"""validate certifies what ships: a faithful bundle passes at every recipe, and a bundle validated against a checkpoint
it does not come from fails at every recipe, whatever the defect (tests/defects.py); .litertlm files and ONNX folders
alike.

A faithful bundle runs the whole of validate (no LiteRT-LM run, one short prompt); a defect runs its weights rows
(`weights_only`, a subset of the same verdict, so a full validate fails with them), and the tensor it names is checked,
so a defect cannot pass for another check's failure. The full verdict on defects runs in the CLI tests below."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from defects import DEFECTS, defective_copy
from edge_mtp.checks.validate import STRICT_MTP, validate
from edge_mtp.cli import main

PAIRS_RECIPES = [(pair, recipe) for pair in ("tiny", "demo") for recipe in ("fp32", "int8", "int4")]
PROMPTS = ["The file is"]
# the weight that each defect leaves out of the bundle, as validate names it
NAMED = {"noise": "layers.1.mlp.down_proj.weight", "swapped": "self_attn.o_proj.weight",
         "norm": "layers.1.input_layernorm.weight", "scale": "layers.1.self_attn.q_proj.weight",
         "mismapped": "mlp.gate_proj.weight", "rope": "inv_freq_full"}


@pytest.fixture(scope="session")
def defective(pair_dirs, tmp_path_factory):
    """defective(pair, defect) -> a copy of the pair's target with that defect, made once."""
    made = {}

    def get(pair: str, defect: str):
        if (pair, defect) not in made:
            made[pair, defect] = defective_copy(pair_dirs[pair][0], defect,
                                                tmp_path_factory.mktemp(f"{pair}-{defect}") / "target")
        return made[pair, defect]

    return get


def _failed(report) -> list:
    return [c for c in report.checks if not c.passed]


@pytest.mark.parametrize("pair,recipe", PAIRS_RECIPES)
def test_a_faithful_bundle_passes_and_every_defect_fails(pair, recipe, recipe_bundle, pair_dirs, defective):
    bundle, _ = recipe_bundle(pair, recipe)
    target, assistant = pair_dirs[pair]
    report = validate(bundle, target, assistant, prompts=PROMPTS, max_tokens=4, use_litert_lm=False)
    assert report.passed, [(c.subject, c.detail, c.criterion) for c in _failed(report)]
    weights = [c for c in report.checks if c.kind == "weights"]
    assert {c.subject for c in weights} == {"target", "embedding tables", "drafter"}
    assert all(c.metrics["tensors"] and not c.metrics["problems"] for c in weights)
    if recipe != "fp32":  # the quantized weights were compared in their stored encoding
        assert recipe in weights[0].metrics["tensors"]
    for defect in DEFECTS:
        report = validate(bundle, defective(pair, defect), assistant, prompts=PROMPTS, weights_only=True)
        failed = _failed(report)
        assert failed, (pair, recipe, defect)
        target_row = next(c for c in failed if c.kind == "weights" and c.subject == "target")
        assert any(NAMED[defect] in problem for problem in target_row.metrics["problems"]), target_row.detail


@pytest.mark.parametrize("recipe", ["fp16", "int4-b32", "mixed"])
def test_the_other_recipes_pass_and_their_weights_catch_noise(recipe, recipe_bundle, pair_dirs, defective):
    """fp16 casts, blockwise 4-bit (float16 block scales) and mixed (int4 or int8 per piece) are certified too."""
    bundle, _ = recipe_bundle("tiny", recipe)
    target, assistant = pair_dirs["tiny"]
    report = validate(bundle, target, assistant, prompts=PROMPTS, max_tokens=4, use_litert_lm=False)
    assert report.passed, [(c.subject, c.detail, c.criterion) for c in _failed(report)]
    stored = {k for c in report.checks if c.kind == "weights" for k in c.metrics["tensors"]}
    assert {"fp16": "float16", "int4-b32": "int4-b32", "mixed": "int8"}[recipe] in stored
    noisy = validate(bundle, defective("tiny", "noise"), assistant, weights_only=True)
    assert not noisy.passed and NAMED["noise"] in " ".join(c.detail for c in _failed(noisy))


def test_a_bundle_of_a_defective_checkpoint_fails_against_the_original(synth_pair, pair_dirs, defective, tmp_path):
    """The same mismatch seen from the other side: exported from the noisy copy, validated against the original."""
    from conftest import BUNDLE_CONTEXT, BUNDLE_PREFILL
    from edge_mtp.export.pipeline import export_litert

    out = tmp_path / "noisy.litertlm"
    export_litert(defective("tiny", "noise"), synth_pair / "assistant", out, context=BUNDLE_CONTEXT,
                  prefill=BUNDLE_PREFILL, quant="int4")
    result = CliRunner().invoke(main, ["validate", str(out), "--target", str(synth_pair / "target"),
                                       "--assistant", str(synth_pair / "assistant"), "--max-tokens", "4",
                                       "--no-litert-lm", "--json"])
    assert result.exit_code == 1, result.output[-2000:]
    report = json.loads(result.output[result.output.index("{"):])
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [c["subject"] for c in failed if c["kind"] == "weights"] == ["target"]
    assert "layers.1.mlp.down_proj.weight" in failed[0]["detail"]
    assert failed[0]["reference"] == "the checkpoint rounded by the bundle's recipe"


def test_the_whole_verdict_fails_a_defect_the_graphs_cannot_see(recipe_bundle, pair_dirs, defective):
    """gate and up read from each other's names at int4: every row but the weights may pass; validate still exits 1."""
    bundle, _ = recipe_bundle("demo", "int4")
    result = CliRunner().invoke(main, ["validate", str(bundle), "--target", str(defective("demo", "mismapped")),
                                       "--assistant", str(pair_dirs["demo"][1]), "--max-tokens", "4", "--no-litert-lm",
                                       "--json"])
    assert result.exit_code == 1, result.output[-2000:]
    report = json.loads(result.output[result.output.index("{"):])
    target = next(c for c in report["checks"] if c["kind"] == "weights" and c["subject"] == "target")
    assert not target["passed"] and "another tensor than the one the bundle names for it" in target["detail"]


def test_weights_only_is_the_weights_rows_alone(recipe_bundle, pair_dirs):
    bundle, _ = recipe_bundle("tiny", "int8")
    result = CliRunner().invoke(main, ["validate", str(bundle), "--target", str(pair_dirs["tiny"][0]),
                                       "--assistant", str(pair_dirs["tiny"][1]), "--weights-only", "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.output[result.output.index("{"):])
    assert {c["kind"] for c in report["checks"]} == {"weights"} and len(report["checks"]) == 3


def test_every_row_says_which_reference_it_used_and_why_it_passed(recipe_bundle, pair_dirs):
    bundle, _ = recipe_bundle("demo", "int8")
    report = validate(bundle, *pair_dirs["demo"], prompts=PROMPTS, max_tokens=4, use_litert_lm=False)
    assert report.passed
    for check in report.checks:
        assert check.reference, check.subject
        assert check.criterion or check.kind == "chat", check.subject
    graphs = {c.subject: c for c in report.checks if c.kind == "graph"}
    logits = next(c for s, c in graphs.items() if "decode logits" in s)
    # a quantized bundle is held to what its recipe cost at export, not to the fp32 threshold
    assert "the int8 cost measured at export" in logits.criterion
    assert logits.metrics["relative_error"] > 1e-3
    drafter = next(c for s, c in graphs.items() if "drafter" in s)
    assert drafter.metrics["drafted_token_agreement"] >= 0.5 and "decisions" in drafter.subject
    markdown = report.markdown()
    assert "| reference | criterion |" in markdown and "the checkpoint rounded by the bundle's recipe" in markdown


ONNX_ENCODINGS = {"fp32": "float32", "int8": "int8", "int4": "int4"}  # what each recipe stores a MatMul weight as


@pytest.mark.parametrize("recipe", ONNX_ENCODINGS)
def test_an_onnx_bundle_passes_and_every_defect_fails(recipe, onnx_recipe_bundle, pair_dirs, defective):
    """ONNX initializers are named after the checkpoint's weights and hold them as the recipe rounds them: the faithful
    folder passes the whole verdict, each defect fails its weights rows with the tensor named."""
    bundle = onnx_recipe_bundle(recipe)[0]
    target, assistant = pair_dirs["tiny"]
    report = validate(bundle, target, assistant, prompts=PROMPTS, max_tokens=4)
    assert report.passed, [(c.subject, c.detail, c.criterion) for c in _failed(report)]
    weights = {c.subject: c for c in report.checks if c.kind == "weights"}
    assert set(weights) == {"target", "embedding tables", "drafter"}
    assert all(c.metrics["tensors"] and not c.metrics["problems"] for c in weights.values())
    encoding = ONNX_ENCODINGS[recipe]
    assert encoding in weights["target"].metrics["tensors"] and encoding in weights["drafter"].metrics["tensors"]
    assert weights["embedding tables"].metrics["tensors"] == {f"{encoding} table (256 rows)": 3}
    mtp_rows = [c for c in report.checks if "MTP vs no MTP" in c.subject]
    assert mtp_rows and all(c.passed for c in mtp_rows)
    if recipe == "fp32":  # verify rows give decode bits: no divergence passes
        assert {c.criterion for c in mtp_rows} == {STRICT_MTP}
    for defect in DEFECTS:
        report = validate(bundle, defective("tiny", defect), assistant, weights_only=True)
        failed = _failed(report)
        assert failed and {c.kind for c in report.checks} == {"weights"}, (recipe, defect)
        target_row = next(c for c in failed if c.subject == "target")
        assert any(NAMED[defect] in problem for problem in target_row.metrics["problems"]), target_row.detail
        if defect == "scale" and recipe != "fp32":  # the same codes, other scales
            assert "other quantization scales" in target_row.detail


def test_weights_only_certifies_an_onnx_folder_from_the_cli(onnx_recipe_bundle, pair_dirs, defective, monkeypatch):
    """The weights rows alone, the tables compared in chunks of rows that do not divide the vocabulary."""
    from edge_mtp.checks import onnx_weights

    monkeypatch.setattr(onnx_weights, "TABLE_CHUNK_ROWS", 37)
    bundle = onnx_recipe_bundle("int8")[0]
    args = ["validate", str(bundle), "--assistant", str(pair_dirs["tiny"][1]), "--weights-only", "--json"]
    result = CliRunner().invoke(main, args + ["--target", str(pair_dirs["tiny"][0])])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.output[result.output.index("{"):])
    assert {c["kind"] for c in report["checks"]} == {"weights"} and len(report["checks"]) == 3
    result = CliRunner().invoke(main, args + ["--target", str(defective("tiny", "noise"))])
    assert result.exit_code == 1 and NAMED["noise"] in result.output
