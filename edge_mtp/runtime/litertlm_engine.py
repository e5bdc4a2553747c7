"""Google's LiteRT-LM runtime (pip litert-lm-api) on a bundle, in a child process so its C++ log can be read.

The runtime logs `MTP Drafter - Success rate: <accepted/drafted>` only to stderr at engine teardown; a child
process is the reliable way to capture it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import EdgeMtpError

_SUCCESS = re.compile(r"MTP Drafter - Success rate: ([0-9.eE+-]+)")

_CHILD = r"""
import json, sys, tempfile, time
import litert_lm
args = json.loads(sys.argv[1])
info = litert_lm.ModelInfo(args["bundle"])
supports = info.llm.has_speculative_decoding_support()
info.close()
with tempfile.TemporaryDirectory() as cache:
    backend = litert_lm.Backend.GPU() if args["accelerator"] == "gpu" else litert_lm.Backend.CPU()
    start = time.time()
    engine = litert_lm.Engine(args["bundle"], backend=backend, max_num_tokens=args["context"],
                              enable_speculative_decoding=args["mtp"], enable_benchmark=True, cache_dir=cache)
    load_seconds = time.time() - start
    results = []
    for prompt in args["prompts"]:
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=args["max_tokens"],
                                        enable_speculative_decoding=args["mtp"])
        session.run_prefill([prompt])
        response = session.run_decode()
        bench = session.get_benchmark_info()
        results.append({"text": response.texts[0] if response.texts else "",
                        "decode_tokens_per_second": getattr(bench, "last_decode_tokens_per_second", None)})
        session.close()
    print("EDGE_MTP_RESULT " + json.dumps({"supports_mtp": supports, "results": results, "load_seconds": load_seconds}), flush=True)
    engine.close()
"""


@dataclass
class EngineRun:
    """Texts LiteRT-LM generated, whether the bundle advertises MTP, and the drafter success rate it logged."""

    texts: list[str]
    decode_tokens_per_second: list[float]
    supports_mtp: bool
    success_rate: float | None
    log: str
    load_seconds: float | None = None


def run_litertlm(bundle: Path, prompts: list[str], max_tokens: int, context: int, mtp: bool = True,
                 timeout: float = 600, accelerator: str = "cpu") -> EngineRun:
    """Generate greedily from each prompt with LiteRT-LM's CPU or GPU executor (one engine, one session per prompt).

    The GPU executor needs a Vulkan device (scripts/install_software_gpu.sh provides a software one) and a fully
    delegable bundle (edge_mtp.runtime.gpu_check).
    """
    try:
        import litert_lm  # noqa: F401
    except ImportError:
        raise EdgeMtpError("LiteRT-LM is not installed: pip install litert-lm-api.") from None
    args = json.dumps({"bundle": str(bundle), "prompts": prompts, "max_tokens": max_tokens, "context": context,
                       "mtp": mtp, "accelerator": accelerator})
    proc = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EDGE_MTP_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise EdgeMtpError(f"LiteRT-LM ({accelerator}) failed on {bundle} (exit {proc.returncode}): {tail}")
    data = json.loads(line.split(" ", 1)[1])
    rates = _SUCCESS.findall(proc.stderr)
    return EngineRun([r["text"] for r in data["results"]], [r["decode_tokens_per_second"] for r in data["results"]],
                     data["supports_mtp"],
                     float(rates[-1]) if rates else None, proc.stderr, data.get("load_seconds"))
