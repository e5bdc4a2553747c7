"""The streamed ONNX path's own parts: vocabulary tables quantized in row chunks (never whole in fp32) into the
quantizer's very bytes, the joined target graph (per-layer weights streamed into one data file), and the checks that
stop a miscompiled piece, a miswired join or a full disk without leaving anything behind."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import BUNDLE_CONTEXT as CONTEXT, BUNDLE_PREFILL as PREFILL
from edge_mtp.export import driver, onnx_format
from edge_mtp.export import onnx_data, onnx_tables
from edge_mtp.export.pipeline import export_onnx
from edge_mtp.export.onnx_quantize import quantize_graph
from edge_mtp.export.onnx_stitch import GraphStitcher
from edge_mtp.export.onnx_tables import locate_table, write_table
from edge_mtp.util.errors import EdgeMtpError

VOCAB, WIDTH, SMALL, CHUNK_ROWS = 150, 64, 13, 7


def _table_graph(path, table: np.ndarray, lookup: bool) -> None:
    """A Gather on `table` (an embedder) or a MatMul by its transpose (a tied LM head), with external data."""
    if lookup:
        node = helper.make_node("Gather", ["table", "ids"], ["out"])
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])]
        init = numpy_helper.from_array(table, "table")
    else:
        node = helper.make_node("MatMul", ["x", "table"], ["out"])
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, WIDTH])]
        init = numpy_helper.from_array(np.ascontiguousarray(table.T), "table")
    graph = helper.make_graph([node], "t", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def _stored(path) -> dict[str, bytes]:
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i).tobytes() if i.data_type != TensorProto.INT4 else i.raw_data
            for i in graph.initializer}


@pytest.mark.parametrize("lookup", [True, False], ids=["gather", "matmul"])
@pytest.mark.parametrize("recipe", ["fp32", "fp16", "int8", "int4"])
def test_tables_quantized_in_row_chunks_equal_the_quantizer_on_the_whole_table(tmp_path, monkeypatch, recipe, lookup):
    table = np.random.default_rng(0).standard_normal((VOCAB, WIDTH)).astype(np.float32) * 0.1
    table[40] *= 30  # one outlier row: a per-tensor range must come from the whole table, not a chunk
    _table_graph(tmp_path / "whole.onnx", table, lookup)
    want = _stored(quantize_graph(tmp_path / "whole.onnx", recipe, tmp_path / "whole.q.onnx"))

    _table_graph(tmp_path / "small.onnx", table[:SMALL], lookup)
    quantized = quantize_graph(tmp_path / "small.onnx", recipe, tmp_path / "small.q.onnx")
    located = locate_table(tmp_path / "small.onnx", quantized, SMALL, table[:SMALL], recipe)
    monkeypatch.setattr(onnx_tables, "ROW_CHUNK_BYTES", 4 * WIDTH * CHUNK_ROWS)
    reads = []

    def read_rows(a: int, b: int) -> np.ndarray:
        reads.append(b - a)
        return table[a:b]

    stitcher = GraphStitcher(tmp_path / "joined.onnx.data")
    placed, edit = write_table(located, stitcher.data, read_rows, VOCAB)
    stitcher.add(quantized, "t", placed=placed, edit=edit)
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    source = onnx.load(str(quantized), load_external_data=False).graph
    stitcher.finish(tmp_path / "joined.onnx", list(source.input), [output], {"out": "out"})
    assert max(reads) <= CHUNK_ROWS  # never more than a chunk of the table in fp32
    got = {name.removeprefix("t/"): value for name, value in _stored(tmp_path / "joined.onnx").items()}
    assert set(got) == set(want) and all(got[n] == want[n] for n in want), recipe
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "joined.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(tmp_path / "whole.q.onnx"), providers=["CPUExecutionProvider"])
    feed = {"ids": np.array([[VOCAB - 1]], np.int64)} if lookup else \
        {"x": np.random.default_rng(1).standard_normal((1, 3, WIDTH)).astype(np.float32)}
    assert np.array_equal(session.run(None, feed)[0], reference.run(None, feed)[0])


def test_joined_target_streams_every_layer_into_one_data_file(synth_pair, tmp_path):
    from edge_mtp.model.contract import Contract
    from edge_mtp.model.loading import load_target

    models = load_target(synth_pair / "target")
    contract = Contract(models.spec, None, CONTEXT, 3, PREFILL)
    path = onnx_format.export_target_graph(models.target, contract, tmp_path / "t.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "t.onnx.data"]  # no scratch left
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [i for i in graph.initializer if i.data_location == TensorProto.EXTERNAL]
    spans = sorted((int(e["offset"]), int(e["length"])) for e in
                   ({x.key: x.value for x in i.external_data} for i in external))
    assert all(a % 64 == 0 for a, _ in spans)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no weight overlaps another
    assert spans[-1][0] + spans[-1][1] == (tmp_path / "t.onnx.data").stat().st_size
    owners = {i.name.split("/")[0] for i in external}
    assert {f"layer_{k}" for k in range(models.spec.num_layers)} | {"head"} <= owners
    matmuls = [i for i in external if len(i.dims) == 2 and i.name.startswith("layer_")]
    assert len({i.name for i in matmuls}) == len(matmuls) >= 3 * models.spec.num_layers  # one copy per layer


def test_a_miscompiled_piece_stops_the_export(synth_pair, tmp_path, monkeypatch):
    """A layer whose exported graph is not its PyTorch module (here: one weight row negated while exporting; a
    uniform scale would vanish in the post-norm) is refused by its own check, before anything is published."""
    real = onnx_format.export_piece

    def wrong_layer_2(module, samples, path, inputs=None):
        if path.name != "layer_2.onnx":
            return real(module, samples, path, inputs)
        weight = module.layer.mlp.down_proj.weight
        saved = weight.data.clone()
        weight.data[0].neg_()
        try:
            return real(module, samples, path, inputs)
        finally:
            weight.data.copy_(saved)

    monkeypatch.setattr(onnx_format, "export_piece", wrong_layer_2)
    with pytest.raises(EdgeMtpError, match="converted layer_2 signature .* differs from PyTorch"):
        export_onnx(synth_pair / "target", None, tmp_path / "b", context=CONTEXT, prefill=PREFILL)
    assert list(tmp_path.iterdir()) == []


def test_a_miswired_join_fails_the_end_to_end_check(synth_pair, tmp_path, monkeypatch):
    """Every piece right but a KV-shared layer joined to another layer's cache: only the bundle check can see it."""
    real = driver.layer_rename

    def miswired(target, i, piece):
        names = real(target, i, piece)
        if i == target.spec.num_layers - 2:  # a sliding layer reading the shared cache: give it layer 0's
            names.update(k_cache="kv_cache_k_0", v_cache="kv_cache_v_0")
        return names

    monkeypatch.setattr(driver, "layer_rename", miswired)
    with pytest.raises(EdgeMtpError, match="does not reproduce the model: logit error .* nothing was written"):
        export_onnx(synth_pair / "target", None, tmp_path / "b", context=CONTEXT, prefill=PREFILL)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_sentence_and_leaves_nothing(synth_pair, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_data, "_copy", full)
    with pytest.raises(EdgeMtpError, match=r"The disk holding .* is full; free space"):
        export_onnx(synth_pair / "target", None, tmp_path / "b", context=CONTEXT, prefill=PREFILL)
    assert list(tmp_path.iterdir()) == []


# -- quantize: a finished fp32 bundle rewritten one weight group at a time --------------------------------------------

@pytest.fixture(scope="module")
def demo_fp32(tmp_path_factory):
    from test_onnx import DEMO, demo_fp32_bundle

    if not (DEMO / "target" / "model.safetensors").is_file():
        pytest.skip("the demo pair is not shipped here")
    return demo_fp32_bundle(tmp_path_factory)


@pytest.mark.parametrize("recipe", ["fp16", "int8", "int4", "int4-b64"])
def test_requantizing_a_finished_graph_gives_the_quantizers_bytes(demo_fp32, tmp_path, monkeypatch, recipe):
    """Each graph of a finished bundle, rewritten group by group (tables in chunks of a few rows), stores exactly
    what onnxruntime's quantizer gives for the whole graph; the drafter, which the export quantizes whole, also gets
    the very same nodes."""
    from edge_mtp.bundle.onnx_folder import contract_from_manifest, read_manifest
    from edge_mtp.export import onnx_requantize
    from edge_mtp.export.onnx_requantize import requantize_graph

    monkeypatch.setattr(onnx_tables, "ROW_CHUNK_BYTES", 4 * 256 * 5)
    monkeypatch.setattr(onnx_requantize, "ROW_CHUNK_BYTES", 4 * 256 * 5)
    vocab = contract_from_manifest(read_manifest(demo_fp32, verify=False), "demo").target.vocab_size
    for model in ("embedder", "per_layer_embedder", "target", "drafter"):
        src = demo_fp32 / f"{model}.onnx"
        (tmp_path / "whole").mkdir(exist_ok=True)
        whole = quantize_graph(src, recipe, tmp_path / "whole" / src.name)
        ours = requantize_graph(src, recipe, tmp_path / src.name, vocab, tmp_path)
        assert _stored(ours) == _stored(whole), model
        if model == "drafter":
            nodes = [sorted(str(n) for n in onnx.load(str(p), load_external_data=False).graph.node)
                     for p in (ours, whole)]
            assert nodes[0] == nodes[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["whole"] + [f"{m}.onnx{x}" for m in (
        "embedder", "per_layer_embedder", "target", "drafter") for x in ("", ".data")])  # no scratch left


def _bundle_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_quantize_refuses_damaged_input_in_one_sentence(demo_fp32, tmp_path):
    from edge_mtp.export.onnx_requantize import quantize_onnx_bundle
    from edge_mtp.export.onnx_requantize import requantize_graph

    modified, truncated = (_bundle_copy(demo_fp32, tmp_path / name) for name in ("modified", "truncated"))
    with open(modified / "drafter.onnx.data", "r+b") as f:
        f.seek(1000)
        f.write(bytes([f.read(1)[0] ^ 1]))
    with pytest.raises(EdgeMtpError, match="drafter.onnx.data does not match its sha256"):
        quantize_onnx_bundle(modified, tmp_path / "q", "int4")
    data = truncated / "drafter.onnx.data"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(EdgeMtpError, match="truncated"):
        quantize_onnx_bundle(truncated, tmp_path / "q", "int4")
    # a graph whose own offsets run past its data file (no manifest to catch it first)
    with pytest.raises(EdgeMtpError, match=r"drafter.onnx.data has \d+ bytes but tensor .* is stored at bytes"):
        requantize_graph(truncated / "drafter.onnx", "int4", tmp_path / "d.onnx", 2048, tmp_path)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("failure", ["disk full", "interrupted"])
def test_an_interrupted_quantize_leaves_nothing(demo_fp32, tmp_path, monkeypatch, failure):
    from edge_mtp.export import onnx_requantize
    from edge_mtp.export.onnx_requantize import quantize_onnx_bundle

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def interrupt(self, group):
        raise KeyboardInterrupt

    if failure == "disk full":
        monkeypatch.setattr(onnx_data, "_copy", full)
        with pytest.raises(EdgeMtpError, match=r"The disk holding .* is full; free space"):
            quantize_onnx_bundle(demo_fp32, tmp_path / "q", "int8")
    else:
        monkeypatch.setattr(onnx_requantize._Rewrite, "_quantize", interrupt)
        with pytest.raises(KeyboardInterrupt):
            quantize_onnx_bundle(demo_fp32, tmp_path / "q", "int8")
    assert list(tmp_path.iterdir()) == []  # no partial bundle, no scratch


_MEMORY_CHILD = """
import json, sys, tempfile
from pathlib import Path
import onnx
from edge_mtp.export.onnx_data import stored_nbytes
from edge_mtp.export.onnx_requantize import requantize_graph
from edge_mtp.util.memory import PeakMemory, tree_rss_bytes
src, recipe = Path(sys.argv[1]), sys.argv[2]
largest = max(stored_nbytes(i) for i in onnx.load(str(src), load_external_data=False).graph.initializer)
with tempfile.TemporaryDirectory() as out:
    out = Path(out)
    requantize_graph(src, recipe, out / "warm.onnx", 8192, out)  # onnxruntime's quantizer imported and run once
    base = tree_rss_bytes()
    with PeakMemory(interval=0.02) as memory:
        requantize_graph(src, recipe, out / "target.onnx", 8192, out)
print(json.dumps({"increase": memory.peak - base, "largest": largest}))
"""


def test_quantizing_the_wide_preset_holds_one_weight_group_not_the_graph(tmp_path):
    """Peak memory of `quantize` follows the largest weight, not the graph.

    Measured on the wide preset's fp32 target graph (275 MB of weights, largest tensor the 16 MiB tied embedding):
    +49 MiB (int4) and +50 MiB (int8) over a process that has quantized once, about 3x the largest tensor (a chunk of
    the table in fp32, its encoding, and onnxruntime's copies of one group). Quantizing the graph whole, as quantize
    did before, costs +328 MiB (int4, 20x) and +834 MiB (int8, 52x). 6x leaves room for allocator noise and still
    fails a rewrite that holds the graph's weights."""
    import json
    import subprocess
    import sys

    from edge_mtp.model.contract import Contract
    from edge_mtp.export.onnx_format import export_target_graph
    from edge_mtp.model.loading import load_target
    from edge_mtp.checkpoint.spec import preset_pair
    from edge_mtp.checkpoint.synth import write_target

    target, _ = preset_pair("wide")
    write_target(tmp_path / "target", target, seed=0)
    models = load_target(tmp_path / "target")
    path = export_target_graph(models.target, Contract(models.spec, None, 256, 3, (32,)), tmp_path / "target.onnx")
    del models
    for recipe in ("int8", "int4"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(path), recipe], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["increase"] <= 6 * row["largest"], (recipe, row)
