"""The synth writer (streaming, HF layout, bounded memory) and the synth / inspect commands."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from edge_mtp.checkpoint.layout import target_tensors
from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.checkpoint.synth import total_bytes
from edge_mtp.cli import main

_CHILD = """
import resource, sys
from pathlib import Path
from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.checkpoint.synth import write_target
if sys.argv[1] == "write":
    write_target(Path(sys.argv[2]), preset_pair("wide")[0])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_kib(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_writer_memory_stays_far_below_the_model_size(tmp_path):
    spec = preset_pair("wide")[0]
    model_bytes = total_bytes(spec, target_tensors(spec))
    assert model_bytes > 100 << 20
    baseline = _peak_kib("idle")
    peak = _peak_kib("write", str(tmp_path / "wide"))
    extra = (peak - baseline) * 1024
    assert (tmp_path / "wide" / "model.safetensors").stat().st_size > model_bytes
    assert extra < 0.25 * model_bytes, f"writer used {extra >> 20} MiB over baseline for a {model_bytes >> 20} MiB model"


def test_synth_and_inspect_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--preset", "tiny-mqa", "--out", str(tmp_path / "p"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    for sub in ("target", "assistant"):
        assert (tmp_path / "p" / sub / "config.json").is_file()
    gen = json.loads((tmp_path / "p" / "assistant" / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == 3
    result = runner.invoke(main, ["inspect", str(tmp_path / "p" / "target"), "--json"])
    info = json.loads(result.output)
    assert info["kind"] == "target" and info["geometry"]["dtype"] == "bfloat16"
    assert info["kv_store_layers"] == {"sliding": 2, "full": 3}
    assert info["kv_reuse_layers"] == {"4": 2, "5": 2, "6": 2, "7": 3}
    text = runner.invoke(main, ["inspect", str(tmp_path / "p" / "assistant")]).output
    assert "centroid head on (8 / top 2)" in text


def test_synth_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer
    runner = CliRunner()
    assert runner.invoke(main, ["synth", "--preset", "tiny", "--out", str(tmp_path / "p")]).exit_code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "p" / "target")
    ids = tok("Hello, world!\n")["input_ids"]
    assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == "Hello, world!\n"


def test_e2b_inspect_reports_published_counts(tmp_path):
    from edge_mtp.checkpoint.hf_config import drafter_config, target_config
    target, drafter = preset_pair("e2b")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(target_config(target, multimodal=True)))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(drafter_config(drafter)))
    runner = CliRunner()
    t = json.loads(runner.invoke(main, ["inspect", str(tmp_path / "t"), "--json"]).output)
    a = json.loads(runner.invoke(main, ["inspect", str(tmp_path / "a"), "--json"]).output)
    assert t["parameters"] == 4_628_569_344 and a["parameters"] == 77_731_328
    assert t["parameters_without_ple_table"] == 2_279_759_104  # "2.280 B without the PLE table"
    assert t["kv_bytes_per_token_bf16"] == 18432


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: Checkpoint directory {tmp_path / 'missing'} does not exist."]
    result = CliRunner().invoke(main, ["synth", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Unknown preset 'huge'" in result.output
    assert not (tmp_path / "x").exists()
