"""Quiet native libraries, bundle integrity, and the reference's device semantics."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import edge_mtp
from edge_mtp.bundle.litertlm import SECTIONS_KEY, read_litertlm
from edge_mtp.bundle.tokenizer import Tokenizer
from edge_mtp.util.errors import EdgeMtpError


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a child process, so output written by native code to fds 1 and 2 is seen too."""
    environment = {k: v for k, v in os.environ.items() if k != "EDGE_MTP_VERBOSE"} | (env or {})
    return subprocess.run([sys.executable, "-m", "edge_mtp.cli", *args], capture_output=True, text=True,
                          env=environment, timeout=300)


def test_successful_run_prints_nothing_on_stderr_but_its_statistics(tiny_bundle):
    done = _cli("run", str(tiny_bundle[0]), "--prompt", "Hello", "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[6 tokens,") and "acceptance" in lines[0], done.stderr
    assert "INFO" not in done.stdout and done.stdout.strip()


@pytest.mark.parametrize("accelerator", ["cpu", "gpu", "npu"])
def test_json_stdout_is_one_object_whatever_the_accelerator(tiny_bundle, accelerator):
    done = _cli("run", str(tiny_bundle[0]), "--prompt", "Hello", "--max-tokens", "4", "--accelerator", accelerator,
                "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)  # the whole stdout, nothing before or after the object
    assert len(data["tokens"]) == 4
    # at most the one line saying why an unavailable accelerator fell back to the CPU
    assert all(line.startswith("edge-mtp: the ") for line in done.stderr.splitlines()), done.stderr


def test_verbose_flag_and_environment_let_native_lines_through(tiny_bundle):
    for args, env in ((("--verbose",), None), ((), {"EDGE_MTP_VERBOSE": "1"})):
        done = _cli(*args, "run", str(tiny_bundle[0]), "--max-tokens", "2", env=env)
        assert done.returncode == 0 and "INFO: [" in done.stdout + done.stderr


def test_an_error_is_the_last_line_even_after_native_teardown(tiny_bundle):
    done = _cli("run", str(tiny_bundle[0]), "--prompt-ids", "2,100000")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: Prompt token id 100000 is outside the model's vocabulary (0..255); "
                                        "pass ids the bundle's tokenizer produces."]
    assert done.stdout == ""


def test_every_section_is_recorded_with_its_sha256(tiny_bundle):
    bundle = read_litertlm(tiny_bundle[0])
    recorded = bundle.manifest[SECTIONS_KEY]
    assert [(r["type"], r["model_type"]) for r in recorded] == [(s.data_type, s.model_type) for s in bundle.sections]
    for row, section in zip(recorded, bundle.sections):
        data = bundle.read(section)
        assert row["bytes"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()


def test_verification_can_be_skipped_and_a_corrupt_bundle_never_reaches_the_runtime(tiny_bundle, tmp_path,
                                                                                       monkeypatch):
    from bundle_tools import flip
    from edge_mtp.runtime.backends import litert

    bundle = read_litertlm(tiny_bundle[0])
    drafter = bundle.model_section("tf_lite_mtp_drafter")
    bad = flip(tiny_bundle[0], tmp_path / "bad.litertlm", drafter.begin + 100)
    reached = []
    monkeypatch.setattr(litert, "LiteRTBackend", lambda *a, **k: reached.append(a) or pytest.fail("reached"))
    with pytest.raises(EdgeMtpError, match="tf_lite_mtp_drafter section does not match"):
        edge_mtp.load(bad)
    assert not reached
    monkeypatch.undo()
    with pytest.raises(EdgeMtpError):
        read_litertlm(bad, verify=True)
    read_litertlm(bad, verify=False)  # the header alone is intact: the opt-out skips the hashing


def test_a_load_failure_on_the_cpu_names_the_cause_not_the_cpu(tiny_bundle, monkeypatch):
    from ai_edge_litert.compiled_model import CompiledModel

    from edge_mtp.runtime.backends.litert import LiteRTBackend

    def refuse(cls, *args, **kwargs):
        raise RuntimeError("ERROR: [flatbuffer_tools.cc:88]\n└ Invalid flatbuffer")

    monkeypatch.setattr(CompiledModel, "from_buffer", classmethod(refuse))
    monkeypatch.setattr(CompiledModel, "from_file", classmethod(refuse))
    with pytest.raises(EdgeMtpError) as error:
        LiteRTBackend(tiny_bundle[0], accelerator="cpu")
    message = str(error.value)
    assert "Invalid flatbuffer" in message and str(tiny_bundle[0]) in message and "re-export" in message
    assert "--accelerator" not in message  # the user is on the CPU already


def test_xnnpack_weight_caches_are_made_only_where_the_disk_has_room(tiny_bundle, monkeypatch, caplog):
    """Each model is compiled from a file of its own (LiteRT maps it) with its XNNPACK weight cache beside it.
    XNNPACK aborts the process when that cache cannot be written: on a full disk each model must load from memory
    without one (a warning says why) and still give the same tokens."""
    import shutil
    from pathlib import Path

    from edge_mtp.runtime.backends import litert

    prompt = [2, 5, 9, 4]
    roomy = litert.LiteRTBackend(tiny_bundle[0])
    assert sorted(p.name for p in Path(roomy._workdir.name).iterdir()) == \
        sorted(f"{name}.{kind}" for name in roomy.models for kind in ("cache", "tflite"))
    expected = list(edge_mtp.load(tiny_bundle[0]).generate(prompt, max_tokens=6, mtp=False))
    real = shutil.disk_usage
    monkeypatch.setattr(litert.shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    full = litert.LiteRTBackend(tiny_bundle[0])
    assert not any(Path(full._workdir.name).iterdir())
    assert "too little free disk" in caplog.text
    assert list(edge_mtp.load(tiny_bundle[0]).generate(prompt, max_tokens=6, mtp=False)) == expected


def test_chat_template_from_a_bundle_is_rendered_sandboxed(tiny_bundle):
    tokenizer = edge_mtp.load(tiny_bundle[0]).tokenizer
    safe = Tokenizer(tokenizer._tok.to_str(), 2, [1], "{{ messages[0]['content'] | upper }}")
    assert safe.chat("hi") == "HI"
    hostile = Tokenizer(tokenizer._tok.to_str(), 2, [1], "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(EdgeMtpError, match="chat template cannot be rendered"):
        hostile.chat("hi")


def test_validate_passes_a_prompt_holding_the_pad_id(tiny_bundle, synth_pair):
    """transformers must attend to every prompt token, as the device does, even one equal to pad (id 0)."""
    from edge_mtp.checks.validate import validate

    prompt = "Hello <pad> world<pad>"
    assert 0 in edge_mtp.load(tiny_bundle[0]).tokenizer.encode(prompt)
    report = validate(tiny_bundle[0], synth_pair / "target", synth_pair / "assistant", [prompt], max_tokens=6,
                      use_litert_lm=False)
    assert report.passed, [(c.subject, c.detail) for c in report.checks if not c.passed]
    assert any(c.kind == "greedy" for c in report.checks)


def test_run_cli_sampling_is_seeded_and_torch_backend_and_chat_work(tiny_bundle):
    from click.testing import CliRunner

    from edge_mtp.cli import main

    def run(*args: str) -> dict:
        result = CliRunner().invoke(main, ["run", str(tiny_bundle[0]), "--prompt", "Hello", "--max-tokens", "8",
                                           "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    sampled = ["--temperature", "1.5", "--top-k", "40", "--top-p", "0.9"]
    first, again = run(*sampled, "--seed", "7"), run(*sampled, "--seed", "7")
    greedy = run()
    assert first["tokens"] == again["tokens"] and len(first["tokens"]) == 8
    assert any(run(*sampled, "--seed", str(s))["tokens"] != first["tokens"] for s in (8, 9, 10))  # seed matters
    assert run("--backend", "torch")["tokens"] == greedy["tokens"]  # our PyTorch modules decide as the bundle does
    assert run("--chat")["tokens"] == greedy["tokens"]  # the tiny pair has no chat template: plain prompt


def test_a_tokenizer_that_loads_but_cannot_encode_is_one_clear_error(tmp_path):
    """Found by scripts/fuzz_readers.py: a BPE model whose unk token is missing from its vocabulary loads, then
    tokenizers raises a plain Exception on the first unknown character."""
    from edge_mtp.checkpoint.char_tokenizer import write_char_tokenizer

    write_char_tokenizer(tmp_path, 256)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    del data["model"]["vocab"]["<unk>"]
    tokenizer = Tokenizer(json.dumps(data), 2, [1])
    with pytest.raises(EdgeMtpError, match="tokenizer.json cannot encode text .*<unk>.* re-export"):
        tokenizer.encode("Hello \x1f world")
