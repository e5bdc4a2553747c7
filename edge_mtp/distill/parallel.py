"""Devices and data parallelism: `--device auto|cpu|cuda|mps`, and torchrun's process group when there is one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..util.errors import EdgeMtpError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device value (under torchrun, cuda is this process's LOCAL_RANK GPU)."""
    if name not in DEVICES:
        raise EdgeMtpError(f"--device {name} is not one of {', '.join(DEVICES)}.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EdgeMtpError("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto).")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name == "mps" and not torch.backends.mps.is_available():
        raise EdgeMtpError("--device mps: this torch has no Metal (MPS) device; use --device cpu (or auto).")
    return torch.device(name)


def accelerated(device: torch.device) -> bool:
    """Whether `device` runs the target in bf16 and the drafter under bf16 autocast."""
    return device.type in ("cuda", "mps")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (nccl needs CUDA tensors)

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()


def world_size() -> int:
    """How many data-parallel processes torchrun started (1 without it), known before joining them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: torch.device) -> World:
    """The process group torchrun describes in the environment (joined once; gloo on CPU, nccl on CUDA)."""
    if world_size() == 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device if device.type == "cuda" else torch.device("cpu"))
