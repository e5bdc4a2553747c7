"""The bad-input catalogue: every command, given a broken checkpoint, bundle, option or prompt, exits non-zero with
one `error:` sentence as the last line on stderr, no traceback, and leaves nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edge_mtp.bundle.litertlm import read_litertlm
from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.checkpoint.synth import write_drafter
from edge_mtp.cli import main

from bundle_tools import flip, rewrap, with_container_version

SECTIONS = {"embedder": "tf_lite_embedder", "per-layer-embedder": "tf_lite_per_layer_embedder",
            "target": "tf_lite_prefill_decode", "drafter": "tf_lite_mtp_drafter", "tokenizer": "hf_tokenizer",
            "llm-metadata": "llm_metadata", "executor-metadata": "executor_metadata"}


def _config_variant(pair: Path, root: Path, name: str, edit) -> Path:
    """A copy of the tiny target's config (no weights needed for config-level refusals) after `edit`."""
    out = root / f"config-{name}"
    out.mkdir()
    cfg = json.loads((pair / "target" / "config.json").read_text())
    text = edit(cfg)
    (out / "config.json").write_text(text if isinstance(text, str) else json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def inputs(tiny_bundle, synth_pair, tmp_path_factory) -> dict[str, Path]:
    """Every broken input of the catalogue, built once from the session's tiny bundle and pair."""
    root = tmp_path_factory.mktemp("bad-inputs")
    bundle = tiny_bundle[0]
    parsed = read_litertlm(bundle)
    p: dict[str, Path] = {"bundle": bundle, "pair": synth_pair, "target": synth_pair / "target",
                          "assistant": synth_pair / "assistant"}
    for name, kind in SECTIONS.items():
        section = parsed.model_section(kind) or next(s for s in parsed.sections if s.data_type == kind)
        p[f"corrupt-{name}"] = flip(bundle, root / f"corrupt-{name}.litertlm", (section.begin + section.end) // 2)
    data = bundle.read_bytes()
    for name, content in (("half", data[: len(data) // 2]), ("minus-one", data[:-1]), ("empty", b""),
                          ("junk", b"not a bundle at all" * 4), ("header-only", data[:40])):
        p[name] = root / f"{name}.litertlm"
        p[name].write_bytes(content)
    p["newer-container"] = with_container_version(bundle, root / "newer-container.litertlm", 2)
    p["newer-manifest"] = rewrap(bundle, root / "newer-manifest.litertlm", lambda m: m.update(format_version=99))
    p["huge-context"] = rewrap(bundle, root / "huge-context.litertlm", lambda m: m.update(context=1 << 40))
    p["not-a-bundle-dir"] = root / "plain-folder"
    p["not-a-bundle-dir"].mkdir()
    p["empty-prompts"] = root / "empty.txt"
    p["empty-prompts"].write_text("\n  \n")
    p["binary-prompts"] = root / "binary.txt"
    p["binary-prompts"].write_bytes(b"\xff\xfe\x00\x81" * 10)
    p["a-file"] = root / "a-file"
    p["a-file"].write_text("x")
    p["stranger-dir"] = root / "stranger"
    (p["stranger-dir"] / "target").mkdir(parents=True)
    (p["stranger-dir"] / "target" / "notes.txt").write_text("mine")
    for name, edit in (("invalid-json", lambda c: "{not json"), ("a-list", lambda c: "[1, 2]"),
                       ("llama", lambda c: c.update(model_type="llama")),
                       ("moe", lambda c: c.update(enable_moe_block=True)),
                       ("no-hidden-size", lambda c: c.pop("hidden_size")),
                       ("hidden-size-text", lambda c: c.update(hidden_size="sixty-four")),
                       ("negative-vocab", lambda c: c.update(vocab_size=-5)),
                       ("billion-layers", lambda c: (c.pop("layer_types"), c.update(num_hidden_layers=10 ** 9))),
                       ("endless-positions", lambda c: c.update(max_position_embeddings=10 ** 15))):
        p[name] = _config_variant(synth_pair, root, name, edit)
    p["not-utf8"] = root / "config-not-utf8"
    p["not-utf8"].mkdir()
    (p["not-utf8"] / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    p["folder-litertlm"] = root / "folder.litertlm"
    p["folder-litertlm"].mkdir()
    p["truncated-weights"] = shutil.copytree(synth_pair / "target", root / "truncated-weights")
    weights = p["truncated-weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    p["missing-tensor"] = shutil.copytree(synth_pair / "target", root / "missing-tensor")
    tensors = load_file(p["missing-tensor"] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, p["missing-tensor"] / "model.safetensors")
    mqa_target, mqa_drafter = preset_pair("tiny-mqa")
    write_drafter(root / "mqa-assistant", mqa_drafter, mqa_target, seed=1)
    p["mqa-assistant"] = root / "mqa-assistant"
    return p


# (id, command line with {placeholders} for inputs and {out} for a fresh output path, fragment of the error)
CASES = [
    # run: options and prompts, checked before any model work
    ("run-temperature", "run {bundle} --temperature -1", "Temperature must be 0 (greedy) or positive"),
    ("run-top-p-above-1", "run {bundle} --top-p 2", "Top-p must be in (0, 1]"),
    ("run-top-p-zero", "run {bundle} --top-p 0", "Top-p must be in (0, 1]"),
    ("run-max-tokens", "run {bundle} --max-tokens -3", "must be at least 1, not -3"),
    ("run-top-k", "run {bundle} --top-k -1", "Top-k must be 0 (off)"),
    ("run-seed-negative", "run {bundle} --temperature 0.7 --seed -5", "'--seed': -5 is not in the range"),
    ("run-draft-len-zero", "run {bundle} --draft-len 0", "'--draft-len': 0 is not in the range"),
    ("run-draft-len-beyond-bundle", "run {bundle} --draft-len 9", "Draft length 9 is not available"),
    ("run-prompt-ids-oov", "run {bundle} --prompt-ids 5,300", "Prompt token id 300 is outside the model's vocabulary"),
    ("run-prompt-ids-negative", "run {bundle} --prompt-ids 5,-2", "negative id -2"),
    ("run-prompt-ids-text", "run {bundle} --prompt-ids 5,x", "--prompt-ids takes comma-separated integers"),
    ("run-prompt-ids-empty", "run {bundle} --prompt-ids=", "--prompt-ids takes comma-separated integers"),
    ("run-prompt-too-long", "run {bundle} --prompt-ids " + ",".join(["5"] * 70), "the bundle's context is 64"),
    ("run-backend-onnx-on-litertlm", "run {bundle} --backend onnx", "is a LiteRT bundle"),
    ("run-accelerator-unknown", "run {bundle} --accelerator tpu", "Invalid value for '--accelerator'"),
    ("run-missing-bundle", "run {out}.litertlm", "does not exist"),
    ("run-folder-not-bundle", "run {not-a-bundle-dir}", "has no manifest.json"),
    # bundles: corrupted in each section, truncated, empty, foreign, newer
    *[(f"run-corrupt-{name}", f"run {{corrupt-{name}}}", f"the {kind} section does not match")
      for name, kind in SECTIONS.items()],
    ("run-truncated-half", "run {half}", "is truncated or corrupt"),
    ("run-truncated-one-byte", "run {minus-one}", "is truncated or corrupt"),
    ("run-empty-file", "run {empty}", "is not a .litertlm bundle"),
    ("run-header-only", "run {header-only}", "is truncated or corrupt"),
    ("run-junk", "run {junk}", "is not a .litertlm bundle"),
    ("run-newer-container", "run {newer-container}", "container of version 2"),
    ("run-newer-manifest", "run {newer-manifest}", "written by a newer edge-mtp"),
    ("run-huge-context", "run {huge-context}", "context = 1099511627776 is not an integer"),
    # inspect
    ("inspect-missing", "inspect {out}", "does not exist"),
    ("inspect-corrupt-drafter", "inspect {corrupt-drafter}", "the tf_lite_mtp_drafter section does not match"),
    ("inspect-truncated", "inspect {half}", "is truncated or corrupt"),
    ("inspect-empty", "inspect {empty}", "is not a .litertlm bundle"),
    ("inspect-config-invalid-json", "inspect {invalid-json}", "is not valid JSON"),
    ("inspect-config-a-list", "inspect {a-list}", "holds a JSON list, not an object"),
    ("inspect-config-not-utf8", "inspect {not-utf8}", "is not a UTF-8 JSON text"),
    ("inspect-config-llama", "inspect {llama}", "model_type 'llama' is not a Gemma 4 text model"),
    ("inspect-config-moe", "inspect {moe}", "Mixture-of-Experts"),
    ("inspect-config-no-hidden-size", "inspect {no-hidden-size}", "required entry 'hidden_size' is missing"),
    ("inspect-config-hidden-size-text", "inspect {hidden-size-text}", "an entry has a value of the wrong type"),
    ("inspect-config-negative-vocab", "inspect {negative-vocab}", "vocab_size = -5 is not an integer"),
    ("inspect-config-billion-layers", "inspect {billion-layers}", "num_hidden_layers 1000000000 is not between"),
    # validate
    ("validate-max-tokens", "validate {bundle} --max-tokens 0", "'--max-tokens': 0 is not in the range"),
    ("validate-min-top1", "validate {bundle} --min-top1 2", "'--min-top1': 2.0 is not in the range"),
    ("validate-empty-prompts", "validate {bundle} --prompts {empty-prompts}", "holds no prompt"),
    ("validate-binary-prompts", "validate {bundle} --prompts {binary-prompts}", "cannot be read as UTF-8 text"),
    ("validate-report-is-a-folder", "validate {bundle} --report {not-a-bundle-dir}", "is an existing folder"),
    ("validate-missing-bundle", "validate {out}.litertlm", "does not exist"),
    ("validate-corrupt-target", "validate {corrupt-target}", "the tf_lite_prefill_decode section does not match"),
    # bench
    ("bench-max-tokens", "bench {bundle} --max-tokens 0", "'--max-tokens': 0 is not in the range"),
    ("bench-empty-prompts", "bench {bundle} --prompts {empty-prompts}", "holds no prompt"),
    ("bench-plot-under-a-file", "bench {bundle} --plot {a-file}/plot.png", "is a file, not a folder"),
    ("bench-corrupt-drafter", "bench {corrupt-drafter}", "the tf_lite_mtp_drafter section does not match"),
    # distill
    ("distill-steps", "distill --target {target} --out {out} --steps 0", "'--steps': 0 is not in the range"),
    ("distill-lr", "distill --target {target} --out {out} --lr 0", "'--lr': 0.0 is not in the range"),
    ("distill-seq-len", "distill --target {target} --out {out} --seq-len 10", "must exceed the prompt length"),
    ("distill-out-is-a-file", "distill --target {target} --out {a-file}", "is a file"),
    ("distill-nothing-to-resume", "distill --target {target} --out {out} --resume", "Nothing to resume"),
    ("distill-missing-target", "distill --target {out}/none --out {out}", "does not exist"),
    ("distill-broken-config", "distill --target {moe} --out {out}", "Mixture-of-Experts"),
    ("distill-missing-data", "distill --target {target} --out {out} --data {out}/none.jsonl", "does not exist"),
    ("distill-train-without-shards", "distill train --shards {out}/none --out {out}", "holds no prepared shards"),
    # quantize
    ("quantize-litert-bundle", "quantize {bundle} --out {out} --quant int8",
     "LiteRT bundles are quantized at export (edge-mtp export --quant"),
    ("quantize-not-a-bundle", "quantize {not-a-bundle-dir} --out {out} --quant int8", "has no manifest.json"),
    ("quantize-unknown-recipe", "quantize {not-a-bundle-dir} --out {out} --quant int3",
     "Unknown quantization recipe 'int3'"),
    ("quantize-auto", "quantize {not-a-bundle-dir} --out {out} --quant auto", "Recipe 'auto' is for export"),
    ("quantize-out-is-a-file", "quantize {not-a-bundle-dir} --out {a-file} --quant int8", "is a file"),
    # synth
    ("synth-unknown-preset", "synth --preset huge --out {out}", "Unknown preset 'huge'"),
    ("synth-out-is-a-file", "synth --out {a-file}", "is a file"),
    ("synth-seed-negative", "synth --out {out} --seed -1", "'--seed': -1 is not in the range"),
    ("synth-shard-size", "synth --out {out} --shard-size 0", "'--shard-size': 0 is not in the range"),
    ("synth-would-replace-a-stranger", "synth --out {stranger-dir}", "is not a checkpoint folder"),
    # export: option checks before any model is loaded, then checkpoint problems
    ("export-draft-len", "export --target {target} --assistant {assistant} --out {out}.litertlm --draft-len 0",
     "--draft-len must be at least 1"),
    ("export-context", "export --target {target} --assistant {assistant} --out {out}.litertlm --context 8",
     "--context 8 is smaller than the longest prefill"),
    ("export-context-beyond-the-checkpoint",
     "export --target {target} --assistant {assistant} --out {out}.litertlm --context 100000000",
     "--context 100000000 exceeds the 131072 positions the target supports (max_position_embeddings"),
    ("export-context-beyond-memory",
     "export --target {endless-positions} --assistant {assistant} --out {out}.litertlm --context 10000000000",
     "GiB for the KV caches and masks, more than the"),
    ("export-prefill-text", "export --target {target} --assistant {assistant} --out {out}.litertlm --prefill a,b",
     "--prefill takes comma-separated token counts"),
    ("export-prefill-zero", "export --target {target} --assistant {assistant} --out {out}.litertlm --prefill 0",
     "--prefill needs at least one positive length"),
    ("export-quant", "export --target {target} --assistant {assistant} --out {out}.litertlm --quant int3",
     "Unknown quantization recipe 'int3'"),
    ("export-quant-int8-kv", "export --target {target} --assistant {assistant} --out {out}.litertlm --quant int8-kv",
     "int8-kv"),
    ("export-kv-cache-int8-gpu",
     "export --target {target} --assistant {assistant} --out {out}.litertlm --kv-cache int8 --gpu",
     "--kv-cache int8 cannot be combined with --gpu"),
    ("export-kv-cache-int8-onnx", "export --format onnx --target {target} --assistant {assistant} --out {out} "
     "--kv-cache int8", "--kv-cache int8 is for LiteRT bundles"),
    ("export-out-is-a-folder", "export --target {target} --assistant {assistant} --out {not-a-bundle-dir}",
     "should end in .litertlm"),
    ("export-out-existing-folder", "export --target {target} --assistant {assistant} --out {folder-litertlm}",
     "is an existing folder"),
    ("export-out-under-a-file", "export --target {target} --assistant {assistant} --out {a-file}/m.litertlm",
     "is a file, not a folder"),
    ("export-onnx-out-is-a-file", "export --format onnx --target {target} --assistant {assistant} --out {a-file}",
     "is a file"),
    ("export-target-without-assistant", "export --target {target} --out {out}.litertlm", "--assistant is required"),
    ("export-missing-target", "export --target {out}/none --assistant {assistant} --out {out}.litertlm",
     "does not exist"),
    ("export-unsupported-config", "export --target {moe} --assistant {assistant} --out {out}.litertlm",
     "Mixture-of-Experts"),
    ("export-truncated-weights", "export --target {truncated-weights} --assistant {assistant} --out {out}.litertlm",
     "truncated"),
    ("export-missing-tensor", "export --target {missing-tensor} --assistant {assistant} --out {out}.litertlm",
     "lacks tensor model.layers.1.mlp.up_proj.weight"),
    ("export-mismatched-pair", "export --target {target} --assistant {mqa-assistant} --out {out}.litertlm",
     "does not belong to this target"),
]


def _listing(*roots: Path) -> set[str]:
    return {str(p) for root in roots if root.exists() for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(case, inputs, tmp_path):
    name, template, fragment = case
    out = tmp_path / "out"
    argv = template.replace("{out}", str(out)).format(**{k: str(v) for k, v in inputs.items()}).split(" ")
    shared = inputs["bundle"].parent, Path(str(inputs["a-file"])).parent
    before = _listing(tmp_path, *shared)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0, (name, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), (name, result.stderr[-2000:])
    assert fragment in lines[-1], (name, lines[-1])
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert _listing(tmp_path, *shared) == before, f"{name} left files behind"


def test_the_catalogue_covers_every_command_and_40_cases():
    commands = {c[1].split(" ")[0] for c in CASES}
    assert commands == {"run", "inspect", "validate", "bench", "distill", "quantize", "synth", "export"}
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


LIBRARY_CASES = {  # the sentences the export cases of the catalogue above assert
    "draft-len": ({"draft_len": 0}, "--draft-len must be at least 1"),
    "context": ({"context": 8, "prefill": (32, 128)}, "--context 8 is smaller than the longest prefill"),
    "prefill": ({"prefill": ()}, "--prefill needs at least one positive length"),
    "quant": ({"quant": "int3"}, "Unknown quantization recipe 'int3'"),
    "quant-int8-kv": ({"quant": "int8-kv"}, "int8-kv"),
    "context-beyond-the-checkpoint": ({"context": 100_000_000},
                                      "--context 100000000 exceeds the 131072 positions the target supports"),
}


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
@pytest.mark.parametrize("options,fragment", LIBRARY_CASES.values(), ids=LIBRARY_CASES.keys())
def test_the_library_refuses_what_the_command_refuses(fmt, options, fragment, synth_pair, tmp_path, monkeypatch):
    """export_litert / export_onnx give the command's sentence for a bad option before any checkpoint is opened."""
    from edge_mtp.util.errors import EdgeMtpError
    from edge_mtp.export.pipeline import export_onnx
    from edge_mtp.export.pipeline import export_litert
    from edge_mtp.model.loading import TargetCheckpoint

    def opened(*args, **kwargs):
        raise AssertionError("the checkpoint was opened before the options were checked")

    monkeypatch.setattr(TargetCheckpoint, "__init__", opened)
    export, out = (export_litert, tmp_path / "m.litertlm") if fmt == "litert" else (export_onnx, tmp_path / "m")
    kwargs = {"context": 256, "prefill": (8,), **options}
    with pytest.raises(EdgeMtpError, match=re.escape(fragment)):
        export(synth_pair / "target", synth_pair / "assistant", out, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_exports_of_models_in_memory_check_their_options_too(fmt, tmp_path):
    """export_bundle refuses a bad option before touching the models it is given."""
    from edge_mtp.util.errors import EdgeMtpError
    from edge_mtp.export.pipeline import export_bundle

    out = tmp_path / ("m.litertlm" if fmt == "litert" else "m")

    def export(*args, **kwargs):
        return export_bundle(fmt, *args, **kwargs)
    with pytest.raises(EdgeMtpError, match="--draft-len must be at least 1, not 0"):
        export(None, None, out, draft_len=0, context=64, prefill=(8,))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(EdgeMtpError, match="a-file is a file, not a folder"):
        export(None, None, tmp_path / "a-file" / out.name, context=64, prefill=(8,))
