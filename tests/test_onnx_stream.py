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
from edge_mtp.errors import EdgeMtpError
from edge_mtp.export import onnx as onnx_export
from edge_mtp.export import onnx_stitch, onnx_tables
from edge_mtp.export.onnx import export_onnx
from edge_mtp.export.onnx_quantize import quantize_graph
from edge_mtp.export.onnx_stitch import GraphStitcher
from edge_mtp.export.onnx_tables import locate_table, write_table

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
    placed, edit = write_table(located, stitcher, read_rows, VOCAB)
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
    from edge_mtp.contract import Contract
    from edge_mtp.model.loading import load_target

    models = load_target(synth_pair / "target")
    contract = Contract(models.spec, None, CONTEXT, 3, PREFILL)
    path = onnx_export.export_target_graph(models.target, contract, tmp_path / "t.onnx")
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
    real = onnx_export.export_piece

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

    monkeypatch.setattr(onnx_export, "export_piece", wrong_layer_2)
    with pytest.raises(EdgeMtpError, match="converted layer_2 signature .* differs from PyTorch"):
        export_onnx(synth_pair / "target", None, tmp_path / "b", context=CONTEXT, prefill=PREFILL)
    assert list(tmp_path.iterdir()) == []


def test_a_miswired_join_fails_the_end_to_end_check(synth_pair, tmp_path, monkeypatch):
    """Every piece right but a KV-shared layer joined to another layer's cache: only the bundle check can see it."""
    real = onnx_export.layer_rename

    def miswired(target, i, piece):
        names = real(target, i, piece)
        if i == target.spec.num_layers - 2:  # a sliding layer reading the shared cache: give it layer 0's
            names.update(k_cache="kv_cache_k_0", v_cache="kv_cache_v_0")
        return names

    monkeypatch.setattr(onnx_export, "layer_rename", miswired)
    with pytest.raises(EdgeMtpError, match="does not reproduce the model: logit error .* nothing was written"):
        export_onnx(synth_pair / "target", None, tmp_path / "b", context=CONTEXT, prefill=PREFILL)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_sentence_and_leaves_nothing(synth_pair, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_stitch, "_copy", full)
    with pytest.raises(EdgeMtpError, match=r"The disk holding .* is full; free space"):
        export_onnx(synth_pair / "target", None, tmp_path / "b", context=CONTEXT, prefill=PREFILL)
    assert list(tmp_path.iterdir()) == []
