"""`distill prepare`: the target runs once over the data and its outputs are written as shards (see shards.py).

Under torchrun each process takes the sequences whose global number is its rank modulo the world size and writes its
own shards; rank 0 then writes the index that lists them all, the embedding table and the target's config. Each
process records its complete shards as it writes them (index-r<rank>.json), so a prepare that was stopped resumes
after the last complete shard and writes the same shards an uninterrupted run writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint.locate import checkpoint_files, resolve_checkpoint
from ..checkpoint.reading import open_checkpoint
from ..checkpoint.spec import read_config, target_spec_from_config
from ..model.loading import load_target
from ..util.atomic import atomic_file
from ..util.errors import EdgeMtpError
from .data import Example, load_examples
from .parallel import accelerated, join, resolve_device, world_size
from .shards import (EMBEDDINGS, EVAL, FORMAT, INDEX, TARGET_CONFIG, TRAIN, bytes_per_token, fingerprint,
                     write_json, write_shard)
from .teacher import continue_prompts, teacher_records

PrepareProgress = Callable[[int, int], None]  # (sequences done by this process, its total)
SHARD_BYTES = 256 << 20  # a shard file is written once it holds this much


def _recorded(path: Path, target_sha256: str, settings: dict) -> dict | None:
    """The shard index or progress record at `path` (None if there is none), refused if another target or other
    settings wrote it."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        recorded = record["target_sha256"]
    except (ValueError, OSError, KeyError, TypeError):
        raise EdgeMtpError(f"{path} is not a shard index this edge-mtp reads; delete {path.parent} or give another "
                           "--shards folder.") from None
    if recorded != target_sha256:
        raise EdgeMtpError(f"The shards in {path.parent} were prepared from another target (checkpoint sha256 "
                           f"{recorded[:12]}..., this target's is {target_sha256[:12]}...); give another --shards "
                           "folder or delete it.")
    differ = {k: (record.get(k), v) for k, v in settings.items() if record.get(k) != v}
    if differ:
        raise EdgeMtpError(f"The shards in {path.parent} were prepared with other settings ("
                           + ", ".join(f"{k} {a!r}, not {b!r}" for k, (a, b) in differ.items())
                           + "); give another --shards folder or delete it.")
    return record


def prepare(target: str | Path, shards_dir: str | Path, *, data: Sequence[str | Path] | None = None,
            prompts: str | Path | Sequence[str] | None = None, num_sequences: int = 128, eval_sequences: int = 4,
            seq_len: int = 64, prompt_len: int = 16, top_k: int = 64, temperature: float = 0.0, seed: int = 0,
            device: str = "auto", batch: int = 16, target_dtype: torch.dtype | None = None,
            progress: PrepareProgress | None = None) -> dict:
    """Write the shards of `target` (a checkpoint, or a LoRA adapter on one) over the data into `shards_dir`.

    Sequences are `prompt_len`-token prompts continued to `seq_len` tokens by the target (greedy, or sampled at
    `temperature`), or conversations as they are. Shards already there from the same target and settings are kept
    (a stopped prepare resumes after its last complete shard); another target's are refused. Returns the index.
    target_dtype: the target's compute dtype (default bf16 on accelerators, fp32 on the CPU).
    """
    shards_dir = Path(shards_dir)
    if min(num_sequences, eval_sequences, top_k, batch) < 1:
        raise EdgeMtpError(f"--sequences, --eval-sequences, --top-k and the batch must be at least 1 (got "
                           f"{num_sequences}, {eval_sequences}, {top_k}, {batch}).")
    if seq_len <= prompt_len + 1:
        raise EdgeMtpError(f"--seq-len {seq_len} must exceed the prompt length {prompt_len} plus the draft length.")
    if shards_dir.exists() and not shards_dir.is_dir():
        raise EdgeMtpError(f"--shards {shards_dir} is a file; name a folder for the shards.")
    if num_sequences % world_size():
        raise EdgeMtpError(f"{num_sequences} sequences do not divide among {world_size()} processes; give --sequences "
                           f"a multiple of {world_size()} (or another --nproc-per-node).")
    dev = resolve_device(device)
    named = resolve_checkpoint(target)
    base = checkpoint_files(named)  # config and tokenizer: a LoRA adapter's base
    spec = target_spec_from_config(read_config(base), where=str(base / "config.json"))
    open_checkpoint(named)  # an adapter for another base is refused before the fingerprint reads every weight
    target_sha256 = fingerprint(base, *([named] if named != base else []))
    settings = {"seq_len": seq_len, "prompt_len": prompt_len, "top_k": min(top_k, spec.vocab_size),
                "continuation": "sampled" if temperature > 0 else "greedy", "temperature": temperature,
                "seed": seed, "train_sequences": num_sequences, "eval_sequences": eval_sequences,
                "data": [str(d) for d in data or ()], "prompts": None if prompts is None else str(prompts)}
    world = join(dev)
    existing = _recorded(shards_dir / INDEX, target_sha256, settings)
    if existing is not None:
        return existing
    progress_file = shards_dir / f"index-r{world.rank:03d}.json"
    mine_settings = {**settings, "world_size": world.size}
    written = (_recorded(progress_file, target_sha256, mine_settings) or {"shards": []})["shards"]
    done = {(s["split"], g) for s in written for g in s["sequences"]}
    train, evals = load_examples(base, spec, data, prompts, num_sequences, eval_sequences, prompt_len, seq_len, seed)
    dtype = target_dtype or (torch.bfloat16 if accelerated(dev) else torch.float32)
    models = load_target(named, dtype)
    shard_dtype = getattr(torch, spec.dtype) if spec.dtype in ("bfloat16", "float16") else torch.float32
    shards_dir.mkdir(parents=True, exist_ok=True)
    mine = {split: [(g, ex) for g, ex in enumerate(items) if g % world.size == world.rank]
            for split, items in ((TRAIN, train), (EVAL, evals))}
    total, finished = sum(len(v) for v in mine.values()), len(done)
    gen = torch.Generator()
    for split, items in mine.items():
        pending: list[dict[str, torch.Tensor]] = []
        numbers: list[int] = []

        def flush() -> None:
            if pending:
                name = f"{split}-r{world.rank:03d}-{len(written):05d}.safetensors"
                write_shard(shards_dir / name, {k: torch.cat([p[k] for p in pending]) for k in pending[0]})
                written.append({"file": name, "split": split, "sequences": list(numbers)})
                write_json(progress_file, {"target_sha256": target_sha256, **mine_settings, "shards": written})
                pending.clear()
                numbers.clear()

        # complete shards hold whole batches, so the sequences left start at a batch boundary, as they did before
        items = [(g, ex) for g, ex in items if (split, g) not in done]
        for lo in range(0, len(items), batch):
            if not pending:  # each shard samples from its own seed: a resumed run samples as an uninterrupted one
                gen.manual_seed((seed * 7919 + world.rank) * 100_003 + len(written))
            chunk = items[lo:lo + batch]
            records = _records(models, [ex for _, ex in chunk], seq_len, settings["top_k"], temperature, gen,
                               shard_dtype)
            pending.append(records)
            numbers.extend(g for g, _ in chunk)
            finished += len(chunk)
            if progress:
                progress(finished, total)
            if sum(t.numel() * t.element_size() for p in pending for t in p.values()) >= SHARD_BYTES:
                flush()
        flush()
    write_json(progress_file, {"target_sha256": target_sha256, **mine_settings, "shards": written})
    world.barrier()
    if world.rank == 0:
        from safetensors.torch import save_file

        parts = [shards_dir / f"index-r{r:03d}.json" for r in range(world.size)]
        shards = [s for p in parts for s in json.loads(p.read_text())["shards"]]
        table = models.embedder.embed_tokens.weight.detach().to("cpu", shard_dtype).contiguous()
        with atomic_file(shards_dir / EMBEDDINGS) as tmp:
            save_file({"weight": table}, str(tmp))
        write_json(shards_dir / TARGET_CONFIG, read_config(base))
        index = {"format": FORMAT, "target_sha256": target_sha256, "target": str(target), **settings,
                 "dtype": str(shard_dtype).removeprefix("torch."), "world_size": world.size,
                 "bytes_per_token": bytes_per_token(spec, settings["top_k"], shard_dtype),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": shards}
        write_json(shards_dir / INDEX, index)
        for p in parts:
            p.unlink()
    world.barrier()
    return json.loads((shards_dir / INDEX).read_text())


def _records(models, examples: list[Example], seq_len: int, top_k: int, temperature: float,
             gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Shard records of a batch of examples: prompts continued by the target, conversations padded."""
    pad = models.spec.pad_token_id
    prompts = [i for i, ex in enumerate(examples) if ex.trained is None]
    seqs = torch.full((len(examples), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(examples), seq_len, dtype=torch.uint8)
    prompt_len = torch.zeros(len(examples), dtype=torch.int32)
    length = torch.full((len(examples),), seq_len, dtype=torch.int32)
    if prompts:
        seqs[prompts] = continue_prompts(models, [examples[i].tokens for i in prompts], seq_len, temperature, gen)
        mask[prompts] = 1
        prompt_len[prompts] = torch.tensor([min(len(examples[i].tokens), seq_len - 1) for i in prompts],
                                           dtype=torch.int32)
    for i, ex in enumerate(examples):
        if ex.trained is not None:
            n = len(ex.tokens)
            seqs[i, :n] = torch.tensor(ex.tokens)
            mask[i, :n - 1] = torch.tensor(ex.trained[1:], dtype=torch.uint8)
            length[i] = n
    return {"tokens": seqs.int(), "loss_mask": mask, "prompt_len": prompt_len, "length": length,
            **teacher_records(models, seqs, top_k, dtype)}
