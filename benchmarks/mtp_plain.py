"""MTP output against plain output, token for token, on LiteRT bundles: in our loop and in LiteRT-LM.

For each bundle and each of 20 prompts (the 4 defaults, 8 in the demo pair's domain, Python's documentation, and 8
outside it), 128 greedy tokens at draft length 3:
- our loop on the LiteRT backend: every MTP-vs-plain divergence (edge_mtp.runtime.divergence), with the plain run's
  top-2 logit gap at that token;
- LiteRT-LM (CPU), MTP on and off: the first character where the MTP text leaves the plain text (it returns text
  only; an MTP text that runs a few tokens past the plain one is its known overshoot, not a difference);
- verify(G+1) / decode time, the cost of the graph forms that make a verify row equal a decode (median CPU time of
  direct calls on one thread, at a position past the sliding window).

    .venv/bin/python -m benchmarks.mtp_plain BUNDLE.litertlm... [--max-tokens 128] [--draft-len 3] [--no-litertlm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.loop_speed import signature_ms
from edge_mtp.bundle import open_bundle
from edge_mtp.runtime.backends.litert import LiteRTBackend
from edge_mtp.runtime.divergence import divergences
from edge_mtp.util.prompts import DEFAULT_PROMPTS

PROMPTS = DEFAULT_PROMPTS + [
    # the demo pair's domain: Python's documentation
    "The with statement is used to wrap the execution of a block",
    "Return a new sorted list from the items in iterable.",
    "class Counter(dict):",
    "The import system searches for modules",
    "Raised when a sequence subscript is out of range.",
    "import os\nfor root, dirs, files in os.walk(path):",
    "A generator expression yields",
    "If the optional argument key is given,",
    # outside it
    "The old lighthouse keeper walked along the shore and",
    "Dear Sir or Madam, I am writing to complain about",
    "In 1492, Columbus sailed",
    "The recipe calls for two cups of flour, a pinch of salt,",
    "Photosynthesis converts light energy into",
    "The match ended in a draw after",
    "Il était une fois une petite fille qui",
    "3 + 4 * 2 = ",
]


def first_text_difference(mtp: str, plain: str) -> int | None:
    """Index of the first character where the MTP text leaves the plain text (None: same, overshoot allowed)."""
    if mtp.startswith(plain):
        return None
    return next((i for i, (a, b) in enumerate(zip(mtp, plain)) if a != b), len(mtp))


def measure(bundle: Path, max_tokens: int, draft_len: int, litertlm: bool) -> dict:
    """Divergences per prompt in our loop and in LiteRT-LM, and verify/decode time, for one bundle."""
    opened = open_bundle(bundle)
    tokenizer, recipe = opened.tokenizer, opened.manifest.get("quantization")
    # CPU time of one thread (XNNPACK runs on the caller's thread): other processes on the machine do not count
    times = signature_ms(LiteRTBackend(bundle, threads=1), calls=300, position=100, clock=time.thread_time)
    backend = LiteRTBackend(bundle)
    verify = next(k for k in times if k.startswith("verify"))
    ours = [[d.to_dict() for d in divergences(backend, tokenizer.encode(p), max_tokens, draft_len,
                                              tokenizer.stop_tokens)] for p in PROMPTS]
    result = {"bundle": str(bundle), "recipe": recipe, "decode_ms": times["decode"], "verify_ms": times[verify],
              "verify_per_decode": times[verify] / times["decode"], "ours": ours}
    if litertlm:
        from edge_mtp.runtime.litertlm_engine import run_litertlm

        context = backend.contract.context
        on = run_litertlm(bundle, PROMPTS, max_tokens=max_tokens, context=context, mtp=True)
        off = run_litertlm(bundle, PROMPTS, max_tokens=max_tokens, context=context, mtp=False)
        result["litertlm"] = [first_text_difference(a, b) for a, b in zip(on.texts, off.texts)]
        result["litertlm_plain_chars"] = [len(text) for text in off.texts]
    return result


def report(r: dict) -> None:
    """One block per bundle: a line per prompt, then the counts."""
    print(f"{r['bundle']} ({r['recipe']}): verify/decode {r['verify_per_decode']:.2f} "
          f"(decode {r['decode_ms']:.3f} ms, verify {r['verify_ms']:.3f} ms)")
    for i, prompt in enumerate(PROMPTS):
        found = r["ours"][i]
        ours = ", ".join(f"token {d['token']} (gap {d['top2_gap']:.2e})" for d in found) or "identical"
        line = f"  {i + 1:2d} {prompt[:44]!r:48} ours: {ours}"
        if "litertlm" in r:
            char = r["litertlm"][i]
            line += f"; LiteRT-LM: {'identical' if char is None else f'differs from character {char}'}"
        print(line)
    differing = sum(1 for f in r["ours"] if f)
    line = (f"  ours: {differing}/{len(PROMPTS)} prompts differ, {sum(len(f) for f in r['ours'])} divergences")
    if "litertlm" in r:
        line += (f"; LiteRT-LM: {sum(1 for c in r['litertlm'] if c is not None)}/{len(PROMPTS)} prompts differ "
                 f"(plain texts of {min(r['litertlm_plain_chars'])}-{max(r['litertlm_plain_chars'])} characters)")
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-len", type=int, default=3)
    parser.add_argument("--no-litertlm", action="store_true", help="Our loop only.")
    parser.add_argument("--json", type=Path, help="Also write every result here.")
    args = parser.parse_args()
    results = []
    for bundle in args.bundles:
        results.append(measure(bundle, args.max_tokens, args.draft_len, not args.no_litertlm))
        report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
