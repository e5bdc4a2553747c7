"""A small graph in the attention forms we used before the GPU work (mask repeat, 5-D head permute, index_select),
and the real GPU delegate's verdict on a model, for the gpu_check tests."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import torch


class LegacyAttention(torch.nn.Module):
    """Grouped-query attention over a gathered window, written the pre-GPU way."""

    def forward(self, q, k_cache, v_cache, mask, index):
        _, h, t, hd = q.shape
        hkv, groups = k_cache.shape[1], h // k_cache.shape[1]
        k, v = k_cache.index_select(2, index.long()), v_cache.index_select(3, index.long())
        scores = torch.matmul(q.reshape(1, hkv, groups * t, hd), k.transpose(2, 3))
        scores = scores + mask.index_select(3, index.long()).reshape(1, 1, t, -1).repeat(1, 1, groups, 1)
        out = torch.matmul(v, torch.softmax(scores, dim=-1).transpose(2, 3))
        return out.reshape(1, hkv, hd, groups, t).permute(0, 4, 1, 3, 2).reshape(1, t, h * hd)


def legacy_attention_model(directory: Path) -> Path:
    """LegacyAttention converted to .tflite (2 KV heads, 4 query heads, 4 rows, an 8-slot window of 32)."""
    import litert_torch

    args = (torch.randn(1, 4, 4, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 16, 32), torch.zeros(1, 1, 4, 32),
            torch.arange(8, dtype=torch.int32))
    path = directory / "legacy_attention.tflite"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        litert_torch.convert(LegacyAttention().eval(), args).export(str(path))
    return path


_COMPILE_ON_GPU = r"""
import os, sys
import ai_edge_litert
from ai_edge_litert.compiled_model import CompiledModel, Environment, EnvironmentOptions
from ai_edge_litert.hardware_accelerator import HardwareAccelerator
from ai_edge_litert.options import GpuOptions, Options
env = Environment.create(options=EnvironmentOptions(runtime_path=os.path.dirname(ai_edge_litert.__file__)))
CompiledModel.from_buffer(open(sys.argv[1], "rb").read(), environment=env, options=Options(
    hardware_accelerators=HardwareAccelerator.GPU | HardwareAccelerator.CPU, gpu_options=GpuOptions(enforce_f32=True)))
"""


def delegate_refusals(path: Path) -> set[str]:
    """Op names LiteRT's GPU delegate logs as not supported when it compiles the model (needs a Vulkan device)."""
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ON_GPU, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    start = next((i for i, ln in enumerate(lines) if "not supported by GPU delegate" in ln), None)
    if start is None:
        return set()
    refused = set()
    for line in lines[start + 1:]:
        match = re.match(r"([A-Z_0-9]+): ", line)
        if not match:
            break
        refused.add(match.group(1))
    return refused
