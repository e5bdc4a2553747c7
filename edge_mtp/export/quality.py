"""What quantization cost: a quantized bundle measured against its fp32 twin on a prompt set, on any Backend
(LiteRT .litertlm or ONNX folder), so both formats report the very same numbers."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import numpy as np

from ..model.contract import DECODE
from ..runtime.backends.base import Backend
from ..runtime.speculative import SpeculativeDecoder, generate_tokens
from ..util.prompts import DEFAULT_PROMPTS

REPORT_MAX_TOKENS = 16


def open_backend(bundle: str | Path | Backend) -> Backend:
    """A Backend for a bundle: a .litertlm file (LiteRT) or an ONNX bundle folder (onnxruntime); Backends pass."""
    if isinstance(bundle, Backend):
        return bundle
    bundle = Path(bundle)
    if bundle.is_dir():
        from ..runtime.backends.ort import OnnxBackend

        return OnnxBackend(bundle, threads=1)
    from ..runtime.backends.litert import LiteRTBackend

    return LiteRTBackend(bundle)


def report_prompts(tokenizer, context: int, prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[list[int]]:
    """The prompt token ids the report runs (runtime.api.Tokenizer.encode, cut to a third of the context)."""
    limit = max(4, context // 3)
    return [tokenizer.encode(p)[:limit] for p in prompts]


def _teacher_forced_logits(backend: Backend, tokens: Sequence[int]) -> np.ndarray:
    decoder = SpeculativeDecoder(backend)
    backend.reset()
    return np.concatenate([decoder.step(DECODE, [t], i)["logits"][0] for i, t in enumerate(tokens)])


def _acceptance(backend: Backend, prompts: Sequence[Sequence[int]], max_tokens: int) -> float | None:
    """The loop's accepted / drafted over greedy generate_tokens(prompt, max_tokens) on every prompt."""
    accepted = drafted = 0
    for prompt in prompts:
        _, stats = generate_tokens(backend, prompt, max_tokens=max_tokens)
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    return accepted / drafted if drafted else None


def quantization_report(fp32: str | Path | Backend, quantized: str | Path | Backend,
                        prompts: Sequence[Sequence[int]], max_tokens: int = REPORT_MAX_TOKENS) -> dict:
    """Logit error and top-1 agreement along the fp32 greedy continuation, and drafter acceptance, fp32 vs quantized.

    `fp32` and `quantized` are Backends (or bundle paths, opened with open_backend). Acceptance is the loop's
    accepted / drafted (LiteRT-LM's "MTP Drafter - Success rate") over greedy generate_tokens(prompt, max_tokens)
    with no stop tokens, the same generation anyone can rerun on the bundle to check the number. The fp32 bundle runs
    first and is released before the quantized one is opened (only its logits are kept), so memory holds one bundle
    at a time: a real-size fp32 bundle alone is most of a laptop's memory.
    """
    ref = open_backend(fp32)
    runs = []
    for prompt in prompts:
        tokens, _ = generate_tokens(ref, prompt, max_tokens=max_tokens, mtp=False)
        sequence = list(prompt) + tokens[:-1]
        runs.append((sequence, _teacher_forced_logits(ref, sequence)))
    ref_drafts = ref.has_drafter
    ref_rate = _acceptance(ref, prompts, max_tokens) if ref_drafts else None
    del ref
    gc.collect()
    quant = open_backend(quantized)
    errors, agree, rows = [], 0, 0
    for sequence, want in runs:
        got = _teacher_forced_logits(quant, sequence)
        errors.append(float(np.abs(got - want).max() / (np.abs(want).max() or 1.0)))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        rows += len(sequence)
    both = ref_drafts and quant.has_drafter
    rate = {"fp32": ref_rate if both else None,
            "quantized": _acceptance(quant, prompts, max_tokens) if both else None}
    return {"logit_relative_error": max(errors), "top1_agreement": agree / rows,
            "drafter_acceptance_fp32": rate["fp32"], "drafter_acceptance_quantized": rate["quantized"],
            "prompts": len(prompts), "max_tokens": max_tokens, "prompt_token_ids": [list(map(int, p)) for p in prompts]}
