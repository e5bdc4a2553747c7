"""Real-size `edge-mtp distill`: prepare shards from a synth target of a preset's geometry, train from them, and print
prepare tokens/s, train steps/s, shard bytes per token and the peak RSS of each phase.

    python -m benchmarks.distill_scale --preset e2b --work /tmp/distill-e2b [--sequences 8 --steps 10] [--json r.json]

Not a test: E2B writes 9.3 GB of synth weights and runs a 5 B target on the CPU. The weights are written to WORK/pair
(kept for a rerun); delete WORK afterwards. The target runs in bf16 (autocast) so that it fits 24 GiB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edge_mtp.util.memory import PeakMemory


def main() -> None:
    """Synth (once), prepare, train; print what each phase cost."""
    from edge_mtp.distill import prepare, train
    from edge_mtp.checkpoint.spec import preset_pair
    from edge_mtp.checkpoint.synth import write_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="e2b")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--eval-sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="sequences per train step (and per target batch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    target_spec, _ = preset_pair(args.preset)
    pair = args.work / "pair" / "target"
    if not (pair / "config.json").is_file():
        t0 = time.time()
        write_target(pair, target_spec, seed=0)
        print(f"synth {args.preset} target written in {time.time() - t0:.0f} s", flush=True)
    shards, out = args.work / "shards", args.work / "assistant"
    done: list[tuple[float, int]] = []

    def prepared(n: int, total: int) -> None:
        done.append((time.time(), n))
        print(f"prepare {n}/{total} sequences", flush=True)

    with PeakMemory() as memory:
        t0 = time.time()
        index = prepare(pair, shards, num_sequences=args.sequences, eval_sequences=args.eval_sequences,
                        seq_len=args.seq_len, prompt_len=args.prompt_len, device="cpu", batch=args.batch,
                        target_dtype=torch.bfloat16, progress=prepared)
        prepare_s = time.time() - t0
    prepare_peak = memory.peak_mib / 1024
    (t_first, n_first), (t_last, n_last) = done[0], done[-1]
    steady = (n_last - n_first) * args.seq_len / (t_last - t_first) if n_last > n_first else None
    steps_done: list[float] = []
    with PeakMemory() as memory:
        t0 = time.time()
        result = train(shards, out, steps=args.steps, batch=args.batch, device="cpu", save_every=args.steps,
                       progress=lambda step, total, loss, acc: steps_done.append(time.time()))
        train_s = time.time() - t0
    train_peak = memory.peak_mib / 1024
    tokens = (args.sequences + args.eval_sequences) * args.seq_len
    disk = sum(p.stat().st_size for p in shards.glob("train-*.safetensors")) + \
        sum(p.stat().st_size for p in shards.glob("eval-*.safetensors"))
    report = {
        "preset": args.preset, "sequences": args.sequences, "eval_sequences": args.eval_sequences,
        "seq_len": args.seq_len, "batch": args.batch, "threads": torch.get_num_threads(),
        "prepare_seconds": round(prepare_s, 1), "prepare_tokens_per_second": round(tokens / prepare_s, 2),
        "prepare_tokens_per_second_after_load": round(steady, 2) if steady else None,
        "prepare_peak_rss_gib": round(prepare_peak, 2),
        "shard_bytes_per_token": index["bytes_per_token"], "shard_bytes_on_disk_per_token": round(disk / tokens, 1),
        "embedding_table_bytes": (shards / "embeddings.safetensors").stat().st_size,
        "train_seconds": round(train_s, 1), "train_steps_per_second": round(
            (len(steps_done) - 1) / (steps_done[-1] - steps_done[0]), 4) if len(steps_done) > 1 else None,
        "train_peak_rss_gib": round(train_peak, 2), "loss_first": result.losses[0], "loss_last": result.losses[-1],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
