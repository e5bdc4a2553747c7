"""ONNX export (the streamed path every model size takes) and the onnxruntime backend: pieces vs PyTorch, the bundle
vs the streamed reference, greedy MTP equality, one shared KV buffer, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_mtp.bundle import open_bundle
from edge_mtp.bundle.onnx_folder import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest
from edge_mtp.export.driver import TOLERANCE
from edge_mtp.export.pipeline import export_onnx
from edge_mtp.export.signatures import compare_outputs, run_reference, sample_inputs
from edge_mtp.model.contract import DECODE, DRAFT, Contract, causal_mask, drafter_mask, k_name
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.backends.ort import OnnxBackend
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.speculative import SpeculativeDecoder
from edge_mtp.util.errors import EdgeMtpError

from helpers import assert_streamed_export, export_units
from conftest import BUNDLE_CONTEXT as CONTEXT, BUNDLE_PREFILL as PREFILL

PROMPTS = ["Hello world", "The quick brown fox", "abc", "Speculative decoding on a phone, exactly."]


@pytest.fixture(scope="module")
def onnx_bundle(onnx_recipe_bundle):
    """The synthetic tiny pair exported once to an ONNX bundle folder, every check on: (path, export summary,
    progress steps)."""
    return onnx_recipe_bundle("fp32")


@pytest.fixture(scope="module")
def reference(synth_pair):
    """The PyTorch modules of the same pair and the contract the bundle was exported with."""
    models = load_target(synth_pair / "target")
    drafter = load_drafter(synth_pair / "assistant", models.spec)
    return models, drafter, Contract(models.spec, drafter.spec, CONTEXT, 3, PREFILL)


@pytest.fixture()
def backend(onnx_bundle):
    return OnnxBackend(onnx_bundle[0], threads=1)


def test_export_checks_every_graph_and_signature(onnx_bundle):
    path, summary, progress = onnx_bundle
    assert_streamed_export(summary)  # every piece vs PyTorch, and the whole bundle vs the streamed reference
    done = [d for d, _ in progress]
    assert done == list(range(len(done))) and progress[-1][0] == progress[-1][1] == 6 + 5  # for an ETA
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(["manifest.json", "tokenizer.json", "tokenizer_config.json"] +
                           [f"{m}.onnx{x}" for m in ("embedder", "per_layer_embedder", "target", "drafter")
                            for x in ("", ".data")])


def test_manifest_records_the_contract(onnx_bundle, reference):
    path = onnx_bundle[0]
    manifest = read_manifest(path)
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert manifest["quantization"] == "fp32" and manifest["kv_output_name"] == "{name}_out"
    assert manifest["models"]["target"]["token_axis"] == {"name": "T", "min": 1, "max": 16}
    verify = manifest["signatures"]["verify"]
    shapes = {t["name"]: t["shape"] for t in verify["inputs"] + verify["outputs"]}
    assert shapes["input_pos"] == [4] and shapes["kv_cache_k_2"] == [1, 2, CONTEXT, 32]
    assert shapes["kv_cache_v_2"] == [1, 2, 32, CONTEXT]
    assert {"name": "kv_cache_k_0", "shape": [1, 2, CONTEXT, 16], "dtype": "float32",
            "onnx_name": "kv_cache_k_0_out"} in verify["outputs"]
    drafter_kv = {t["name"] for t in manifest["signatures"][DRAFT]["inputs"] if t["name"].startswith("kv_")}
    assert drafter_kv == {"kv_cache_k_1", "kv_cache_v_1", "kv_cache_k_2", "kv_cache_v_2"}
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {MANIFEST}
    opened = open_bundle(path)
    assert opened.contract == reference[2]
    tokenizer = opened.tokenizer
    assert tokenizer.bos == reference[0].spec.bos_token_id and tokenizer.stop_tokens == [1]
    assert tokenizer.decode(tokenizer.encode("abc")[1:]) == "abc"


def _new_rows(name: str, array: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return array[:, :, positions] if name.startswith("kv_cache_k") else array[..., positions]


def test_bound_graphs_match_pytorch_with_caches_written_in_place(backend, reference):
    """Each target signature run through the backend's in-place binding vs the PyTorch module; new KV rows too."""
    models, drafter, contract = reference
    units = {u.name: u for u in export_units(models, drafter, contract)}
    for signature, module in units["target"].signatures:
        inputs = sample_inputs(signature, contract, seed=7)
        for name, array in backend.kv_arrays.items():
            np.copyto(array, inputs[name])
        got = backend.run_target(signature.name, inputs["embeddings"], inputs["per_layer_embeddings"],
                                 inputs["input_pos"], inputs["mask"])
        got.update(backend.kv_arrays)
        want = run_reference(module, inputs)
        for name, row in compare_outputs(got, want).items():
            assert row["relative"] <= TOLERANCE, (signature.name, name, row)
        for name in backend.kv_arrays:  # the rows this signature wrote, on their own (not hidden by the old ones)
            rows = _new_rows(name, want[name], inputs["input_pos"])
            assert np.abs(_new_rows(name, got[name], inputs["input_pos"]) - rows).max() <= TOLERANCE * np.abs(rows).max()
    (signature, module), = units["drafter"].signatures
    inputs = sample_inputs(signature, contract, seed=8)
    for name in backend.drafter_kv_values():
        np.copyto(backend.kv_arrays[name], inputs[name])
    got = backend.run_drafter(inputs["activations"], inputs["input_pos"], inputs["mask"])
    for name, row in compare_outputs(got, run_reference(module, inputs)).items():
        assert row["relative"] <= TOLERANCE, (DRAFT, name, row)


def _generate(backend, prompts, tokenizer, mtp=True):
    out = []
    for prompt in prompts:
        decoder = SpeculativeDecoder(backend)
        tokens = list(decoder.generate(tokenizer.encode(prompt), max_tokens=20, mtp=mtp,
                                       stop_tokens=tokenizer.stop_tokens))
        out.append((tokens, [(r.position, r.drafts, r.target_argmax) for r in decoder.rounds]))
    return out


def test_greedy_mtp_equals_plain_and_pytorch(onnx_bundle, backend, reference):
    models, drafter, contract = reference
    tokenizer = open_bundle(onnx_bundle[0]).tokenizer
    torch_backend = TorchBackend(models, drafter, contract)
    onnx_mtp = _generate(backend, PROMPTS, tokenizer)
    onnx_plain = _generate(backend, PROMPTS, tokenizer, mtp=False)
    torch_mtp = _generate(torch_backend, PROMPTS, tokenizer)
    assert [t for t, _ in onnx_mtp] == [t for t, _ in onnx_plain] == [t for t, _ in torch_mtp]
    # every round drafted the same tokens from the same shared cache, and verify agreed with PyTorch's
    assert [r for _, r in onnx_mtp] == [r for _, r in torch_mtp]
    drafted = sum(len(d) for _, rounds in onnx_mtp for _, d, _ in rounds)
    assert drafted >= 3 * len(PROMPTS)


def test_target_and_drafter_share_one_kv_buffer(backend, reference):
    models, drafter, contract = reference
    pointers = {n: a.ctypes.data for n, a in backend.kv_arrays.items()}
    assert all(backend.kv_values[n].data_ptr() == p for n, p in pointers.items())  # wrapped, not copied
    assert all(v is backend.kv_values[n] for n, v in backend.drafter_kv_values().items())
    backend.reset()
    assert {n: a.ctypes.data for n, a in backend.kv_arrays.items()} == pointers
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 1, contract.target.hidden_size)).astype(np.float32)
    ple = rng.standard_normal((1, 1, contract.target.num_layers, contract.target.ple_dim)).astype(np.float32)
    def decode_at(position: int, scale: float) -> None:
        backend.run_target(DECODE, emb * scale, ple, np.array([position], np.int32), causal_mask(position, 1, CONTEXT))

    for position in range(6):
        decode_at(position, 1.0)
    store_k = k_name(contract.target.store_layers["full"])
    assert np.abs(backend.kv_arrays[store_k][:, :, 5]).max() > 0  # the target wrote into our own array
    bound_out = {o.data_ptr() for o in backend.bound[DECODE].binding.get_outputs()}
    assert set(pointers.values()) <= bound_out  # ...as the graph's output buffers, in place
    activations = rng.standard_normal((1, 1, 2 * contract.target.hidden_size)).astype(np.float32)
    pos, mask = np.array([5], np.int32), drafter_mask(5, CONTEXT)
    before = backend.run_drafter(activations, pos, mask)["projected_activations"]
    decode_at(5, -3.0)  # the target rewrites row 5; nothing is copied or rebound before the drafter runs again
    after = backend.run_drafter(activations, pos, mask)["projected_activations"]
    assert np.abs(after - before).max() > 1e-3
    caches = {n: torch.from_numpy(backend.read_kv(n)) for n in drafter.cache_names()}
    with torch.no_grad():
        want = drafter(torch.from_numpy(activations), torch.from_numpy(pos), torch.from_numpy(mask), **caches)
    assert np.abs(after - want["projected_activations"].numpy()).max() <= 1e-4 * np.abs(after).max()
    assert {n: backend.kv_values[n].data_ptr() for n in pointers} == pointers


# -- bad input ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def bundle_copy(onnx_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(onnx_bundle[0], tmp_path / "copy"))


def test_missing_file_is_reported(bundle_copy):
    (bundle_copy / "drafter.onnx.data").unlink()
    with pytest.raises(EdgeMtpError, match=r"is incomplete: drafter\.onnx\.data, listed in manifest\.json, is missing"):
        OnnxBackend(bundle_copy)


def test_modified_file_is_reported(bundle_copy):
    data = bytearray((bundle_copy / "target.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (bundle_copy / "target.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EdgeMtpError, match=r"target\.onnx\.data does not match its sha256 in manifest\.json"):
        OnnxBackend(bundle_copy)


def test_newer_format_version_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgeMtpError, match="was written by a newer edge-mtp .* upgrade edge-mtp"):
        OnnxBackend(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(EdgeMtpError, match="has no manifest.json, so it is not an edge-mtp ONNX bundle"):
        OnnxBackend(tmp_path)


def test_unknown_or_unavailable_provider(onnx_bundle):
    with pytest.raises(EdgeMtpError, match=r"Unknown execution provider 'tpu'; choose one of cpu, xnnpack, nnapi, "
                                           r"coreml, qnn \(this onnxruntime has: .*cpu"):
        OnnxBackend(onnx_bundle[0], provider="tpu")
    with pytest.raises(EdgeMtpError, match=r"'qnn' \(QNNExecutionProvider\) is not in this onnxruntime build; "
                                           "available: .*cpu"):
        OnnxBackend(onnx_bundle[0], provider="qnn")


def test_export_refuses_to_overwrite_a_foreign_folder(synth_pair, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(EdgeMtpError, match="is not empty and is not an edge-mtp ONNX bundle"):
        export_onnx(synth_pair / "target", synth_pair / "assistant", tmp_path, context=CONTEXT, prefill=PREFILL)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(EdgeMtpError, match="an ONNX bundle is a folder"):
        export_onnx(synth_pair / "target", synth_pair / "assistant", tmp_path / "x.litertlm", context=CONTEXT)


def test_interrupted_export_leaves_nothing(synth_pair, tmp_path):
    def interrupt(stage: str) -> None:
        if stage.startswith("exporting the target"):  # the embedders are already written in the partial folder
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(synth_pair / "target", synth_pair / "assistant", tmp_path / "b", context=CONTEXT,
                    prefill=PREFILL, on_stage=interrupt)
    assert list(tmp_path.iterdir()) == []  # no partial bundle, no scratch pieces


DEMO = Path(__file__).resolve().parent.parent / "edge_mtp" / "demo"
DEMO_CONTEXT = 128
_demo_fp32: list[Path] = []


def demo_fp32_bundle(tmp_path_factory) -> Path:
    """The demo pair as an fp32 ONNX bundle (context 128), exported once per session: these tests, the quantization
    tests (test_quantize) and the requantization tests (test_onnx_stream) all read the same folder."""
    if not _demo_fp32:
        out = tmp_path_factory.mktemp("onnx-demo") / "demo"
        export_onnx(DEMO / "target", DEMO / "assistant", out, context=DEMO_CONTEXT, prefill=PREFILL, check=False)
        _demo_fp32.append(out)
    return _demo_fp32[0]


@pytest.mark.skipif(not (DEMO / "target" / "model.safetensors").is_file(), reason="the demo pair is not shipped here")
def test_demo_pair_accepts_drafts_identically(tmp_path_factory):
    """On the trained demo pair (the drafter agrees with the target most of the time), ONNX and PyTorch accept the
    very same drafts, and MTP output equals plain output."""
    out = demo_fp32_bundle(tmp_path_factory)
    backend = OnnxBackend(out, threads=1)
    opened = open_bundle(out)
    contract, tokenizer = opened.contract, opened.tokenizer
    models = load_target(DEMO / "target")
    torch_backend = TorchBackend(models, load_drafter(DEMO / "assistant", models.spec), contract)
    prompts = ["The quick brown fox", "def main():", "import os"]
    onnx_mtp, torch_mtp = _generate(backend, prompts, tokenizer), _generate(torch_backend, prompts, tokenizer)
    assert [t for t, _ in onnx_mtp] == [t for t, _ in _generate(backend, prompts, tokenizer, mtp=False)]
    assert onnx_mtp == torch_mtp  # tokens, and every round's drafts and verify argmaxes
    rounds = [r for _, rs in onnx_mtp for r in rs]
    accepted = sum(next((i for i, (d, a) in enumerate(zip(drafts, argmax)) if d != a), len(drafts))
                   for _, drafts, argmax in rounds)
    assert accepted >= len(rounds)  # the drafter is really being used: at least one accepted draft per round
