"""LiteRT's GPU accelerator (WebGPU via Dawn over Vulkan) on the exported bundle, and accelerator fallback.

The GPU tests need a Vulkan device; on a machine without a GPU, Mesa's software one (lavapipe) works:
`scripts/install_software_gpu.sh` installs it and prints an env file to source. They run when EDGE_MTP_GPU_TESTS=1
and then fail, never skip, when no device works; without the variable they are skipped. The fallback tests need no
device and always run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edge_mtp.bundle.litertlm import read_litertlm
from edge_mtp.model.contract import causal_mask, drafter_mask, prefill_name
from edge_mtp.runtime.backends.litert import LiteRTBackend, accelerator_unavailable, vulkan_devices
from edge_mtp.runtime.gpu_check import check_model
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import generate_tokens
from edge_mtp.util.errors import EdgeMtpError

from conftest import BUNDLE_CONTEXT as CONTEXT
from conftest import DEMO_CONTEXT
from gpu_legacy import delegate_refusals, legacy_attention_model

GPU_TESTS = os.environ.get("EDGE_MTP_GPU_TESTS") == "1"
needs_gpu = pytest.mark.skipif(not GPU_TESTS, reason="GPU tests run with EDGE_MTP_GPU_TESTS=1 and a Vulkan device "
                                                     "(scripts/install_software_gpu.sh provides a software one)")
PROMPTS = [[2, 17, 99, 4, 31], [2, 200, 5, 5, 77, 13, 160, 42, 9, 11]]
STATS = ("accepted", "drafted", "verifies", "plain_decodes", "accepted_per_round", "generated", "prompt_tokens")


@pytest.fixture(scope="module")
def backends(tiny_bundle):
    path, _ = tiny_bundle
    gpu = LiteRTBackend(path, accelerator="gpu")
    assert gpu.accelerator == "gpu", f"the GPU accelerator is unavailable: {gpu.fallback_reason}"
    return LiteRTBackend(path, accelerator="cpu"), gpu


@needs_gpu
def test_a_vulkan_device_is_usable(tiny_bundle):
    devices = vulkan_devices()
    assert isinstance(devices, list) and devices, f"no Vulkan device: {devices}"
    bundle = read_litertlm(tiny_bundle[0])
    assert accelerator_unavailable("gpu", bundle.read(bundle.model_section("tf_lite_embedder"))) is None


@needs_gpu
def test_greedy_mtp_on_gpu_equals_cpu(backends):
    cpu, gpu = backends
    assert all(gpu.fully_accelerated.values()), gpu.fully_accelerated  # every op of every model on the GPU
    assert all(d == t for sigs in gpu.delegation.values() for d, t in sigs.values()), gpu.delegation
    for mtp in (True, False):
        for prompt in PROMPTS:
            want, want_stats = generate_tokens(cpu, prompt, max_tokens=20, mtp=mtp)
            got, got_stats = generate_tokens(gpu, prompt, max_tokens=20, mtp=mtp)
            assert got == want, (mtp, prompt)
            assert [getattr(got_stats, k) for k in STATS] == [getattr(want_stats, k) for k in STATS]
            assert want_stats.drafted == (3 * want_stats.verifies if mtp else 0)
    drafter_inputs, _ = gpu._buffers("drafter", "mtp_drafter")
    verify_inputs, verify_outputs = gpu._buffers("target", "verify")
    assert drafter_inputs["kv_cache_k_1"] is gpu.kv["kv_cache_k_1"] is verify_inputs["kv_cache_k_1"] \
        is verify_outputs["kv_cache_k_1"]


@needs_gpu
def test_every_step_on_gpu_matches_cpu(backends):
    """prefill, decode, draft, verify, draft again over the shared caches: outputs (the drafter's centroid-head logits
    included) and caches agree to 1e-4."""
    cpu, gpu = backends
    c = cpu.contract
    rng = np.random.default_rng(0)
    t, h, g = c.prefill_lengths[0], c.target.hidden_size, c.verify_len
    emb = rng.standard_normal((1, t, h)).astype(np.float32)
    ple = rng.standard_normal((1, t, c.target.num_layers, c.target.ple_dim)).astype(np.float32)
    carry = rng.standard_normal((1, 1, 2 * h)).astype(np.float32)
    steps = [
        ("target", prefill_name(t), (emb, ple, np.arange(t, dtype=np.int32), causal_mask(0, t, CONTEXT))),
        ("target", "decode", (emb[:, :1], ple[:, :1], np.array([t], np.int32), causal_mask(t, 1, CONTEXT))),
        ("drafter", None, (carry, np.array([t], np.int32), drafter_mask(t, CONTEXT))),
        ("target", "verify", (emb[:, :g], ple[:, :g], np.arange(t + 1, t + 1 + g, dtype=np.int32),
                              causal_mask(t + 1, g, CONTEXT))),
        ("drafter", None, (carry, np.array([t + 2], np.int32), drafter_mask(t + 2, CONTEXT))),
    ]
    for backend in (cpu, gpu):
        backend.reset()
    for model, signature, args in steps:
        outs = [b.run_target(signature, *args) if model == "target" else b.run_drafter(*args) for b in (cpu, gpu)]
        for name, want in outs[0].items():
            err = float(np.abs(outs[1][name] - want).max())
            assert err <= 1e-4 * max(1.0, float(np.abs(want).max())), (signature or model, name, err)
        for spec in c.kv_tensors():
            want = cpu.read_kv(spec.name)
            assert np.abs(gpu.read_kv(spec.name) - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), \
                (signature or model, spec.name)
    assert np.abs(cpu.read_kv("kv_cache_k_0")).max() > 0


ENGINE_PROMPTS = ["Hello world", "The quick brown fox"]


@needs_gpu
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_litert_lm_gpu_executor_runs_our_bundles_like_the_cpu(which, tiny_bundle, demo_bundle):
    """Google's own GPU executor accepts the bundles (every op delegated) and greedy output equals its CPU executor's."""
    path, context = (tiny_bundle[0], CONTEXT) if which == "tiny" else (demo_bundle, DEMO_CONTEXT)
    cpu = run_litertlm(path, ENGINE_PROMPTS, max_tokens=16, context=context, mtp=False)
    gpu = run_litertlm(path, ENGINE_PROMPTS, max_tokens=16, context=context, mtp=False, accelerator="gpu")
    assert "Hint fully delegated" not in gpu.log and "not supported by GPU delegate" not in gpu.log
    assert gpu.texts == cpu.texts and all(t for t in cpu.texts)


def test_litert_lm_cpu_executor_runs_an_in_place_bundle_like_the_default(gpu_demo, demo_bundle):
    """LiteRT-LM's CPU executor inlines the in-place composites; with the demo's single KV head it once bound an
    omitted FULLY_CONNECTED bias to another tensor and failed at the first prefill. Same text as the default
    bundle, MTP on and off, and the same drafter success rate."""
    for mtp in (False, True):
        want = run_litertlm(demo_bundle, ENGINE_PROMPTS, max_tokens=16, context=DEMO_CONTEXT, mtp=mtp)
        got = run_litertlm(gpu_demo, ENGINE_PROMPTS, max_tokens=16, context=DEMO_CONTEXT, mtp=mtp)
        assert got.texts == want.texts and all(got.texts), mtp
    assert got.success_rate is not None and got.success_rate == want.success_rate


@pytest.fixture(scope="module")
def gpu_tiny(synth_pair, tmp_path_factory):
    """The synthetic tiny pair exported with --gpu."""
    from edge_mtp.export.pipeline import export_litert

    from conftest import BUNDLE_PREFILL

    out = tmp_path_factory.mktemp("tiny-gpu") / "tiny-gpu.litertlm"
    export_litert(synth_pair / "target", synth_pair / "assistant", out, context=CONTEXT, prefill=BUNDLE_PREFILL,
                  in_place_cache=True)
    return out


@needs_gpu
@pytest.mark.parametrize("mtp", [True, False])
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_litert_lm_gpu_executor_runs_mtp_like_the_cpu(which, mtp, request):
    """--gpu bundles on Google's GPU executor: every op delegated, greedy text and drafter success rate as on its
    CPU executor."""
    path, context = (request.getfixturevalue("gpu_tiny"), CONTEXT) if which == "tiny" else \
        (request.getfixturevalue("gpu_demo"), DEMO_CONTEXT)
    cpu = run_litertlm(path, ENGINE_PROMPTS, max_tokens=16, context=context, mtp=mtp)
    gpu = run_litertlm(path, ENGINE_PROMPTS, max_tokens=16, context=context, mtp=mtp, accelerator="gpu")
    assert "Hint fully delegated" not in gpu.log and "not supported by GPU delegate" not in gpu.log
    assert gpu.texts == cpu.texts and all(cpu.texts)
    if mtp:
        assert cpu.success_rate is not None and gpu.success_rate is not None
        assert abs(gpu.success_rate - cpu.success_rate) <= 0.05
    else:
        assert gpu.success_rate is None


@needs_gpu
def test_gpu_check_agrees_with_the_gpu_delegate(tmp_path):
    """The static check names exactly the op kinds LiteRT's GPU delegate itself refuses, and none in our bundles."""
    path = legacy_attention_model(tmp_path)
    static = {f.op for r in check_model(path.read_bytes()).values() for f in r.findings}
    assert static == {"BROADCAST_TO", "GATHER_ND", "RESHAPE", "TRANSPOSE"}
    assert delegate_refusals(path) == static


def test_unavailable_npu_falls_back_to_cpu_with_one_line(tiny_bundle, caplog):
    path, _ = tiny_bundle
    with caplog.at_level("WARNING", logger="edge_mtp"):
        npu = LiteRTBackend(path, accelerator="npu")
    assert npu.requested_accelerator == "npu" and npu.accelerator == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("edge_mtp")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("edge-mtp: the npu accelerator is unavailable (") and "running on the CPU" in lines[0]
    cpu = LiteRTBackend(path, accelerator="cpu")
    assert generate_tokens(npu, PROMPTS[0], max_tokens=8)[0] == generate_tokens(cpu, PROMPTS[0], max_tokens=8)[0]
    with pytest.raises(EdgeMtpError, match="Unknown accelerator 'tpu'; choose one of cpu, gpu, npu."):
        LiteRTBackend(path, accelerator="tpu")


_NO_VULKAN = r"""
import json, sys
from edge_mtp.runtime.backends.litert import LiteRTBackend
b = LiteRTBackend(sys.argv[1], accelerator="gpu")
print("EDGE_MTP_RESULT " + json.dumps([b.accelerator, b.fallback_reason]), flush=True)
"""


def test_gpu_without_a_vulkan_device_falls_back_to_cpu(tiny_bundle):
    path, _ = tiny_bundle
    with tempfile.TemporaryDirectory() as tmp:
        missing = str(Path(tmp) / "no_icd.json")
        env = dict(os.environ, VK_ICD_FILENAMES=missing, VK_DRIVER_FILES=missing)
        proc = subprocess.run([sys.executable, "-c", _NO_VULKAN, str(path)], capture_output=True, text=True,
                              timeout=300, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EDGE_MTP_RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-2000:]
    accelerator, reason = json.loads(line.split(" ", 1)[1])
    assert accelerator == "cpu" and reason.startswith("no Vulkan")
    warning = [ln for ln in proc.stderr.splitlines() if ln.startswith("edge-mtp: the gpu accelerator is unavailable")]
    assert warning == [f"edge-mtp: the gpu accelerator is unavailable ({reason}); running on the CPU."]


@needs_gpu
def test_run_and_bench_report_every_op_delegated_on_the_gpu(tiny_bundle):
    """`run --json` and `bench --json` on the GPU report [ops on the GPU, all ops] per model and signature."""
    from click.testing import CliRunner

    from edge_mtp.cli import main

    path = str(tiny_bundle[0])
    for args in (["run", path, "--prompt", "Hello", "--max-tokens", "4"], ["bench", path, "--max-tokens", "4"]):
        result = CliRunner().invoke(main, [*args, "--accelerator", "gpu", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1] if args[0] == "run" else result.output)
        delegation = report["stats"]["gpu_delegated_ops"] if args[0] == "run" else report["gpu_delegated_ops"]
        assert {"target", "drafter"} <= set(delegation), delegation
        assert all(on == total > 0 for sigs in delegation.values() for on, total in sigs.values()), delegation
