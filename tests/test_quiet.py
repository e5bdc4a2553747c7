"""Quiet by default: a command prints its own progress, results and `error:` line; library log records, Python
warnings and native lines are captured, shown with --verbose, and replayed above the traceback of a crash."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

from click.testing import CliRunner

from edge_mtp.cli import main
from helpers import assert_only_progress

OPSET_NOTICE = "edge-mtp: the int4 graphs are ONNX opset 21"

# Runs several commands in one process (one interpreter start), marking where each one's stderr begins and ends.
_COMMANDS = """
import json, os, sys
from edge_mtp.cli import main
for argv in json.loads(sys.argv[1]):
    os.write(2, b"EDGE_MTP_BEGIN\\n")
    try:
        main(argv, prog_name="edge-mtp")
    except SystemExit as e:
        os.write(2, f"EDGE_MTP_END {e.code}\\n".encode())
"""


def _stderr_per_command(commands: list[list[str]]) -> list[tuple[int, str]]:
    """(exit code, stderr) of each command, run in order in one child process: a real process, where libraries are
    imported, and set up their logging, in the middle of the command."""
    environment = {k: v for k, v in os.environ.items() if k != "EDGE_MTP_VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", _COMMANDS, json.dumps(commands)], capture_output=True, text=True,
                          env=environment, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = []
    for block in proc.stderr.split("EDGE_MTP_BEGIN\n")[1:]:
        body, _, code = block.rpartition("EDGE_MTP_END ")
        out.append((int(code.strip()), body))
    assert len(out) == len(commands), proc.stderr[-3000:]
    return out


def test_an_int4_onnx_export_and_its_run_print_only_their_own_lines(tmp_path):
    """onnxruntime's 4-bit quantizer logs every node at INFO (1,083 lines for the demo pair); what is left is our
    progress and one line of ours for the opset it raises. The cheapest export that reaches it: a two-layer tiny
    target alone; an int8 export of it (the other onnxruntime quantizer) prints its progress alone."""
    from dataclasses import replace

    from edge_mtp.checkpoint.spec import FULL, SLIDING, preset_pair
    from edge_mtp.checkpoint.synth import write_target

    target = replace(preset_pair("tiny")[0], layer_types=(SLIDING, FULL), num_kv_shared_layers=0)
    write_target(tmp_path / "target", target)
    bundle = tmp_path / "onnx-int4"
    export = ["export", "--target", str(tmp_path / "target"), "--no-assistant", "--format", "onnx", "--context", "64",
              "--prefill", "8"]
    commands = [export + ["--quant", "int4", "--out", str(bundle)],
                ["run", str(bundle), "--prompt-ids", "2,5,7", "--max-tokens", "4"],
                export + ["--quant", "int8", "--out", str(tmp_path / "onnx-int8")]]
    (exported, export_err), (ran, run_err), (int8, int8_err) = _stderr_per_command(commands)
    assert int8 == 0, int8_err[-3000:]
    assert_only_progress(int8_err)
    assert not [ln for ln in int8_err.splitlines() if ln.startswith("edge-mtp: ")]  # int8 keeps the opset
    assert exported == 0 and (bundle / "manifest.json").is_file(), export_err[-3000:]
    assert_only_progress(export_err)
    assert [ln for ln in export_err.splitlines() if ln.startswith("edge-mtp: ")] == [
        OPSET_NOTICE + ", which onnxruntime's 4-bit quantizer needs; the app's ONNX Runtime must be 1.18 or newer."]
    assert ran == 0 and len(run_err.splitlines()) == 1 and run_err.startswith("[4 tokens, "), run_err


def _crash_after_library_output(monkeypatch, own_handler: logging.Handler) -> None:
    """Make `inspect` log like libraries do (a logger with its own handler and no propagation, as transformers sets
    up; an INFO record; a Python warning), write a native line to fd 2, then fail with a bug."""
    import edge_mtp.checks.inspect as inspect_checkpoint

    library = logging.getLogger("edge_mtp_test_library")
    monkeypatch.setattr(library, "handlers", [own_handler])
    monkeypatch.setattr(library, "propagate", False)
    monkeypatch.setattr(library, "level", logging.INFO)

    def crash(path):
        library.info("start to quantize node_linear_4 ...")
        library.warning("a library warning")
        warnings.warn("a Python warning")
        os.write(2, b"W0000 00:00:00.000000 a native line\n")
        raise RuntimeError("a bug")

    monkeypatch.setattr(inspect_checkpoint, "describe_checkpoint", crash)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_crash_prints_the_last_library_lines_above_its_traceback(monkeypatch, tmp_path):
    own = _Records()
    _crash_after_library_output(monkeypatch, own)
    monkeypatch.delenv("EDGE_MTP_VERBOSE", raising=False)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError)
    assert own.messages == []  # the library's own handler never saw a record while the command ran
    lines = result.stderr.splitlines()
    replay = lines[lines.index("library output before the failure:") + 1:]
    assert replay[0] == "edge_mtp_test_library [WARNING] a library warning"
    assert replay[1].startswith("py.warnings [WARNING] ") and "UserWarning: a Python warning" in replay[1]
    assert replay[-1] == "W0000 00:00:00.000000 a native line"
    assert "start to quantize" not in result.stderr  # below WARNING: dropped, not captured


def test_verbose_leaves_library_logging_alone(monkeypatch, tmp_path):
    for args, env in ((["--verbose"], None), ([], "1")):
        own = _Records()
        _crash_after_library_output(monkeypatch, own)
        if env:
            monkeypatch.setenv("EDGE_MTP_VERBOSE", env)
        result = CliRunner().invoke(main, [*args, "inspect", str(tmp_path)])
        assert isinstance(result.exception, RuntimeError)
        assert own.messages == ["start to quantize node_linear_4 ...", "a library warning"]
        assert "library output before the failure" not in result.stderr


def test_run_prints_no_stop_token(demo_bundle):
    """The reply's text ends where the model stopped: the stop token is named in --json, never printed."""
    import edge_mtp

    runner = CliRunner()
    data = json.loads(runner.invoke(main, ["run", str(demo_bundle), "--max-tokens", "64", "--json"]).stdout)
    tokenizer = edge_mtp.load(demo_bundle).tokenizer
    assert data["tokens"][-1] in tokenizer.stop_tokens and data["stop_token"] == data["tokens"][-1]
    assert data["text"] == tokenizer.decode(data["tokens"][:-1]) and "<eos>" not in data["text"]
    printed = runner.invoke(main, ["run", str(demo_bundle), "--max-tokens", "64"])
    assert printed.exit_code == 0 and printed.stdout == data["text"] + "\n"
