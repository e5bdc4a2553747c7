"""Checkpoint reading: layouts, shards, dtypes, the HF cache, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from edge_mtp.errors import CheckpointError, EdgeMtpError, PairMismatchError
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.spec import preset_pair
from edge_mtp.synth import write_target


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
    from edge_mtp.contract import Contract, causal_mask
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
