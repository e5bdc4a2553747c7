"""Real-size certification: `edge-mtp validate` on a bundle against its own checkpoint (must pass) and against a
copy of that checkpoint with one defect (must fail), each as its own process, with wall time and the peak memory of
its process tree.

    python -m benchmarks.validate_scale BUNDLE --target DIR --assistant DIR [--defect noise] [--work DIR]

Not a test: an E2B bundle takes minutes per run on 2 cores. The test suite runs the same verdict on small presets at
every recipe (tests/test_certify.py), with every defect of the catalogue (tests/defects.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_mtp.util.memory import PeakSampler, tree_rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from defects import DEFECTS, defective_copy  # noqa: E402


def validate_run(bundle: Path, target: Path, assistant: Path, max_tokens: int) -> dict:
    """One `edge-mtp validate --json` process: exit code, wall seconds, peak RSS of its tree, failing rows."""
    command = [sys.executable, "-m", "edge_mtp.cli", "validate", str(bundle), "--target", str(target),
               "--assistant", str(assistant), "--max-tokens", str(max_tokens), "--no-litert-lm", "--json"]
    start = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakSampler(lambda: tree_rss_bytes(child.pid)) as sampler:
        out, err = child.communicate()
    row = {"exit_code": child.returncode, "wall_seconds": round(time.time() - start, 1),
           "peak_rss_gib": round(sampler.peak / 2**30, 2)}
    if "{" in out:
        report = json.loads(out[out.index("{"):])
        row["rows"] = len(report["checks"])
        row["failed"] = [f"{c['kind']}: {c['subject']}: {c['detail'][:160]}" for c in report["checks"]
                         if not c["passed"]]
        row["references"] = sorted({c["reference"] for c in report["checks"]})
    else:
        row["error"] = err.strip().splitlines()[-1:] or ["(nothing printed)"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--assistant", type=Path, required=True)
    parser.add_argument("--defect", choices=DEFECTS, default="noise")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="Where the defective copy goes (default: a temp dir).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        start = time.time()
        defective = defective_copy(args.target, args.defect, Path(tmp) / "target")
        print(json.dumps({"defective_copy_seconds": round(time.time() - start, 1), "defect": args.defect}), flush=True)
        for name, target in (("faithful", args.target), (f"defect: {args.defect}", defective)):
            row = validate_run(args.bundle, target, args.assistant, args.max_tokens)
            print(json.dumps({"checkpoint": name, **row}, indent=2), flush=True)


if __name__ == "__main__":
    main()
