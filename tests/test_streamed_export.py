"""The streamed export driver: table formats, the bundle check catching broken bundles, memory, disk full."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from edge_mtp.export import driver as driver_module
from edge_mtp.export import litert_format
from edge_mtp.export.pipeline import export_litert
from edge_mtp.export.quantize import component_recipe, quantize_file
from edge_mtp.export.tables import TableFormat, check_format, find_table
from edge_mtp.formats.tflite import read_tflite
from edge_mtp.util.errors import EdgeMtpError

from conftest import BUNDLE_CONTEXT as CONTEXT


def _lookup_model(tmp_path: Path, rows: np.ndarray) -> Path:
    """A converted embedding lookup over `rows` (the shape of a small-vocabulary table piece)."""
    import torch

    from edge_mtp.export.litert import convert_module

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding.from_pretrained(torch.from_numpy(rows))

        def forward(self, token_ids):
            return {"embeddings": self.table(token_ids.long()) * 2.0}

    samples = {"embedder": [{"token_ids": np.array([[3]], np.int32)}]}
    return convert_module({"embedder": Lookup()}, samples, tmp_path / "lookup.tflite")


@pytest.mark.parametrize("recipe", ["int8", "int4", "int4-b32", "int4-b64", "fp16"])
def test_our_table_quantization_is_byte_identical_to_ai_edge_quantizer(tmp_path, recipe):
    rows = (np.random.default_rng(0).standard_normal((101, 128)) * np.linspace(0.01, 3, 101)[:, None]).astype(np.float32)
    quantized = quantize_file(_lookup_model(tmp_path, rows), component_recipe(recipe), tmp_path / "q.tflite")
    model = read_tflite(quantized)
    slot = find_table(model, 101, 128)
    want_type = {"int8": 9, "int4": 17, "int4-b32": 17, "int4-b64": 17, "fp16": 1}[recipe]
    assert slot.format.tensor_type == want_type
    assert slot.format.block == {"int4-b32": 32, "int4-b64": 64}.get(recipe, 0)
    check_format(model, slot, rows)  # raises unless bytes and scales are the quantizer's own
    with pytest.raises(EdgeMtpError, match="no longer matches"):
        check_format(model, slot, rows * 1.01)


@pytest.mark.parametrize("fmt", [TableFormat(9), TableFormat(17, 32), TableFormat(17, 0), TableFormat(1)])
def test_table_dequantization_inverts_quantization_within_half_a_step(fmt):
    rows = np.random.default_rng(1).standard_normal((7, 64)).astype(np.float32)
    stored, scales = fmt.quantize(rows)
    back = fmt.dequantize(stored, scales, rows.shape)
    if scales is None:
        assert np.abs(back - rows).max() <= 1e-3
    else:
        step = scales.astype(np.float32).reshape(7, -1)
        step = np.repeat(step, 64 // step.shape[1], axis=1)
        assert np.all(np.abs(back - rows) <= 0.5 * step * 1.0001 + 1e-7)


def test_a_table_streamed_wrongly_is_caught_before_anything_is_written(synth_pair, tmp_path, monkeypatch):
    """A join that streams wrong rows into the LM head (here: all zeros, a pad-only model) fails the bundle check."""
    real = litert_format.QuantizedTable

    class ZeroHead(real):
        def __init__(self, fmt, read_rows, rows, width, path, on_rows=lambda n: None):
            zero = (lambda a, b: 0 * read_rows(a, b)) if path.name == "head.table" else read_rows
            super().__init__(fmt, zero, rows, width, path, on_rows)

    monkeypatch.setattr(litert_format, "QuantizedTable", ZeroHead)
    out = tmp_path / "broken.litertlm"
    with pytest.raises(EdgeMtpError, match="does not reproduce the model"):
        export_litert(synth_pair / "target", None, out, context=CONTEXT, prefill=(8,), quant="fp32")
    assert list(tmp_path.iterdir()) == []


def test_a_miswired_bundle_drafter_is_caught(synth_pair, tmp_path, monkeypatch):
    """The bundle's drafter reading shifted caches while the reference reads the right ones fails the check."""
    from helpers import ShiftedCaches

    real = driver_module.StreamedExport.drafter_model

    def shifted(self):
        right, self.drafter = self.drafter, ShiftedCaches(self.drafter)
        try:
            return real(self)
        finally:
            self.drafter = right

    monkeypatch.setattr(driver_module.StreamedExport, "drafter_model", shifted)
    with pytest.raises(EdgeMtpError, match="reads the wrong cache"):
        export_litert(synth_pair / "target", synth_pair / "assistant", tmp_path / "m.litertlm", context=CONTEXT,
                      prefill=(8,), quant="fp32")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(synth_pair, tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(litert_format.GraphJoiner, "append_buffer", full)
    with pytest.raises(EdgeMtpError, match="disk .* is full"):
        export_litert(synth_pair / "target", None, tmp_path / "m.litertlm", context=CONTEXT, prefill=(8,))
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_are_refused_naming_the_tensor(synth_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path / "nan"
    shutil.copytree(synth_pair / "target", target)
    shard = next(target.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("layers.2.mlp.up_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(EdgeMtpError, match=f"{name} .* NaN"):
        export_litert(target, None, tmp_path / "m.litertlm", context=CONTEXT, prefill=(8,))
    assert not (tmp_path / "m.litertlm").exists()


_MEMORY_CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from edge_mtp.export.litert import TfliteRunner, convert_module
from edge_mtp.export.pipeline import export_litert
from edge_mtp.util.memory import PeakMemory, tree_rss_bytes
root = Path(sys.argv[1])
warm = convert_module({"f": torch.nn.Linear(8, 8)}, {"f": [{"input": np.ones((1, 8), np.float32)}]}, root / "w.tflite")
TfliteRunner(warm)("f", {"input": np.ones((1, 8), np.float32)})  # converter, interpreter and XNNPACK initialised
base = tree_rss_bytes()
with PeakMemory() as memory:
    summary = export_litert(root / "target", root / "assistant", root / "wide.litertlm", context=256, prefill=(32,),
                            quant="int8")
pieces = summary.quantization["components"]
print(json.dumps({"increase": memory.peak - base, "largest": max(p["fp32_bytes"] for p in pieces.values())}))
"""


def test_exporting_the_wide_preset_holds_pieces_not_the_model(tmp_path):
    """Peak memory follows the largest piece, not the model.

    Measured (wide preset, int8, context 256): +414 MiB over a warmed-up process, largest piece 28 MiB (a double-wide
    decoder layer), all pieces 304 MiB in fp32. Converting the whole model, as the exporter did before, costs about
    3.9x the fp32 weights (1.2 GiB, 42x the largest piece). Most of the 414 MiB is the converter's and LiteRT's own
    working set, which does not grow with the model; 20x the largest piece leaves room for allocator noise and still
    fails an export that converts the model whole."""
    import json
    import subprocess
    import sys

    from edge_mtp.checkpoint.spec import preset_pair
    from edge_mtp.checkpoint.synth import write_drafter, write_target

    target, drafter = preset_pair("wide")
    write_target(tmp_path / "target", target, seed=0)
    write_drafter(tmp_path / "assistant", drafter, target, seed=1)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["increase"] <= 20 * row["largest"], row


def test_an_export_keeps_no_descriptor_of_the_files_it_deleted(tiny_bundle, recipe_bundle):
    """A piece file the export deletes must give its disk back at once. ai_edge_litert's reader left a descriptor
    open per file read, so deleted layer files kept their space until the process exited: 8 GiB halfway through an
    E4B int8 export, which would have filled the disk before its bundle check. A blockwise recipe reads pieces again
    to find the ops it must quantize channelwise (ai-edge-quantizer's reader leaked the same way)."""
    import os

    recipe_bundle("tiny", "int4-b32")

    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    assert [t for t in targets if ".edge-mtp-" in t] == []


def test_the_bundle_check_reports_its_phases_as_stages(tiny_bundle):
    """Long checks at real size show where they are (and export_scale measures each phase's peak memory)."""
    stages = tiny_bundle[1].stages
    check = [s for s in stages if s.startswith("checking:")]
    assert check == ["checking: the bundle's greedy continuations", "checking: the streamed PyTorch reference",
                     "checking: the bundle teacher-forced, and its drafter"]
    assert stages.index("writing the candidate bundle") < stages.index(check[0]) < stages.index("writing bundle")


def test_a_second_export_takes_layer_templates_from_the_cache(tiny_bundle, synth_pair, tmp_path, monkeypatch):
    """Layer templates depend on geometry and contract, not weights or recipe: re-exporting the tiny pair (with
    another recipe) converts no layer kind again, except one whose cached file is damaged."""
    from conftest import BUNDLE_PREFILL
    from edge_mtp.export import template_cache
    from edge_mtp.export.pieces import layer_kind
    from edge_mtp.checkpoint.spec import preset_pair

    converted, fetched = [], []
    real_convert, real_fetch = litert_format.convert_module, template_cache.fetch

    def counting_convert(modules, samples, path):
        converted.append(path.name)
        return real_convert(modules, samples, path)

    def damaging_fetch(key, to):
        fetched.append(key)
        found = real_fetch(key, to)
        if found and len(fetched) == 1:
            to.write_bytes(to.read_bytes()[:1000])
        return found

    monkeypatch.setattr(litert_format, "convert_module", counting_convert)
    monkeypatch.setattr(template_cache, "fetch", damaging_fetch)
    summary = export_litert(synth_pair / "target", synth_pair / "assistant", tmp_path / "again.litertlm",
                            context=CONTEXT, prefill=BUNDLE_PREFILL, quant="fp32")
    spec = preset_pair("tiny")[0]
    kinds = len({layer_kind(spec, i) for i in range(spec.num_layers)})
    assert len(fetched) == kinds > 1
    templates = [name for name in converted if name.startswith("kind")]
    assert templates == ["kind0.tflite"]  # only the damaged one was converted again
    assert len(converted) == 6  # embedder, per-layer embedder, prelude, head, drafter, and that template
    assert summary.quantization["logit_relative_error"] <= 1e-3  # layers refilled from cached templates are right


def test_storing_a_layer_template_removes_those_of_other_code_versions(tmp_path):
    """A template made by other code can never be fetched again; the cache must not keep it (E4B's fill the disk)."""
    from edge_mtp.util.cache import cache_root
    from edge_mtp.export import template_cache

    stale = cache_root() / "templates" / "000000000000-0123.tflite"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old graph")
    made = tmp_path / "made.tflite"
    made.write_bytes(b"new graph")
    template_cache.store("fresh", made)
    assert not stale.exists()
    assert template_cache.fetch("fresh", tmp_path / "back.tflite")
    assert (tmp_path / "back.tflite").read_bytes() == b"new graph"


def test_the_drafter_head_at_gemma_vocabulary_size_holds_its_inverse_ordering_as_a_constant(tmp_path):
    """At 262144 tokens the converter no longer folds an in-graph inverse of token_ordering: the graph would scatter
    the whole vocabulary on every draft step (37 of 44 ms on E2B). The head must hold the inverse as a constant and
    still match PyTorch, for a shuffled ordering set after the module was built."""
    import dataclasses

    import torch

    from edge_mtp.model.contract import Contract
    from edge_mtp.export.driver import check_piece
    from edge_mtp.export.litert import TfliteRunner, convert_module
    from edge_mtp.export.pieces import PieceSamples
    from edge_mtp.export.signatures import SignatureModule, sample_inputs
    from edge_mtp.formats.tflite import op_name
    from edge_mtp.model.drafter import Drafter
    from edge_mtp.checkpoint.spec import preset_pair

    target, small = preset_pair("tiny")
    spec = dataclasses.replace(small, vocab_size=262144, num_centroids=2048, centroid_top_k=4)
    torch.manual_seed(0)
    drafter = Drafter(spec, target).eval()
    for p in drafter.parameters():
        p.data.normal_(0, 0.5)
    drafter.token_ordering.copy_(torch.randperm(spec.vocab_size).to(torch.int32))
    drafter.refresh_inverse_ordering()
    contract = Contract(target, spec, 32, 3, (8,))
    sig = contract.drafter_signature()
    module = SignatureModule(drafter, sig, ("activations", "input_pos", "mask"))
    samples = {sig.name: [sample_inputs(sig, contract, seed=seed) for seed in (0, 100, 101)]}
    path = convert_module({sig.name: module}, samples, tmp_path / "drafter.tflite")
    model = read_tflite(path)
    ops = {op_name(model, op) for g in model.subgraphs for op in g.operators}
    assert not {o for o in ops if "SCATTER" in o}, ops
    report = check_piece(TfliteRunner(path), module, PieceSamples(samples))[sig.name]
    assert report["logits"]["relative"] <= 1e-4, report
