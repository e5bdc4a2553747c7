"""Long context on a real-size .litertlm bundle: KV bytes, step costs by committed length, MTP at a set acceptance.

For each bundle: the bytes of its KV buffers (from its contract: ring-sized sliding caches, the KV dtype), and the
median ms of a decode, a verify (G+1 rows) and a drafter step with input_pos at each position, in our loop's LiteRT
backend on the CPU. A static graph computes over its whole buffers whatever the position, so the position moves only
which slots the mask shows; the caches hold zeros, which cost what any values cost. MTP/plain at acceptance A is the
cost model of `edge-mtp bench` on those measured costs: (1 + A + ... + A^G) / (G * draft + verify), in decodes.
The first bundle is the baseline of the ratios.

`--long-prompt N` then runs a seeded prompt of N tokens through the last bundle, greedily, in our loop and in
LiteRT-LM (CPU), MTP on and off, and says whether all four give the same text.

    .venv/bin/python -m benchmarks.long_context BASELINE.litertlm LONG.litertlm [--positions 1024,8192,30000]
        [--acceptance 0.8] [--rounds 15] [--long-prompt 8300 [--max-tokens 32]] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edge_mtp.bench import expected_tokens
from edge_mtp.model.contract import DECODE, MASK_HIDDEN, MASK_VISIBLE, VERIFY, Contract
from edge_mtp.bundle import open_bundle
from edge_mtp.runtime.backends.litert import LiteRTBackend
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import SpeculativeDecoder, generate_tokens


def kv_bytes(contract: Contract) -> int:
    """Bytes of every KV buffer the bundle's target declares (the drafter reads the same buffers)."""
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in contract.kv_tensors())


def _median_ms(run, rounds: int) -> float:
    run()  # the first call of a signature pays for its set-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_costs(backend: LiteRTBackend, position: int, rounds: int) -> dict[str, float]:
    """Median ms of a decode, a verify and a drafter step at `position`."""
    decoder, contract = SpeculativeDecoder(backend), backend.contract
    token = 7
    out = {"decode": _median_ms(lambda: decoder.step(DECODE, [token], position), rounds),
           "verify": _median_ms(lambda: decoder.step(VERIFY, [token] * contract.verify_len, position), rounds)}
    if backend.has_drafter:
        hidden = contract.target.hidden_size
        activations = np.zeros((1, 1, 2 * hidden), np.float32)
        input_pos = np.full(1, position - 1, np.int32)
        mask = np.full((1, 1, 1, contract.context), MASK_HIDDEN, np.float32)
        mask[..., :position] = MASK_VISIBLE
        out["draft"] = _median_ms(lambda: backend.run_drafter(activations, input_pos, mask), rounds)
    return out


def measure(path: Path, positions: list[int], rounds: int, acceptance: float) -> dict:
    """KV bytes and step costs of one bundle at every position that fits its context."""
    backend = LiteRTBackend(path)
    c = backend.contract
    row = {"bundle": str(path), "context": c.context, "kv_dtype": c.kv_dtype, "ring": c.ring_size,
           "kv_bytes": kv_bytes(c), "positions": {}}
    for p in positions:
        if p + c.verify_len > c.context:
            continue
        costs = step_costs(backend, p, rounds)
        if "draft" in costs:
            g = c.draft_len
            per_round = g * costs["draft"] / costs["decode"] + costs["verify"] / costs["decode"]
            costs["mtp_over_plain"] = expected_tokens([], acceptance, g) / per_round
        row["positions"][p] = costs
    return row


def long_prompt(path: Path, tokens: int, max_tokens: int) -> dict:
    """A seeded prompt of `tokens` tokens through our loop and LiteRT-LM, MTP on and off: texts equal, and times."""
    bundle = open_bundle(path, verify=False)
    tokenizer, context = bundle.tokenizer, bundle.contract.context
    rng = np.random.default_rng(0)
    text, ids = "", []
    while len(ids) < tokens:  # seeded words until the prompt is long enough, then cut to exactly `tokens`
        text += " ".join(rng.choice(["the", "cache", "ring", "window", "token", "phone", "draft", "verify"], 256)) + " "
        ids = tokenizer.encode(text)
    text = tokenizer.decode(ids[1:tokens])  # after the start token, which LiteRT-LM adds itself
    ids = tokenizer.encode(text)
    out: dict = {"prompt_tokens": len(ids), "max_tokens": max_tokens}
    backend = LiteRTBackend(path)
    texts = {}
    for mtp in (False, True):
        start = time.perf_counter()
        generated, _ = generate_tokens(backend, ids, max_tokens=max_tokens, mtp=mtp)
        out[f"ours_mtp_{mtp}_s"] = time.perf_counter() - start
        texts[f"ours_mtp_{mtp}"] = tokenizer.decode(generated)
    del backend
    for mtp in (False, True):
        start = time.perf_counter()
        run = run_litertlm(path, [text], max_tokens=max_tokens, context=context, mtp=mtp,
                           timeout=3600)
        out[f"litertlm_mtp_{mtp}_s"] = time.perf_counter() - start
        texts[f"litertlm_mtp_{mtp}"] = run.texts[0]
    out["texts"] = texts
    out["all_equal"] = len(set(texts.values())) == 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--positions", default="1024,8192,30000")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--acceptance", type=float, default=0.8)
    parser.add_argument("--long-prompt", type=int, help="Also run a prompt of this many tokens through the last bundle.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    rows = [measure(b, positions, args.rounds, args.acceptance) for b in args.bundles]
    report = {"bundles": rows}
    base = rows[0]
    print(f"{'bundle':40} {'context':>7} {'KV':>7} {'ring':>5} {'KV MiB':>8} {'pos':>6} {'decode ms':>9} "
          f"{'verify ms':>9} {'draft ms':>8} {'MTP/plain':>9} {'decode/base':>11}")
    for row in rows:
        for p, c in row["positions"].items():
            ratio = c["decode"] / base["positions"][p]["decode"] if p in base["positions"] else float("nan")
            print(f"{Path(row['bundle']).name:40} {row['context']:>7} {row['kv_dtype']:>7} {row['ring']:>5} "
                  f"{row['kv_bytes'] / 2**20:>8.1f} {p:>6} {c['decode']:>9.1f} {c['verify']:>9.1f} "
                  f"{c.get('draft', float('nan')):>8.2f} {c.get('mtp_over_plain', float('nan')):>9.2f} {ratio:>11.2f}")
    if args.long_prompt:
        report["long_prompt"] = run = long_prompt(args.bundles[-1], args.long_prompt, args.max_tokens)
        print(f"{run['prompt_tokens']}-token prompt, {args.max_tokens} tokens: our loop and LiteRT-LM, MTP on and off, "
              f"{'give the same text' if run['all_equal'] else 'DIFFER'}; seconds: "
              + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in run.items() if k.endswith("_s")))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
