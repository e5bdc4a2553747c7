"""Checkpoint reading: layouts, shards, dtypes, the HF cache, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.checkpoint.synth import write_target
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.util.errors import CheckpointError, EdgeMtpError, PairMismatchError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_bf16_and_single_file_fp32_give_the_same_modules(tmp_path):
    from dataclasses import replace
    target, _ = preset_pair("tiny")
    write_target(tmp_path / "fp32", target, seed=7)
    write_target(tmp_path / "bf16", replace(target, dtype="bfloat16"), seed=7, multimodal=True, shard_bytes=30_000)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 3
    a, b = load_target(tmp_path / "fp32"), load_target(tmp_path / "bf16")
    assert (a.spec.dtype, b.spec.dtype) == ("float32", "bfloat16")
    for name, pa in a.target.state_dict().items():
        assert torch.allclose(pa, b.target.state_dict()[name], rtol=2 ** -8, atol=0), name
    ids = torch.tensor([[3, 4, 5]], dtype=torch.int32)
    assert torch.allclose(a.embedder(ids)["embeddings"], b.embedder(ids)["embeddings"], rtol=2 ** -7)
    from edge_mtp.model.contract import Contract, causal_mask
    kv = {s.name: torch.zeros(s.shape) for s in Contract(target, None, 8, prefill_lengths=(3,)).kv_tensors()}
    pos, mask = torch.arange(3, dtype=torch.int32), torch.from_numpy(causal_mask(0, 3, 8))
    out = [m.target(m.embedder(ids)["embeddings"], m.per_layer_embedder(ids)["per_layer_embeddings"], pos, mask, **kv)
           for m in (a, b)]
    assert float((out[0]["logits"] - out[1]["logits"]).abs().max()) < 0.05 * float(out[0]["logits"].abs().max())


def test_unused_shared_layer_kv_and_vision_tensors_are_skipped(tmp_path, hf_pairs):
    d = _copy(hf_pairs["tiny"]["target_dir"], tmp_path / "t")
    extra = {"model.layers.4.self_attn.k_proj.weight": torch.zeros(32, 64),
             "model.vision_tower.patch.weight": torch.zeros(3, 3)}
    save_file(extra, d / "extra.safetensors")
    loaded, original = load_target(d), load_target(hf_pairs["tiny"]["target_dir"])
    assert loaded.spec.first_shared_layer <= 4  # layer 4 is KV-shared: its k_proj is a leftover, never used
    got, want = loaded.target.state_dict(), original.target.state_dict()
    assert got.keys() == want.keys() and not any("k_proj" in k for k in got if k.startswith("layers.4."))
    assert all(torch.equal(got[k], want[k]) for k in want)  # the zero leftovers were skipped, not loaded


def test_missing_tensor_is_named(tmp_path, synth_pair):
    d = _copy(synth_pair / "target", tmp_path / "t")
    from safetensors.torch import load_file
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensor model\.layers\.2\.self_attn\.k_proj\.weight"):
        load_target(d)


def test_wrong_shape_is_named_with_its_file(tmp_path, synth_pair):
    d = _copy(synth_pair / "target", tmp_path / "t")
    from safetensors.torch import load_file
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in model\.safetensors has shape \[65\] but "
                                              r"config\.json implies \[64\]"):
        load_target(d)


def test_unexpected_tensor_that_matters_is_refused(tmp_path, synth_pair):
    d = _copy(synth_pair / "target", tmp_path / "t")
    save_file({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}, d / "more.safetensors")
    with pytest.raises(CheckpointError, match=r"Unexpected tensor model\.layers\.0\.mlp\.extra_proj\.weight in "
                                              r"more\.safetensors"):
        load_target(d)


def test_truncated_file_and_missing_shard(tmp_path, synth_pair):
    d = _copy(synth_pair / "target", tmp_path / "t")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        load_target(d)
    d2 = _copy(synth_pair / "target", tmp_path / "t2")
    (d2 / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="Shard model-00002-of-00002.safetensors listed in"):
        load_target(d2)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(EdgeMtpError, match="does not exist"):
        load_target(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeMtpError, match="No config.json in"):
        load_target(tmp_path / "empty")


def test_wrong_assistant_for_target(tmp_path, hf_pairs):
    mqa = load_target(hf_pairs["tiny-mqa"]["target_dir"])
    with pytest.raises(PairMismatchError, match="does not belong to this target"):
        load_drafter(hf_pairs["tiny"]["assistant_dir"], mqa.spec)


def test_repo_id_resolves_from_the_local_hf_cache(tmp_path, monkeypatch, synth_pair):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-gemma" / "snapshots" / "abc123"
    shutil.copytree(synth_pair / "target", snap)
    (cache / "models--acme--tiny-gemma" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-gemma" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    models = load_target("acme/tiny-gemma")
    assert models.spec.hidden_size == 64
    with pytest.raises(EdgeMtpError, match="not in the local Hugging Face cache|neither a directory nor a repo"):
        load_target("acme/absent-model")


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters: read through, tensor by tensor


Q_PROJ = "layers.1.self_attn.q_proj.weight"


def _lora(directory, base, pairs: dict, alpha: int = 8, rank: int = 4):
    """A PEFT adapter directory on `base` with LoRA pairs {checkpoint tensor name: (A, B)}."""
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": rank, "lora_alpha": alpha}))
    tensors = {}
    for name, (a, b) in pairs.items():
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = a.contiguous(), b.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def adapted(synth_pair, tmp_path_factory):
    """An adapter on the tiny target's layer-1 q_proj, and its base tensor name, A, B and scale (alpha / r)."""
    from edge_mtp.checkpoint.reading import CheckpointReader

    base = synth_pair / "target"
    name = CheckpointReader(base).language_prefix() + Q_PROJ
    out_features, in_features = CheckpointReader(base).shape(name)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, in_features, generator=gen), torch.randn(out_features, 4, generator=gen)
    adapter = _lora(tmp_path_factory.mktemp("lora") / "adapter", base, {name: (a, b)})
    return adapter, name, a, b, 8 / 4


def test_reading_through_an_adapter_gives_base_plus_delta_and_untouched_tensors_as_stored(synth_pair, adapted):
    from edge_mtp.checkpoint.reading import AdaptedReader, CheckpointReader, open_checkpoint

    adapter, name, a, b, scale = adapted
    plain, through = CheckpointReader(synth_pair / "target"), open_checkpoint(adapter)
    assert isinstance(through, AdaptedReader) and through.directory == synth_pair / "target"
    want = plain.tensor(name).float() + (b @ a) * scale
    assert torch.equal(through.tensor(name), want)
    torch.testing.assert_close(through.rows(name, 3, 7), want[3:7], rtol=1e-6, atol=1e-6)
    assert not torch.equal(want, plain.tensor(name).float())
    untouched = [n for n in plain.names() if n != name]
    assert untouched and all(torch.equal(through.tensor(n), plain.tensor(n)) and
                             through.tensor(n).dtype == plain.tensor(n).dtype for n in untouched)


def test_an_adapter_reads_as_its_explicitly_merged_checkpoint_everywhere_the_exporter_reads(synth_pair, adapted,
                                                                                           tmp_path):
    """Export, validate and the torch backend read targets through TargetCheckpoint (and validate's reference
    through transformers): every tensor and row block they read from the adapter equals the merged checkpoint's."""
    from edge_mtp.checkpoint.reading import CheckpointReader
    from edge_mtp.model.loading import TargetCheckpoint
    from edge_mtp.checks.reference import TransformersPair

    adapter, name, a, b, scale = adapted
    merged = _copy(synth_pair / "target", tmp_path / "merged")
    weights = {n: CheckpointReader(merged).tensor(n).clone() for n in CheckpointReader(merged).names()}
    weights[name] = weights[name].float() + (b @ a) * scale
    save_file(weights, str(merged / "model.safetensors"))
    through, explicit = TargetCheckpoint(adapter), TargetCheckpoint(merged)
    assert (through.origin, through.directory, through.spec) == (adapter, synth_pair / "target", explicit.spec)
    for entry in explicit.entries:
        assert torch.equal(through.read(entry), explicit.read(entry)), entry.name
    table = explicit.entry("embed_tokens_per_layer.weight", "per_layer_embedder")
    assert torch.equal(through.rows(table, 5, 9), explicit.rows(table, 5, 9))
    ids = [2, 7, 11, 5, 3]
    got, want = TransformersPair(adapter).forward(ids), TransformersPair(merged).forward(ids)
    assert np.array_equal(got["logits"], want["logits"])
    assert not np.array_equal(got["logits"], TransformersPair(synth_pair / "target").forward(ids)["logits"])


def _bad_adapters(synth_pair, adapted, root):
    adapter, name, a, b, _ = adapted
    missing = _lora(root / "missing-base", root / "no-such-base", {name: (a, b)})
    wide = _lora(root / "wide", synth_pair / "target", {name: (torch.zeros(4, a.shape[1] + 16), b)})
    foreign = _lora(root / "foreign", synth_pair / "target", {name.replace("q_proj", "gate_x"): (a, b)})
    return {"missing": (missing, "is not on this machine (base_model_name_or_path in adapter_config.json)"),
            "wide": (wide, f"does not fit the base {synth_pair / 'target'} ({name}: [{b.shape[0]}, {a.shape[1]}], "
                           f"not [{b.shape[0]}, {a.shape[1] + 16}])"),
            "foreign": (foreign, "gate_x.weight: no such tensor); point base_model_name_or_path")}


@pytest.mark.parametrize("command", ["export", "distill prepare"])
def test_an_adapter_without_its_base_or_for_another_base_is_one_error_line(synth_pair, adapted, tmp_path, command):
    from click.testing import CliRunner

    from edge_mtp.cli import main

    for case, (adapter, fragment) in _bad_adapters(synth_pair, adapted, tmp_path).items():
        out = tmp_path / f"out-{case}"
        options = (f"--assistant {synth_pair / 'assistant'} --out {out}.litertlm" if command == "export" else
                   f"--shards {out} --sequences 2 --eval-sequences 1 --seq-len 12 --prompt-len 4")
        result = CliRunner().invoke(main, [*command.split(), "--target", str(adapter), *options.split()])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code != 0 and lines and lines[-1].startswith("error: "), (case, result.stderr[-2000:])
        assert fragment in lines[-1], (case, lines[-1])
        assert "Traceback" not in result.output + result.stderr, case
        assert result.exception is None or isinstance(result.exception, SystemExit), (case, repr(result.exception))
        assert not list(tmp_path.glob(f"out-{case}*")), f"{case} left files behind"


def test_a_bundle_exported_from_an_adapter_holds_the_adapted_weights_and_names_its_adapter(synth_pair, tmp_path):
    """Export --target ADAPTER through the CLI: validate with the recorded source passes, and against the bare base
    exactly the adapted tensors (one attention, one MLP weight) differ."""
    from click.testing import CliRunner

    from conftest import BUNDLE_CONTEXT, BUNDLE_PREFILL
    from edge_mtp.bundle.litertlm import read_litertlm
    from edge_mtp.checkpoint.reading import CheckpointReader
    from edge_mtp.cli import main

    base = synth_pair / "target"
    reader, gen = CheckpointReader(base), torch.Generator().manual_seed(1)
    adapted = [Q_PROJ, "layers.3.mlp.down_proj.weight"]
    pairs = {}
    for name in adapted:
        out_features, in_features = reader.shape(reader.language_prefix() + name)
        pairs[reader.language_prefix() + name] = (torch.randn(4, in_features, generator=gen),
                                                  torch.randn(out_features, 4, generator=gen))
    adapter = _lora(tmp_path / "adapter", base, pairs)
    bundle = tmp_path / "adapted.litertlm"
    # tiny_bundle's geometry and assistant: this export refills the layer templates the session converted for it
    result = CliRunner().invoke(main, [
        "export", "--target", str(adapter), "--assistant", str(synth_pair / "assistant"), "--out", str(bundle),
        "--context", str(BUNDLE_CONTEXT), "--prefill", ",".join(map(str, BUNDLE_PREFILL)), "--quant", "fp32"])
    assert result.exit_code == 0, result.output[-3000:]
    assert read_litertlm(bundle).manifest["source"]["target"] == str(adapter)

    validate = ["validate", str(bundle), "--weights-only", "--json"]
    result = CliRunner().invoke(main, validate)
    assert result.exit_code == 0, result.output[-3000:]
    result = CliRunner().invoke(main, [*validate, "--target", str(base)])
    assert result.exit_code == 1, result.output[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    problems = [p for c in report["checks"] for p in c["metrics"]["problems"]]
    assert sorted(p.split()[1] for p in problems) == sorted(adapted), problems


_READ_CHILD = r"""
import json, sys
from pathlib import Path
from edge_mtp.checkpoint.reading import open_checkpoint
from edge_mtp.util.memory import PeakMemory, tree_rss_bytes
reader = open_checkpoint(Path(sys.argv[1]))
names = reader.names()
reader.tensor(names[0])  # allocator and BLAS warmed up
base = tree_rss_bytes()
with PeakMemory(interval=0.005) as memory:
    for name in names:
        assert reader.tensor(name).dtype == __import__("torch").float32
print(json.dumps({"increase": memory.peak - base}))
"""


def test_reading_through_an_adapter_holds_one_tensor_not_the_model(tmp_path):
    """Every weight of a 192 MiB checkpoint adapted and read in turn: the process grows by the rows read and their
    fp32 delta (measured: +16 MiB for 8 MiB tensors), never by the model. glibc's malloc is told to map every large
    block on its own, so a freed tensor leaves RSS at once instead of staying in its heap."""
    import os
    import subprocess
    import sys

    count, rows, cols = 24, 1024, 2048
    (tmp_path / "base").mkdir()
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(count)]
    save_file({n: torch.randn(rows, cols, generator=gen) for n in names}, str(tmp_path / "base" / "model.safetensors"))
    _lora(tmp_path / "adapter", tmp_path / "base",
          {n: (torch.randn(4, cols, generator=gen), torch.randn(rows, 4, generator=gen)) for n in names})
    proc = subprocess.run([sys.executable, "-c", _READ_CHILD, str(tmp_path / "adapter")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    increase, tensor = json.loads(proc.stdout.strip().splitlines()[-1])["increase"], rows * cols * 4
    assert increase <= 3 * tensor < count * tensor, (increase / 2**20, tensor / 2**20)
