"""distill's data: conversations rendered with the chat template and trained on model turns only, JSONL / Parquet /
cached Hugging Face datasets read alike, and LoRA adapters merged into the target at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_mtp.demo import target_dir as demo_target
from edge_mtp.distill.data import Renderer, load_examples
from edge_mtp.errors import EdgeMtpError
from edge_mtp.spec import read_config, target_spec_from_config

CHAT = [{"role": "user", "content": "What does len return?"},
        {"role": "assistant", "content": "The number of items in a container."},
        {"role": "user", "content": "And for a string?"},
        {"role": "assistant", "content": "Its number of characters."}]
TEXTS = ["Return the number of items in a sequence or collection. " * 3,
         "The list is a mutable sequence, typically used to store collections. " * 3]


@pytest.fixture(scope="module")
def spec():
    return target_spec_from_config(read_config(demo_target()))


def test_conversations_train_model_turns_only(spec):
    renderer = Renderer(demo_target(), spec, prompt_len=16, seq_len=256)
    (example,) = list(renderer.examples({"messages": CHAT}, Path("chat.jsonl")))
    tok = renderer.tok
    said = tok.decode([t for t, on in zip(example.tokens, example.trained) if on])
    heard = tok.decode([t for t, on in zip(example.tokens, example.trained) if not on])
    for turn in CHAT:
        assert (turn["content"] in said) == (turn["role"] == "assistant"), (said, heard)
        assert (turn["content"] in heard) == (turn["role"] == "user"), (said, heard)


def test_a_messages_file_without_model_turns_is_refused(spec, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT[:1]}) for _ in range(3)))
    with pytest.raises(EdgeMtpError, match="have no model turn"):
        load_examples(demo_target(), spec, [data], None, 4, 1, 16, 64, 0)


def test_jsonl_parquet_and_a_cached_dataset_give_the_same_examples(spec, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": TEXTS[i % 2]} for i in range(30)] + [{"messages": CHAT}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": r.get("text"), "messages": r.get("messages")} for r in records]),
                   parquet)
    # a dataset repo as huggingface_hub caches it: datasets--owner--name/{refs/main, snapshots/<commit>/...}
    hub = tmp_path / "hub"
    repo = hub / "datasets--someone--docs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "train.jsonl").write_text(jsonl.read_text())
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))

    def sample(data):
        train, evals = load_examples(demo_target(), spec, [data], None, 12, 2, 8, 64, 3)
        return [(e.tokens, e.trained) for e in train], [(e.tokens, e.trained) for e in evals]

    want = sample(jsonl)
    assert sample(parquet) == want and sample("someone/docs") == want
    assert len(want[0]) == 12 and len(want[1]) == 2


def test_unknown_data_is_one_clear_error(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EdgeMtpError, match="neither a data file nor a dataset in the local Hugging Face cache"):
        load_examples(demo_target(), spec, ["nobody/nothing"], None, 4, 1, 16, 64, 0)


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters


def _adapter(directory: Path, base: Path, module: str, a: torch.Tensor, b: torch.Tensor, alpha: int) -> Path:
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": a.shape[0], "lora_alpha": alpha}))
    save_file({f"base_model.model.{module}.lora_A.weight": a.contiguous(),
               f"base_model.model.{module}.lora_B.weight": b.contiguous()}, str(directory / "adapter_model.safetensors"))
    return directory


def test_a_lora_adapter_is_merged_into_its_base(synth_pair, tmp_path):
    from edge_mtp.distill.adapter import load_target_or_adapter, resolve_target
    from edge_mtp.model.loading import TargetCheckpoint, load_target

    base = synth_pair / "target"
    checkpoint = TargetCheckpoint(base)
    entry = next(e for e in checkpoint.entries if e.local == "layers.1.self_attn.q_proj.weight")
    out_features, in_features = entry.shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, in_features, generator=gen), torch.randn(out_features, 4, generator=gen)
    adapter = _adapter(tmp_path / "adapter", base, checkpoint.prefix + entry.name.removesuffix(".weight"), a, b, 8)
    assert resolve_target(adapter) == (base, adapter)
    merged = load_target_or_adapter(*resolve_target(adapter))
    plain = load_target(base)
    want = plain.target.layers[1].self_attn.q_proj.weight + b @ a * (8 / 4)
    torch.testing.assert_close(merged.target.layers[1].self_attn.q_proj.weight, want)
    torch.testing.assert_close(merged.target.layers[2].self_attn.q_proj.weight,
                               plain.target.layers[2].self_attn.q_proj.weight)


def test_an_adapter_for_another_base_is_refused(synth_pair, tmp_path):
    from edge_mtp.distill.adapter import load_target_or_adapter, resolve_target
    from edge_mtp.model.loading import TargetCheckpoint

    base = synth_pair / "target"
    checkpoint = TargetCheckpoint(base)
    entry = next(e for e in checkpoint.entries if e.local == "layers.1.self_attn.q_proj.weight")
    a, b = torch.zeros(4, entry.shape[1] + 16), torch.zeros(entry.shape[0], 4)  # a wider base's projection
    adapter = _adapter(tmp_path / "adapter", base, checkpoint.prefix + entry.name.removesuffix(".weight"), a, b, 8)
    with pytest.raises(EdgeMtpError, match="does not fit the base .* trained on another base"):
        load_target_or_adapter(*resolve_target(adapter))
