"""Rebuild the demo pair under edge_mtp/demo: train the target, then distil its assistant and report acceptance.

    python scripts/make_demo_pair.py [--skip-target] [--target-minutes 30] [--distill-steps 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    """Target (scripts/train_demo_target.py), then edge_mtp.distill on the same text; assistant without resume state."""
    import torch

    from dataclasses import replace

    from edge_mtp.distill import STATE_FILE, default_drafter_spec, distill
    from edge_mtp.checkpoint.spec import FULL, SLIDING, read_config, target_spec_from_config
    from train_demo_target import corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=ROOT / "edge_mtp" / "demo")
    ap.add_argument("--skip-target", action="store_true", help="keep the existing demo target")
    ap.add_argument("--target-minutes", type=float, default=30.0)
    ap.add_argument("--distill-steps", type=int, default=600)
    ap.add_argument("--work", type=Path, default=None, help="where distill keeps its resumable state")
    ap.add_argument("--drafter-layers", type=int, default=4,
                    help="assistant depth (sliding layers then one full layer); shallow keeps its step cheap")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = args.demo / "target"
    if not args.skip_target:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo_target.py"), "--out", str(target),
                        "--minutes", str(args.target_minutes), "--threads", str(args.threads)], check=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="edge-mtp-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "corpus.txt"
    text.write_text("\n\n".join(corpus()))
    spec = default_drafter_spec(target_spec_from_config(read_config(target)), draft_len=3)
    spec = replace(spec, layer_types=(SLIDING,) * (args.drafter_layers - 1) + (FULL,))
    t0 = time.perf_counter()
    result = distill(target, work / "assistant", data=[text], steps=args.distill_steps, draft_len=3, lr=3e-3,
                     batch=8, seq_len=64, prompt_len=16, num_sequences=512, eval_prompts=8,
                     resume=(work / "assistant" / STATE_FILE).is_file(), drafter_spec=spec,
                     progress=lambda s, n, loss, acc: print(f"distill {s}/{n} loss {loss:.3f} acc {acc:.3f}",
                                                            flush=True) if s % 20 == 0 else None)
    out = args.demo / "assistant"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(work / "assistant" / name, out / name)
    summary = result.to_dict() | {"minutes": (time.perf_counter() - t0) / 60}
    summary.pop("losses"), summary.pop("running_acceptance")
    summary |= {"loss_first": result.losses[0], "loss_last": sum(result.losses[-10:]) / 10}
    (out / "DISTILL.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    show_samples(target, out)


def show_samples(target: Path, assistant: Path, max_tokens: int = 40) -> None:
    """Greedy MTP continuations of a few prompts, decoded, with the acceptance of each."""
    from tokenizers import Tokenizer

    from edge_mtp.model.contract import Contract
    from edge_mtp.model.loading import load_drafter, load_target
    from edge_mtp.runtime.backends.torch import TorchBackend
    from edge_mtp.runtime.speculative import generate_tokens

    tok = Tokenizer.from_file(str(target / "tokenizer.json"))
    models = load_target(target)
    drafter = load_drafter(assistant, models.spec)
    backend = TorchBackend(models, drafter, Contract(models.spec, drafter.spec, 160, 3, (16,)))
    # The first three begin held-out documents (the last 3% of the corpus, never trained on).
    for text in ("Called by the parser to give the application", "This interface adds three extra methods to",
                 "If the name represents a directory, return", "The list is", "A generator function"):
        ids = tok.encode(text).ids
        out, st = generate_tokens(backend, ids, max_tokens=max_tokens)
        print(f"{text!r} -> {tok.decode(out)!r}  [acceptance {st.draft_acceptance_rate:.2f}, "
              f"{st.mean_accepted_length:.2f} tokens/verify]")


if __name__ == "__main__":
    main()
