"""Distil a Gemma 4 MTP assistant (drafter) for a target, trained on the target's own outputs, in two phases.

`prepare` (prepare.py) runs the target once over the data and writes shards; `train` (train.py) trains the drafter
from them without the target. `distill` runs the two back to back, keeping the shards in OUT/shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint.spec import DrafterSpec
from ..util.errors import EdgeMtpError
from .evaluate import measure_acceptance, replay_acceptance
from .geometry import cluster_tokens, default_drafter_spec
from .prepare import prepare
from .shards import bytes_per_token
from .student import DraftRows, cluster_of_tokens, draft_rows, head_argmax, save_assistant
from .teacher import greedy_continue, teacher_records
from .train import STATE_FILE, DistillResult, Progress, check_resumable, train

SHARDS = "shards"


def distill(target_dir: str | Path, out_dir: str | Path, *, data: Sequence[str | Path] | None = None,
            prompts: str | Path | Sequence[str] | None = None, steps: int = 200, draft_len: int = 3,
            lr: float = 3e-3, batch: int = 8, grad_accum: int = 1, seq_len: int = 64, prompt_len: int = 16,
            num_sequences: int = 128, eval_prompts: int = 4, top_k: int = 64, temperature: float = 0.0,
            kl_weight: float = 0.5, seed: int = 0, resume: bool = False, init_from: str | Path | None = None,
            drafter_spec: DrafterSpec | None = None, save_every: int = 50, eval_every: int | None = None,
            dtype: str | None = None, device: str = "auto", shards_dir: str | Path | None = None,
            target_dtype: torch.dtype | None = None, progress: Progress | None = None,
            prepare_progress=None) -> DistillResult:
    """Prepare shards of the target at `target_dir` (kept in `shards_dir`, default OUT/shards; reused when they are
    already there from the same target and settings), then train an assistant from them into `out_dir`.

    See prepare() and train() for the options; eval_prompts is the number of held-out sequences."""
    out_dir = Path(out_dir)
    if min(steps, draft_len, batch) < 1 or not lr > 0:
        raise EdgeMtpError(f"--steps, --draft-len and --batch must be at least 1 and --lr positive (got {steps}, "
                           f"{draft_len}, {batch}, {lr}).")
    if seq_len <= prompt_len + draft_len:
        raise EdgeMtpError(f"--seq-len {seq_len} must exceed the prompt length {prompt_len} plus the draft length.")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeMtpError(f"--out {out_dir} is a file; name a folder for the assistant checkpoint.")
    if resume:
        check_resumable(out_dir / STATE_FILE)
    shards = Path(shards_dir) if shards_dir is not None else out_dir / SHARDS
    prepare(target_dir, shards, data=data, prompts=prompts, num_sequences=num_sequences, eval_sequences=eval_prompts,
            seq_len=seq_len, prompt_len=prompt_len, top_k=top_k, temperature=temperature, seed=seed, device=device,
            target_dtype=target_dtype, progress=prepare_progress)
    return train(shards, out_dir, steps=steps, draft_len=draft_len, lr=lr, batch=batch, grad_accum=grad_accum,
                 kl_weight=kl_weight, seed=seed, resume=resume, init_from=init_from, drafter_spec=drafter_spec,
                 save_every=save_every, eval_every=eval_every, dtype=dtype, device=device, progress=progress)


__all__ = ["DistillResult", "DraftRows", "STATE_FILE", "bytes_per_token", "cluster_of_tokens", "cluster_tokens",
           "default_drafter_spec", "distill", "draft_rows", "greedy_continue", "head_argmax", "measure_acceptance",
           "prepare", "replay_acceptance", "save_assistant", "teacher_records", "train"]
