"""distill's data: conversations rendered with the chat template and trained on model turns only, JSONL / Parquet /
cached Hugging Face datasets read alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_mtp.checkpoint.spec import read_config, target_spec_from_config
from edge_mtp.demo import target_dir as demo_target
from edge_mtp.distill.data import Renderer, load_examples
from edge_mtp.util.errors import EdgeMtpError

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
