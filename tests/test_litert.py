"""LiteRT export: converted graphs vs PyTorch, the bundle in Google's LiteRT-LM runtime, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from edge_mtp.bundle.litertlm import read_litertlm
from edge_mtp.cli import main
from edge_mtp.export.pipeline import export_litert
from edge_mtp.model.contract import Contract
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import generate_tokens
from edge_mtp.util.errors import EdgeMtpError, PairMismatchError

from helpers import assert_streamed_export, assert_verify_rows_are_decodes
from conftest import BUNDLE_CONTEXT as CONTEXT, BUNDLE_PREFILL as PREFILL

PROMPTS = ["Hello world", "The quick brown fox", "abc", "Speculative decoding on a phone, exactly."]


def _ours(pair_dir: Path, prompts, max_tokens: int, mtp: bool = True):
    models = load_target(pair_dir / "target")
    drafter = load_drafter(pair_dir / "assistant", models.spec)
    backend = TorchBackend(models, drafter, Contract(models.spec, drafter.spec, CONTEXT, 3, PREFILL))
    tok = AutoTokenizer.from_pretrained(pair_dir / "target")
    texts, accepted, drafted = [], 0, 0
    for prompt in prompts:
        tokens, stats = generate_tokens(backend, tok(prompt)["input_ids"], max_tokens=max_tokens, mtp=mtp,
                                        stop_tokens=list(models.spec.eos_token_ids))
        texts.append(tok.decode(tokens, skip_special_tokens=False))
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    return texts, accepted, drafted


def test_every_signature_matches_pytorch(tiny_bundle):
    assert_streamed_export(tiny_bundle[1])


def test_bundle_layout_follows_the_contract(tiny_bundle):
    path, _ = tiny_bundle
    bundle = read_litertlm(path)
    types = [s.model_type for s in bundle.sections if s.data_type == "tflite_model"]
    assert types == ["tf_lite_embedder", "tf_lite_prefill_decode", "tf_lite_per_layer_embedder", "tf_lite_mtp_drafter"]
    assert bundle.manifest["draft_len"] == 3 and bundle.manifest["context"] == CONTEXT
    info = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    sections = {s["model_type"]: s for s in info["sections"] if s["model_type"]}
    verify = sections["tf_lite_prefill_decode"]["signatures"]["verify"]
    shapes = {t["name"]: t["shape"] for t in verify["inputs"] + verify["outputs"]}
    assert shapes["input_pos"] == [4] and shapes["activations"] == [1, 4, 64]
    assert shapes["kv_cache_k_2"] == [1, 2, CONTEXT, 32] and shapes["kv_cache_v_2"] == [1, 2, 32, CONTEXT]
    drafter = sections["tf_lite_mtp_drafter"]["signatures"]["mtp_drafter"]
    d_shapes = {t["name"]: t["shape"] for t in drafter["inputs"] + drafter["outputs"]}
    assert d_shapes["activations"] == [1, 1, 128] and d_shapes["projected_activations"] == [1, 1, 64]
    assert {n for n in d_shapes if n.startswith("kv_")} == {"kv_cache_k_1", "kv_cache_v_1", "kv_cache_k_2", "kv_cache_v_2"}
    assert all(d_shapes[n] == shapes[n] for n in d_shapes if n.startswith("kv_"))
    gallery = json.loads((path.parent / "tiny.allowlist.json").read_text())["models"][0]
    assert gallery["modelFile"] == "tiny.litertlm" and gallery["sizeInBytes"] == path.stat().st_size
    # Gallery shows the MTP switch for speculative_decoding; the GPU is not offered to a bundle that cannot draft there
    assert gallery["capabilities"] == ["speculative_decoding"] and gallery["maxContextLength"] == CONTEXT
    assert gallery["defaultConfig"] == {"topK": 64, "topP": 0.95, "temperature": 1.0, "maxTokens": CONTEXT,
                                        "accelerators": "cpu"}


def test_litert_lm_runs_the_bundle_with_mtp_identically(tiny_bundle, synth_pair):
    path, _ = tiny_bundle
    on = run_litertlm(path, PROMPTS, max_tokens=20, context=CONTEXT, mtp=True)
    off = run_litertlm(path, PROMPTS, max_tokens=20, context=CONTEXT, mtp=False)
    ours, _, _ = _ours(synth_pair, PROMPTS, 20)
    assert on.supports_mtp and on.success_rate is not None
    assert on.texts == off.texts == ours
    # The success rate itself is compared on the demo pair (tests/test_litert_demo.py), whose trained drafter is
    # accepted over half the time: this random pair's rate can be 0 on both sides, which would prove nothing.


@pytest.fixture(scope="module")
def tiny_int4(recipe_bundle) -> Path:
    """The tiny pair's int4 bundle at the tiny_bundle geometry, exported (and checked) once for these tests and
    test_certify's."""
    return recipe_bundle("tiny", "int4")[0]


def test_a_quantized_bundle_stores_the_tied_table_once(tiny_int4):
    """The embedder's table is the LM head's (same codes; the head's scales carry the softcap factor): the embedder
    section runs on into the target section and its table buffer is the target's own, and Google's runtime reads
    it there as ours does, MTP on and off (the export's check already held both to the streamed reference)."""
    import edge_mtp
    from ai_edge_litert import schema_py_generated as schema

    bundle = read_litertlm(tiny_int4, verify=True)
    embedder, target = bundle.model_section("tf_lite_embedder"), bundle.model_section("tf_lite_prefill_decode")
    assert embedder.begin < target.begin < embedder.end <= target.end

    def buffers(section):
        root = schema.Model.GetRootAs(bundle.read(section), 0)
        return [(root.Buffers(i).Offset(), root.Buffers(i).Size()) for i in range(root.BuffersLength())]

    offset, size = max(buffers(embedder), key=lambda b: b[1])
    assert (offset - (target.begin - embedder.begin), size) in buffers(target)
    assert embedder.end == embedder.begin + offset + size
    on = run_litertlm(tiny_int4, PROMPTS[:2], max_tokens=20, context=CONTEXT, mtp=True)
    off = run_litertlm(tiny_int4, PROMPTS[:2], max_tokens=20, context=CONTEXT, mtp=False)
    model = edge_mtp.load(tiny_int4)
    ours = [model.tokenizer.decode(list(model.generate(p, max_tokens=20))) for p in PROMPTS[:2]]
    assert on.texts == off.texts == ours


def test_a_quantized_bundle_verifies_rows_as_decodes_and_mtp_output_is_plain_output(tiny_int4):
    """int4 weights with int8 activations computed per row: a verify row is still a decode of its token bit for
    bit (positions before and past the sliding window of 4), so MTP changes no token."""
    from edge_mtp.runtime.backends.litert import LiteRTBackend

    prompts = [[2, 17, 99, 3], [2, 250, 8, 8, 41, 7, 120]]
    assert_verify_rows_are_decodes(LiteRTBackend(tiny_int4), (2, 9, 30), prompts, 40)


def test_truncated_bundle_is_reported(tiny_bundle, tmp_path):
    path, _ = tiny_bundle
    cut = tmp_path / "cut.litertlm"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EdgeMtpError, match="is truncated or corrupt: section"):
        read_litertlm(cut)
    (tmp_path / "junk.litertlm").write_bytes(b"not a bundle at all" * 4)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "junk.litertlm")])
    assert result.exit_code == 2 and "is not a .litertlm bundle" in result.output


def test_mismatched_pair_leaves_no_output(hf_pairs, synth_pair, tmp_path):
    out = tmp_path / "bad.litertlm"
    with pytest.raises(PairMismatchError):
        export_litert(hf_pairs["tiny-mqa"]["target_dir"], synth_pair / "assistant", out, context=CONTEXT, prefill=(8,))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unwritable_output_location(synth_pair):
    with pytest.raises(EdgeMtpError, match="Cannot create output folder /proc/edge-mtp"):
        export_litert(synth_pair / "target", synth_pair / "assistant", Path("/proc/edge-mtp/x.litertlm"),
                      context=CONTEXT, prefill=(8,))


def test_output_under_a_file_is_a_clear_error(synth_pair, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EdgeMtpError, match="Cannot create output folder"):
        export_litert(synth_pair / "target", synth_pair / "assistant", tmp_path / "afile" / "x.litertlm",
                      context=CONTEXT, prefill=(8,))


def test_interrupted_export_leaves_nothing(synth_pair, tmp_path):
    out = tmp_path / "x.litertlm"

    def interrupt(stage: str) -> None:
        if stage.startswith("converting the target"):  # the embedders are already written in the work folder
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_litert(synth_pair / "target", None, out, context=CONTEXT, prefill=(8,), on_stage=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_export_leaves_nothing(synth_pair, tmp_path):
    """SIGTERM (kill, a job scheduler) mid-export stops the command like Ctrl-C: one line, no partial bundle, no
    temporary folder."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m.litertlm"
    proc = subprocess.Popen([sys.executable, "-m", "edge_mtp.cli", "export", "--target", str(synth_pair / "target"),
                             "--assistant", str(synth_pair / "assistant"), "--out", str(out), "--context", "64",
                             "--prefill", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".edge-mtp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob(".edge-mtp-*")), "the export never started its work folder"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.strip().splitlines()[-1] == "error: aborted."
    assert list(tmp_path.iterdir()) == []


def test_unsupported_config_is_refused_before_any_work(synth_pair, tmp_path):
    import shutil
    target = tmp_path / "moe"
    shutil.copytree(synth_pair / "target", target)
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(cfg | {"enable_moe_block": True}))
    result = CliRunner().invoke(main, ["export", "--target", str(target), "--assistant", str(synth_pair / "assistant"),
                                       "--out", str(tmp_path / "m.litertlm")])
    assert result.exit_code == 2 and "Mixture-of-Experts" in result.output
    assert not (tmp_path / "m.litertlm").exists()


def test_our_litert_backend_reproduces_litert_lm(tiny_bundle, synth_pair):
    import edge_mtp
    path, _ = tiny_bundle
    model = edge_mtp.load(path)
    engine = run_litertlm(path, PROMPTS[:2], max_tokens=20, context=CONTEXT, mtp=True)
    ours = []
    for prompt in PROMPTS[:2]:
        ours.append(model.tokenizer.decode(list(model.generate(prompt, max_tokens=20))))
        assert model.last_stats.drafted == 3 * model.last_stats.verifies
    assert ours == engine.texts
    backend = model.backend
    drafter_inputs, _ = backend._buffers("drafter", "mtp_drafter")
    verify_inputs, verify_outputs = backend._buffers("target", "verify")
    for name in ("kv_cache_k_1", "kv_cache_v_2"):
        assert drafter_inputs[name] is backend.kv[name] is verify_inputs[name] is verify_outputs[name]
    assert abs(backend.read_kv("kv_cache_k_1")).sum() > 0  # the target wrote into the shared buffer


def test_run_command_streams_text_and_stats(tiny_bundle):
    path, _ = tiny_bundle
    result = CliRunner().invoke(main, ["run", str(path), "--prompt", "Hello", "--max-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert len(data["tokens"]) == 8 and isinstance(data["text"], str)
    for key in ("drafted", "accepted", "acceptance_rate", "mean_accepted_length", "per_position_acceptance",
                "tokens_per_second", "time_to_first_token_ms", "ms_per_verify", "ms_per_draft_step"):
        assert key in data["stats"]
    plain = CliRunner().invoke(main, ["run", str(path), "--prompt", "Hello", "--max-tokens", "8", "--no-mtp", "--json"])
    assert json.loads(plain.output.strip().splitlines()[-1])["tokens"] == data["tokens"]
