"""The finished bundle against a streamed PyTorch reference (fp32, one layer in memory at a time), on a few prompts.

Catches what per-piece checks cannot: a join that links the wrong tensors, a widened table that returns other rows, a
model that emits only pad tokens, a drafter bound to the wrong cache. The same numbers are the bundle's
quantization report: logit error and top-1 agreement along the bundle's own greedy continuation, and how often the
bundle's drafter and the reference drafter propose the token that actually came next (first draft position, with
identical inputs, so the only differences are the bundle's graphs and caches).
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..bundle.tokenizer import Tokenizer
from ..model.contract import (DECODE, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract, causal_mask, drafter_mask, k_name,
                              v_name)
from ..model.drafter import Drafter
from ..model.loading import TargetSource
from ..runtime.backends.base import Backend
from ..util.errors import EdgeMtpError

REPORT_MAX_TOKENS = 16
HEAD_ROWS = 16384  # vocabulary rows of the tied head held at a time
# An fp32 bundle must match the reference to float rounding; a quantized one fails only when it agrees with the
# reference on fewer top tokens than any recipe costs (int4 on the tiny random preset, the harshest case measured:
# 0.63 for the target) yet far more than a broken graph gives (a pad-only or miswired bundle: about 1/vocab).
FP32_TOLERANCE, MIN_TOP1 = 1e-3, 0.25


@torch.no_grad()
def streamed_reference(source: TargetSource, contract: Contract,
                       sequences: Sequence[Sequence[int]]) -> list[dict[str, np.ndarray]]:
    """Per sequence: teacher-forced `logits` [T,V], `activations` [T,H], `embeddings` [T,H] and the caches of the
    target, computed in one pass over the layers with only one layer's weights loaded at a time."""
    from ..checkpoint.reading import swapped

    spec, target = contract.target, source.models.target
    order = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))

    def embed(owner: str, local: str, ids: Sequence[int]) -> torch.Tensor:
        local_ids = torch.from_numpy(np.searchsorted(order, ids).astype(np.int32)).reshape(1, len(ids))
        with swapped(source.modules[owner], local, table[owner]):
            return next(iter(source.modules[owner](local_ids).values()))

    table = {EMBEDDER: _rows(source, source.entry("embed_tokens.weight", EMBEDDER), order)}
    if spec.ple_dim:
        table[PER_LAYER_EMBEDDER] = _rows(source, source.entry("embed_tokens_per_layer.weight", PER_LAYER_EMBEDDER),
                                          order)
    for part in ("per_layer_model_projection", "per_layer_projection_norm"):
        source.load(TARGET, part)
    states = []
    for ids in sequences:
        embeddings = embed(EMBEDDER, "embed_tokens.weight", ids)
        ple = embed(PER_LAYER_EMBEDDER, "embed_tokens_per_layer.weight", ids) if spec.ple_dim else None
        mask = torch.from_numpy(causal_mask(0, len(ids), contract.context))
        # one call from position 0 over whole-context caches: what a ring bundle computes too, whatever the length
        context = target.layer_context(embeddings, ple, torch.arange(len(ids), dtype=torch.int32), mask, ring=0)
        caches = {s.name: torch.zeros(s.shape) for s in replace(contract, sliding_ring=False).kv_tensors()}
        states.append({"context": context, "caches": caches, "h": embeddings, "embeddings": embeddings[0].numpy()})
    for part in ("per_layer_model_projection", "per_layer_projection_norm"):
        source.release(TARGET, part)
    drafter_reads = {t.name for t in contract.drafter_kv_tensors()} if contract.drafter is not None else set()
    keep = set(spec.store_layers.values()) | {i for i in spec.kv_layers if k_name(i) in drafter_reads}
    for i in range(spec.num_layers):
        source.load(TARGET, f"layers.{i}.")
        for state in states:
            state["h"] = target.layer(i, state["h"], state["context"], state["caches"])
            if i in spec.kv_layers and i not in keep:  # read by no later layer nor the drafter
                del state["caches"][k_name(i)], state["caches"][v_name(i)]
        source.release(TARGET, f"layers.{i}.")
    source.load(TARGET, "norm")
    entry = source.entry("embed_tokens.weight")
    logits: list[list[np.ndarray]] = [[] for _ in states]
    for start in range(0, spec.vocab_size, HEAD_ROWS):  # the head's logits, a slice of the vocabulary at a time
        with swapped(target, "embed_tokens.weight", source.rows(entry, start, min(spec.vocab_size, start + HEAD_ROWS))):
            heads = [target.head(state["h"]) for state in states]
        for rows, out in zip(logits, heads):
            rows.append(out["logits"][0].numpy())
    source.release(TARGET, "norm")
    return [{"logits": np.concatenate(rows, axis=-1), "activations": out["activations"][0].numpy(),
             "embeddings": state["embeddings"], **{k: v.numpy() for k, v in state["caches"].items()}}
            for rows, out, state in zip(logits, heads, states)]


def _rows(source: TargetSource, entry, ids: np.ndarray) -> torch.Tensor:
    """The table rows of some token ids, in the order given."""
    return torch.cat([source.rows(entry, int(t), int(t) + 1) for t in ids])


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))


def _drafter_row(backend: Backend, drafter: Drafter, contract: Contract, reference: dict, p: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(bundle, reference) drafter logits of the first draft at position p (input_pos p - 1); the backend's caches
    must hold the sequence up to p - 1 and no further than a ring reaches (run it right after decoding p - 1)."""
    names = [s.name for s in contract.drafter_kv_tensors()]
    activations = np.concatenate([reference["embeddings"][p], reference["activations"][p - 1]])[None, None]
    input_pos = np.array([p - 1], np.int32)
    mask = drafter_mask(p - 1, contract.context)
    got = backend.run_drafter(activations.astype(np.float32), input_pos, mask)["logits"].reshape(-1)
    with torch.no_grad():
        want = drafter(torch.from_numpy(activations.astype(np.float32)), torch.from_numpy(input_pos),
                       torch.from_numpy(mask), **{n: torch.from_numpy(reference[n]) for n in names})
    return got, want["logits"].numpy().reshape(-1)


def bundle_report(open_backend: Callable[[], Backend], source: TargetSource, drafter: Drafter | None,
                  contract: Contract, prompts: Sequence[Sequence[int]], max_tokens: int = REPORT_MAX_TOKENS,
                  on_stage: Callable[[str], None] = lambda s: None) -> dict:
    """Logit error, top-1 agreement and first-draft hit rates of a bundle against the streamed reference.

    The bundle is closed while the reference runs, so the two never hold their weights at the same time.
    """
    from ..runtime.speculative import SpeculativeDecoder, generate_tokens

    on_stage("checking: the bundle's greedy continuations")
    backend = open_backend()
    sequences = []
    for prompt in prompts:
        generated, _ = generate_tokens(backend, prompt, max_tokens=max_tokens, mtp=False)
        sequences.append(list(prompt) + generated[:-1])
    del backend
    gc.collect()
    on_stage("checking: the streamed PyTorch reference")
    references = streamed_reference(source, contract, sequences)
    on_stage("checking: the bundle teacher-forced, and its drafter")
    backend = open_backend()
    errors, agree, rows = [], 0, 0
    bundle_hits = reference_hits = same_drafts = draft_rows = 0
    drafter_error = 0.0
    drafts = drafter is not None and backend.has_drafter
    for sequence, reference in zip(sequences, references):
        decoder = SpeculativeDecoder(backend)
        backend.reset()
        got = []
        for i, token in enumerate(sequence):  # teacher forced, each first draft right after its position
            got.append(decoder.step(DECODE, [token], i)["logits"][0])
            if drafts and i + 2 < len(sequence):
                bundle_draft, reference_draft = _drafter_row(backend, drafter, contract, reference, i + 1)
                drafter_error = max(drafter_error, _relative(bundle_draft, reference_draft))
                bundle_hits += int(bundle_draft.argmax() == sequence[i + 2])
                reference_hits += int(reference_draft.argmax() == sequence[i + 2])
                same_drafts += int(bundle_draft.argmax() == reference_draft.argmax())
                draft_rows += 1
        got = np.concatenate(got)
        errors.append(_relative(got, reference["logits"]))
        agree += int((got.argmax(-1) == reference["logits"].argmax(-1)).sum())
        rows += len(sequence)
    report = {"reference": "streamed PyTorch fp32", "logit_relative_error": max(errors), "top1_agreement": agree / rows,
              "prompts": len(prompts), "max_tokens": max_tokens,
              "prompt_token_ids": [list(map(int, p)) for p in prompts]}
    if draft_rows:
        report.update(drafter_logit_relative_error=drafter_error, drafter_top1_agreement=same_drafts / draft_rows,
                      drafter_first_hit_bundle=bundle_hits / draft_rows,
                      drafter_first_hit_reference=reference_hits / draft_rows)
    return report


def litert_bundle_report(bundle: Path, source: TargetSource, drafter: Drafter | None, contract: Contract,
                         tokenizer: Tokenizer, on_stage: Callable[[str], None] = lambda s: None) -> dict:
    """bundle_report of a .litertlm file, run in LiteRT on the default report prompts."""
    from ..runtime.backends.litert import LiteRTBackend
    from .quality import report_prompts

    prompts = report_prompts(tokenizer, contract.context)
    return bundle_report(lambda: LiteRTBackend(bundle), source, drafter, contract, prompts, on_stage=on_stage)


def enforce(report: dict, where: str, exact: bool) -> None:
    """Stop an export whose bundle is broken (beyond float rounding when `exact`, else beyond any quantization)."""
    target_ok = report["logit_relative_error"] <= FP32_TOLERANCE if exact else report["top1_agreement"] >= MIN_TOP1
    if not target_ok:
        raise EdgeMtpError(
            f"The bundle built for {where} does not reproduce the model: logit error "
            f"{report['logit_relative_error']:.3g}, top-1 agreement {report['top1_agreement']:.2f} against the streamed "
            "PyTorch reference; nothing was written. Please report it with the checkpoint's config.json.")
    if "drafter_top1_agreement" not in report:
        return
    drafter_ok = (report["drafter_logit_relative_error"] <= FP32_TOLERANCE if exact
                  else report["drafter_top1_agreement"] >= MIN_TOP1)
    if not drafter_ok:
        raise EdgeMtpError(
            f"The bundle's MTP drafter does not reproduce the assistant (top-1 agreement "
            f"{report['drafter_top1_agreement']:.2f}, logit error {report['drafter_logit_relative_error']:.3g} against the "
            "reference on identical inputs): it reads the wrong cache or was miscompiled; nothing was written.")
