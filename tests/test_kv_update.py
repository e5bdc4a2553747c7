"""The in-place cache write and read of LiteRT targets that take `param_tensor` (edge_mtp/model/kv_update.py).

On the CPU the composites run their decompositions, which must equal the plain forms; converted, they must be the
StableHLO composites LiteRT's GPU delegate lowers (odml.cache_update, odml.runtime_bmm reading a cache update).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_mtp.model.contract import causal_mask, param_values
from edge_mtp.model.kv_update import attend_in_place, write_rows
from edge_mtp.model.layers import attend, sliding_window_mask, write_cache

HKV, H, HD, C = 2, 4, 8, 32


def _case(t: int, start: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    caches = torch.randn(1, HKV, C, HD, generator=g), torch.randn(1, HKV, HD, C, generator=g)
    rows = torch.randn(1, HKV, t, HD, generator=g), torch.randn(1, HKV, t, HD, generator=g)
    q = torch.randn(1, H, t, HD, generator=g)
    pos = torch.arange(start, start + t, dtype=torch.int32)
    return caches, rows, q, pos, torch.from_numpy(param_values(start, t))


class InPlaceLayer(torch.nn.Module):
    """Write t rows in place, then attend over the caches with a sliding-window mask (a layer's cache traffic)."""

    def forward(self, k_cache, v_cache, k, v, q, input_pos, mask, param_tensor):
        k_cache, v_cache = write_rows(k_cache, v_cache, k, v, input_pos, "dus", param_tensor)
        return {"out": attend_in_place(q, k_cache, v_cache, mask, param_tensor), "k": k_cache, "v": v_cache}


@pytest.mark.parametrize("t,start", [(1, 0), (1, 17), (4, 9)])
def test_in_place_forms_equal_the_plain_ones_on_the_cpu(t, start):
    (kc, vc), (k, v), q, pos, param = _case(t, start)
    mask = torch.minimum(torch.from_numpy(causal_mask(start, t, C))[0, 0], sliding_window_mask(pos, 6, C))
    want_k, want_v = write_cache(kc, vc, k, v, pos, "dus")
    got_k, got_v = write_rows(kc, vc, k, v, pos, "dus", param)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert not torch.equal(want_k, kc)  # the rows were written
    want = attend(q, want_k, want_v, mask)
    got = attend_in_place(q, want_k, want_v, mask, param)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """InPlaceLayer converted to LiteRT: (path, numpy inputs, PyTorch outputs)."""
    import litert_torch

    (kc, vc), (k, v), q, pos, param = _case(4, 9)
    args = dict(k_cache=kc, v_cache=vc, k=k, v=v, q=q, input_pos=pos, mask=torch.from_numpy(causal_mask(9, 4, C)),
                param_tensor=param)
    path = tmp_path_factory.mktemp("kv_update") / "layer.tflite"
    litert_torch.convert(InPlaceLayer().eval(), sample_kwargs=args).export(str(path))
    return path, {n: a.numpy() for n, a in args.items()}, {n: t.numpy() for n, t in InPlaceLayer()(**args).items()}


def _composites(model: bytes) -> list[str]:
    """Names of the STABLEHLO_COMPOSITE ops of the first subgraph, in order."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    return [op.builtinOptions2.name.decode() for op in m.subgraphs[0].operators
            if isinstance(op.builtinOptions2, schema.StableHLOCompositeOptionsT)]


def _matches(got: dict, want: dict) -> None:
    for name, value in want.items():
        assert np.abs(got[name] - value).max() <= 1e-5 * max(1.0, float(np.abs(value).max())), name


def test_converted_in_place_layer_is_the_gpu_composites_and_matches_pytorch(converted):
    from edge_mtp.export.litert import TfliteRunner

    from edge_mtp.runtime.gpu_check import check_model

    path, inputs, want = converted
    assert _composites(path.read_bytes()) == ["odml.cache_update", "odml.runtime_bmm", "odml.runtime_bmm"]
    _matches(TfliteRunner(path)("serving_default", inputs), want)
    assert [f for r in check_model(path.read_bytes()).values() for f in r.findings] == []


def test_inlined_composites_compute_the_same(converted, tmp_path):
    from edge_mtp.export.litert import TfliteRunner
    from edge_mtp.runtime.backends.inline import inline_composites

    path, inputs, want = converted
    inlined = tmp_path / "inlined.tflite"
    inlined.write_bytes(inline_composites(path.read_bytes()))
    assert _composites(inlined.read_bytes()) == []
    _matches(TfliteRunner(inlined)("serving_default", inputs), want)


def test_an_in_place_bundle_exports_and_decodes_like_the_default_one(gpu_demo, demo_bundle, tmp_path):
    """The in-place demo (export --gpu: param_tensor, composites) joined through the streamed driver and passed the
    bundle check against the streamed PyTorch reference; our CPU loop makes the default bundle's tokens and accept
    decisions on it."""
    from edge_mtp.bundle.litertlm import read_litertlm
    from edge_mtp.formats.tflite import op_name, read_tflite
    from edge_mtp.runtime.backends.litert import LiteRTBackend
    from edge_mtp.runtime.speculative import generate_tokens

    bundle = read_litertlm(gpu_demo)
    assert bundle.manifest["param_tensor"] is True
    # it drafts on the GPU executor too, so its Gallery entry (unlike the default bundle's) offers the GPU
    entry = json.loads((gpu_demo.parent / f"{gpu_demo.stem}.allowlist.json").read_text())["models"][0]
    assert entry["defaultConfig"]["accelerators"] == "cpu,gpu"
    target = tmp_path / "target.tflite"
    target.write_bytes(bundle.read(bundle.model_section("tf_lite_prefill_decode")))
    model = read_tflite(target)
    assert "STABLEHLO_COMPOSITE" in {op_name(model, op) for g in model.subgraphs for op in g.operators}
    default, in_place = LiteRTBackend(demo_bundle), LiteRTBackend(gpu_demo)
    for prompt in ([2, 17, 99, 4, 31], [2, 200, 5, 5, 77, 13, 160, 42, 9, 11]):
        for mtp in (False, True):
            want, want_stats = generate_tokens(default, prompt, max_tokens=16, mtp=mtp)
            got, got_stats = generate_tokens(in_place, prompt, max_tokens=16, mtp=mtp)
            assert got == want and got_stats.accepted == want_stats.accepted, (prompt, mtp)
        assert mtp and want_stats.accepted > 0  # the trained demo drafter really drafts
