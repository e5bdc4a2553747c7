"""What quantization cost: a quantized bundle measured against its fp32 twin on a prompt set."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..contract import DECODE
from ..runtime.backends.litert import LiteRTBackend
from ..runtime.speculative import SpeculativeDecoder, generate_tokens


def _teacher_forced_logits(backend: LiteRTBackend, tokens: Sequence[int]) -> np.ndarray:
    decoder = SpeculativeDecoder(backend)
    backend.reset()
    return np.concatenate([decoder._run(DECODE, [t], i, 1)["logits"][0] for i, t in enumerate(tokens)])


def quantization_report(fp32_bundle: Path, quantized_bundle: Path, prompts: Sequence[Sequence[int]],
                        max_tokens: int = 16) -> dict:
    """Logit error and top-1 agreement along the fp32 greedy continuation, and drafter acceptance, fp32 vs quantized."""
    ref, quant = LiteRTBackend(fp32_bundle), LiteRTBackend(quantized_bundle)
    errors, agree, rows = [], 0, 0
    accepted = {"fp32": [0, 0], "quantized": [0, 0]}
    for prompt in prompts:
        tokens, _ = generate_tokens(ref, prompt, max_tokens=max_tokens, mtp=False)
        sequence = list(prompt) + tokens[:-1]
        want, got = _teacher_forced_logits(ref, sequence), _teacher_forced_logits(quant, sequence)
        errors.append(float(np.abs(got - want).max() / (np.abs(want).max() or 1.0)))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        rows += len(sequence)
        if ref.has_drafter:
            for name, backend in (("fp32", ref), ("quantized", quant)):
                _, stats = generate_tokens(backend, prompt, max_tokens=max_tokens)
                accepted[name][0] += stats.accepted
                accepted[name][1] += stats.drafted
    rate = {k: (a / d if d else None) for k, (a, d) in accepted.items()}
    return {"logit_relative_error": max(errors), "top1_agreement": agree / rows,
            "drafter_acceptance_fp32": rate["fp32"], "drafter_acceptance_quantized": rate["quantized"],
            "prompts": len(prompts)}
