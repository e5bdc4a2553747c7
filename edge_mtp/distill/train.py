"""`distill train`: the drafter learns from prepared shards; the target is not loaded.

A step draws `batch` sequences of the training split (a permutation seeded by seed and step, so the data position
is the step alone), splits them into `grad_accum` micro-batches and each of those among the processes. The loss is
the sum over every trained draft round of the step divided by their global count, so 1 process and N processes
(DDP averages gradients) follow the same trajectory. Weights and optimizer state stay fp32; on accelerators the
forward runs under bf16 autocast. Rank 0 writes the resumable state, the assistant and a JSONL log.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.spec import DrafterSpec, check_pair
from ..model.drafter import Drafter
from ..model.embedder import Embedder
from ..model.loading import load_drafter
from ..util.errors import EdgeMtpError
from .evaluate import replay_acceptance
from .geometry import default_drafter_spec
from .parallel import World, accelerated, join, resolve_device, world_size
from .shards import TRAIN, ShardSet
from .student import ROW_FIELDS, accepted_per_round, cluster_of_tokens, count_rows, draft_rows, init_drafter, \
    loss_sum, save_assistant

STATE_FILE = "distill_state.pt"
LOG_FILE = "distill_log.jsonl"
Progress = Callable[[int, int, float, float], None]  # (step, steps, loss, running acceptance)


@dataclass
class DistillResult:
    """What a distillation run did: loss history (all steps, resumed ones included) and acceptance before/after."""

    out_dir: Path
    start_step: int
    steps: int
    losses: list[float]
    acceptance_before: float
    acceptance_after: float
    mean_accepted_length_before: float
    mean_accepted_length_after: float
    seconds: float
    running_acceptance: list[float] = field(default_factory=list)
    tokens_per_step: int = 0

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return asdict(self) | {"out_dir": str(self.out_dir)}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _spec_from_dict(d: dict) -> DrafterSpec:
    return DrafterSpec(**(d | {"layer_types": tuple(d["layer_types"])}))


def check_resumable(state_path: Path) -> None:
    """--resume needs a state file."""
    if not state_path.is_file():
        raise EdgeMtpError(f"Nothing to resume: {state_path} does not exist; run without --resume first.")


def _load_state(state_path: Path) -> dict:
    try:
        return torch.load(state_path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises anything from EOFError to UnpicklingError
        raise EdgeMtpError(f"{state_path} is not a distill state this edge-mtp can resume "
                           f"({type(e).__name__}); delete it and run without --resume.") from None


def train(shards_dir: str | Path, out_dir: str | Path, *, steps: int = 200, draft_len: int = 3, lr: float = 3e-3,
          batch: int = 8, grad_accum: int = 1, kl_weight: float = 0.5, seed: int = 0, resume: bool = False,
          init_from: str | Path | None = None, drafter_spec: DrafterSpec | None = None, save_every: int = 50,
          eval_every: int | None = None, dtype: str | None = None, device: str = "auto",
          progress: Progress | None = None) -> DistillResult:
    """Train a Gemma 4 assistant from the shards in `shards_dir` and write it to `out_dir` (HF layout + state).

    steps: total optimizer steps (with resume, training continues up to this). draft_len: G, the unrolled draft
    steps (written as num_assistant_tokens). batch: sequences per step (all processes together), in grad_accum
    micro-batches. init_from: start from an existing assistant. drafter_spec: geometry override (default
    default_drafter_spec). dtype: storage dtype of the written weights (default the target's). eval_every: held-out
    acceptance every N steps into OUT/distill_log.jsonl (default save_every). progress(step, steps, loss,
    running_acceptance) is called after every step.
    """
    t0 = time.perf_counter()
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    state_path = out_dir / STATE_FILE
    if min(steps, draft_len, batch, grad_accum, save_every) < 1 or not lr > 0:
        raise EdgeMtpError(f"--steps, --draft-len, --batch and --grad-accum must be at least 1 and --lr positive "
                           f"(got {steps}, {draft_len}, {batch}, {grad_accum}, {lr}).")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeMtpError(f"--out {out_dir} is a file; name a folder for the assistant checkpoint.")
    if resume:
        check_resumable(state_path)
    if batch % (world_size() * grad_accum):
        raise EdgeMtpError(f"--batch {batch} does not divide into {grad_accum} micro-batches on each of "
                           f"{world_size()} processes; give a multiple of {world_size() * grad_accum}.")
    shards = ShardSet.open(shards_dir)
    if batch > shards.count(TRAIN):
        raise EdgeMtpError(f"--batch {batch} exceeds the {shards.count(TRAIN)} prepared training sequences in "
                           f"{shards_dir}; prepare more or lower --batch.")
    dev = resolve_device(device)
    world = join(dev)
    if draft_len >= shards.index["seq_len"] - shards.index["prompt_len"]:
        raise EdgeMtpError(f"--draft-len {draft_len} leaves no draft round in the prepared {shards.index['seq_len']}"
                           f"-token sequences.")
    target = shards.target
    state = _load_state(state_path) if resume else None
    if state is not None:
        if state["draft_len"] != draft_len:
            raise EdgeMtpError(f"{state_path} was trained with draft length {state['draft_len']}, not {draft_len}.")
        if state.get("target_sha256") != shards.index["target_sha256"]:
            raise EdgeMtpError(f"{state_path} was trained on shards of another target than {shards_dir}; resume "
                               "with those shards or start without --resume.")
    table = shards.embeddings()
    embedder = Embedder(target)
    embedder.embed_tokens.weight = torch.nn.Parameter(table, requires_grad=False)
    if state is not None:
        drafter = Drafter(_spec_from_dict(state["spec"]), target)
        drafter.load_state_dict(state["drafter"])
    elif init_from is not None:
        drafter = load_drafter(init_from, target)
    else:
        drafter = init_drafter(drafter_spec or default_drafter_spec(target, draft_len), target, table, seed)
    check_pair(target, drafter.spec)
    drafter, embedder = drafter.to(dev).float(), embedder.to(dev)
    if drafter.spec.use_ordered_embeddings:
        drafter.refresh_inverse_ordering()
    drafter.requires_grad_(True)
    if state is None:
        acc_before, len_before = replay_acceptance(drafter, embedder, shards, draft_len, dev)
        losses: list[float] = []
        running: list[float] = []
        start = 0
    else:
        acc_before, len_before = state["acceptance_before"], state["mean_accepted_length_before"]
        losses, running, start = list(state["losses"]), list(state["running_acceptance"]), int(state["step"])
    cluster_of = cluster_of_tokens(drafter)
    model = DistillStep(drafter, embedder, draft_len, kl_weight, cluster_of)
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                          broadcast_buffers=False)
    optim = torch.optim.AdamW(drafter.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    if state is not None:
        optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
    warmup = max(1, min(20, steps // 10))
    eval_every = eval_every or save_every
    sequences = shards.count(TRAIN)
    seq_len = shards.index["seq_len"]

    def save(step: int) -> None:
        from ..util.atomic import atomic_file

        with atomic_file(state_path) as tmp:
            torch.save({"step": step, "draft_len": draft_len, "spec": asdict(drafter.spec),
                        "drafter": drafter.state_dict(), "optim": optim.state_dict(), "losses": losses,
                        "running_acceptance": running, "acceptance_before": acc_before,
                        "mean_accepted_length_before": len_before, "rng": torch.get_rng_state(),
                        "target_sha256": shards.index["target_sha256"]}, tmp)
        save_assistant(drafter, target, out_dir, draft_len, dtype)

    log = _Log(out_dir, world)
    autocast = torch.autocast(dev.type, torch.bfloat16) if accelerated(dev) else contextlib.nullcontext()
    if world.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    drafter.train()
    for step in range(start, steps):
        tick = time.perf_counter()
        pick = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))[:batch]
        micro = [pick[m::grad_accum] for m in range(grad_accum)]
        total_rows = count_rows(shards.read(TRAIN, pick.tolist(), ROW_FIELDS), draft_len)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        optim.zero_grad(set_to_none=True)
        loss_total = hit_total = greedy_rows = 0.0
        for m, numbers in enumerate(micro):
            mine = numbers[world.rank::world.size].tolist()
            records = {k: v.to(dev) for k, v in shards.read(TRAIN, mine).items()}
            sync = model.no_sync() if world.size > 1 and m < grad_accum - 1 else contextlib.nullcontext()
            with sync, autocast:
                loss, accepted, greedy = model(records)
                (loss * world.size / max(total_rows, 1)).backward()
            chosen = accepted[greedy] if bool(greedy.any()) else accepted
            loss_total += float(loss.detach())
            hit_total += float(chosen.sum()) / draft_len
            greedy_rows += len(chosen)
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optim.step()
        loss_total, hit_total, greedy_rows = world.sum([loss_total, hit_total, greedy_rows])
        losses.append(loss_total / max(total_rows, 1))
        running.append(hit_total / max(greedy_rows, 1))
        if progress:
            progress(step + 1, steps, losses[-1], running[-1])
        entry = {"step": step + 1, "loss": losses[-1], "running_acceptance": running[-1],
                 "lr": optim.param_groups[0]["lr"], "tokens_per_second": batch * seq_len / (time.perf_counter() - tick)}
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            if world.rank == 0:
                entry["held_out_acceptance"], entry["mean_accepted_length"] = replay_acceptance(
                    drafter, embedder, shards, draft_len, dev)
        log.write(entry)
        if (step + 1) % save_every == 0 and step + 1 < steps and world.rank == 0:
            save(step + 1)
    if world.rank == 0:
        save(max(steps, start))
    acc_after, len_after = replay_acceptance(drafter, embedder, shards, draft_len, dev)
    log.close()
    world.barrier()
    return DistillResult(out_dir, start, max(steps, start), losses, acc_before, acc_after, len_before, len_after,
                         time.perf_counter() - t0, running, batch * seq_len)


class DistillStep(torch.nn.Module):
    """One micro-batch through the drafter: (loss summed over its rounds, accepted steps per round, which rounds are
    past the prompt). A module so that DDP wraps one forward per backward; the frozen embedder is held outside the
    module's parameters (DDP would broadcast it)."""

    def __init__(self, drafter: Drafter, embedder: Embedder, draft_len: int, kl_weight: float,
                 cluster_of: torch.Tensor):
        super().__init__()
        self.drafter, self.frozen, self.draft_len, self.kl_weight = drafter, (embedder, cluster_of), draft_len, kl_weight

    def forward(self, records: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedder, cluster_of = self.frozen
        rows = draft_rows(self.drafter, embedder, records, self.draft_len)
        loss = loss_sum(self.drafter, rows, self.kl_weight, cluster_of)
        with torch.no_grad():
            accepted = accepted_per_round(self.drafter, rows, cluster_of)
        return loss, accepted, rows.bonus >= records["prompt_len"][rows.block]


class _Log:
    """OUT/distill_log.jsonl (and TensorBoard scalars when tensorboard is installed), written by rank 0 only."""

    def __init__(self, out_dir: Path, world: World):
        self.file = self.board = None
        if world.rank != 0:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / LOG_FILE, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, entry: dict) -> None:
        """One line per step; held-out acceptance on the steps that measured it."""
        if self.file is None:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in entry.items():
                if key != "step":
                    self.board.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        """Flush and close."""
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
