"""distill's two phases: shards hold what training reads, training needs no target, data-parallel runs (torchrun,
gloo) follow the single-process trajectory, resume across world sizes, and bad input is refused early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import Interrupt, stop_at

from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.distill import bytes_per_token, prepare, train
from edge_mtp.distill.shards import INDEX, TRAIN, ShardSet
from edge_mtp.distill.train import LOG_FILE, STATE_FILE
from edge_mtp.util.errors import EdgeMtpError

PREP = dict(num_sequences=16, eval_sequences=2, seq_len=16, prompt_len=5, device="cpu")
TRAIN_ARGS = dict(steps=6, batch=4, lr=5e-3, save_every=3, eval_every=3, device="cpu")


@pytest.fixture(scope="module")
def shards(synth_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    prepare(synth_pair / "target", out, **PREP)
    return out


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    """One process, the whole run: the reference trajectory."""
    out = tmp_path_factory.mktemp("single") / "assistant"
    return out, train(shards, out, **TRAIN_ARGS)


def test_shards_hold_the_records_and_state_their_size(shards, synth_pair):
    index = json.loads((shards / INDEX).read_text())
    target, _ = preset_pair("tiny")
    assert index["continuation"] == "greedy" and index["train_sequences"] == 16
    assert index["bytes_per_token"] == bytes_per_token(target, 64, torch.float32)
    per_position = 0
    with safe_open(str(shards / index["shards"][0]["file"]), framework="pt") as f:
        n = len(index["shards"][0]["sequences"])
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dim() >= 2:
                per_position += t.numel() * t.element_size()
        assert sorted(k for k in f.keys() if k[:2] in ("k_", "v_")) == sorted(
            f"{kv}_{i}" for kv in "kv" for i in set(target.store_layers.values())) == ["k_1", "k_2", "v_1", "v_2"]
    assert per_position == index["bytes_per_token"] * n * PREP["seq_len"]
    # every prompt is the start of its sequence, continued greedily: the recorded top-1 is the next token
    records = ShardSet.open(shards).read(TRAIN, [0, 1])
    prompt = int(records["prompt_len"][0])
    nxt = records["teacher_indices"][:, prompt - 1:-1, 0]
    assert torch.equal(nxt, records["tokens"][:, prompt:].int())


def test_a_stopped_prepare_resumes_after_its_complete_shards(synth_pair, tmp_path, monkeypatch):
    """Stopped after two of its five shards, prepare writes only the other three when run again, and ends with the
    same shards (sampled continuations too) as a run that was never stopped; other settings may not finish them."""
    module = sys.modules["edge_mtp.distill.prepare"]
    monkeypatch.setattr(module, "SHARD_BYTES", 1)  # a shard per batch
    args = PREP | {"num_sequences": 8, "eval_sequences": 2, "batch": 2, "temperature": 0.8}
    whole = prepare(synth_pair / "target", tmp_path / "whole", **args)
    writes, write_shard = [], module.write_shard

    def stopping(path: Path, records: dict) -> None:
        if len(writes) == 2 and stopping.stop:
            raise Interrupt
        writes.append(path.name)
        write_shard(path, records)

    stopping.stop = True
    monkeypatch.setattr(module, "write_shard", stopping)
    with pytest.raises(Interrupt):
        prepare(synth_pair / "target", tmp_path / "resumed", **args)
    assert not (tmp_path / "resumed" / INDEX).exists() and not list((tmp_path / "resumed").glob(".*partial"))
    stopping.stop = False
    with pytest.raises(EdgeMtpError, match=r"prepared with other settings \(seed 0, not 1\)"):
        prepare(synth_pair / "target", tmp_path / "resumed", **(args | {"seed": 1}))
    resumed = prepare(synth_pair / "target", tmp_path / "resumed", **args)
    names = [s["file"] for s in whole["shards"]]
    assert len(names) == 5 and writes == names
    assert resumed["shards"] == whole["shards"]
    for name in names:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_bytes_per_token_at_e2b():
    """bf16 activations (1536) and the two store layers' K+V rows (2x256 + 2x512), plus 64 top logits."""
    target, _ = preset_pair("e2b")
    assert bytes_per_token(target, 64, torch.bfloat16) == 4 + 1 + 2 * (1536 + 2 * 256 + 2 * 512) + 8 * 64 == 6661


def test_training_needs_no_target_and_logs_held_out_acceptance(single, monkeypatch):
    out, result = single
    assert len(result.losses) == TRAIN_ARGS["steps"] and all(l == l for l in result.losses)
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7))
    assert [e["step"] for e in log if "held_out_acceptance" in e] == [3, 6]
    assert log[-1]["held_out_acceptance"] == pytest.approx(result.acceptance_after)


def test_train_does_not_load_the_target(shards, tmp_path, monkeypatch):
    import edge_mtp.model.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("train loaded the target")

    monkeypatch.setattr(loading, "load_target", refuse)
    monkeypatch.setattr(loading, "TargetCheckpoint", refuse)
    result = train(shards, tmp_path / "a", **(TRAIN_ARGS | {"steps": 1}))
    assert len(result.losses) == 1


def test_grad_accumulation_follows_the_same_trajectory(shards, single, tmp_path):
    _, full = single
    accum = train(shards, tmp_path / "a", **(TRAIN_ARGS | {"grad_accum": 2}))
    assert accum.losses == pytest.approx(full.losses, rel=1e-4)


def test_two_gloo_processes_resume_a_one_process_run_on_the_same_trajectory(shards, single, tmp_path):
    """Killed at step 4 of 6 with 1 process (state at 3), resumed by torchrun with 2: steps 4-6 as 1 process."""
    _, full = single
    out = tmp_path / "assistant"

    with pytest.raises(Interrupt):
        train(shards, out, progress=stop_at(4), **TRAIN_ARGS)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 3
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "edge_mtp.cli", "distill", "train", "--shards", str(shards), "--out", str(out), "--resume",
           "--json", *[f"--{k.replace('_', '-')}={v}" for k, v in TRAIN_ARGS.items()]]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # a hung run is killed with its worker processes
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-3000:]
    result = json.loads(stdout[stdout.index("{"):])
    assert result["start_step"] == 3
    assert result["losses"] == pytest.approx(full.losses, rel=1e-4)
    assert result["acceptance_after"] == pytest.approx(full.acceptance_after, abs=1e-6)


def test_a_world_size_that_does_not_divide_the_data_is_refused(synth_pair, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(EdgeMtpError, match="16 sequences do not divide among 3 processes"):
        prepare(synth_pair / "target", tmp_path / "s", **PREP)
    with pytest.raises(EdgeMtpError, match="--batch 4 does not divide into 1 micro-batches on each of 3"):
        train(shards, tmp_path / "a", **TRAIN_ARGS)
    assert not (tmp_path / "s").exists() and not (tmp_path / "a").exists()


def test_shards_of_another_target_are_refused(shards, tmp_path):
    from edge_mtp.checkpoint.synth import write_target

    target, _ = preset_pair("tiny")
    write_target(tmp_path / "other", target, seed=5)
    before = sorted(p.name for p in shards.iterdir())
    with pytest.raises(EdgeMtpError, match="prepared from another target"):
        prepare(tmp_path / "other", shards, **PREP)
    assert sorted(p.name for p in shards.iterdir()) == before


def test_same_target_and_settings_reuse_the_shards(synth_pair, shards):
    stamp = (shards / INDEX).stat().st_mtime_ns
    assert prepare(synth_pair / "target", shards, **PREP)["target_sha256"]
    assert (shards / INDEX).stat().st_mtime_ns == stamp
    with pytest.raises(EdgeMtpError, match="other settings .*seq_len 16, not 20"):
        prepare(synth_pair / "target", shards, **(PREP | {"seq_len": 20}))


def test_init_starts_from_an_existing_assistant(synth_pair, shards, tmp_path):
    from edge_mtp.distill import replay_acceptance
    from edge_mtp.model.embedder import Embedder
    from edge_mtp.model.loading import load_drafter

    set_ = ShardSet.open(shards)
    embedder = Embedder(set_.target)
    embedder.embed_tokens.weight = torch.nn.Parameter(set_.embeddings(), requires_grad=False)
    drafter = load_drafter(synth_pair / "assistant", set_.target)
    want = replay_acceptance(drafter, embedder, set_, 3)
    result = train(shards, tmp_path / "a", init_from=synth_pair / "assistant", **(TRAIN_ARGS | {"steps": 1}))
    assert (result.acceptance_before, result.mean_accepted_length_before) == pytest.approx(want)


def test_a_device_that_is_not_there_is_refused(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EdgeMtpError, match="--device cuda: torch sees no CUDA GPU"):
        train(shards, tmp_path / "a", **(TRAIN_ARGS | {"device": "cuda"}))


def test_a_bf16_target_writes_consistent_shards(synth_pair, tmp_path):
    """The accelerator path (bf16 weights under autocast, fp32 caches) run on the CPU: greedy continuations whose
    recorded top-1 logit is the next token."""
    prepare(synth_pair / "target", tmp_path / "bf16", **(PREP | {"num_sequences": 4, "eval_sequences": 1}),
            target_dtype=torch.bfloat16)
    records = ShardSet.open(tmp_path / "bf16").read(TRAIN, [0, 1, 2, 3])
    prompt = int(records["prompt_len"][0])
    assert torch.equal(records["teacher_indices"][:, prompt - 1:-1, 0], records["tokens"][:, prompt:].int())
    assert records["activations"].abs().sum() > 0


def test_prepare_command_reuses_matching_shards_and_states_their_size(synth_pair, shards):
    from click.testing import CliRunner

    from edge_mtp.cli import main

    stamp = (shards / INDEX).stat().st_mtime_ns
    result = CliRunner().invoke(main, ["distill", "prepare", "--target", str(synth_pair / "target"), "--shards",
                                       str(shards), "--sequences", "16", "--eval-sequences", "2", "--seq-len", "16",
                                       "--prompt-len", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    per_token = json.loads((shards / INDEX).read_text())["bytes_per_token"]
    assert f"16 + 2 held-out sequences of 16 tokens (greedy), {per_token:,} bytes per token" in result.output
    assert (shards / INDEX).stat().st_mtime_ns == stamp
