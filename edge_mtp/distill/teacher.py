"""The target's side of distillation: continue prompts, then record what the drafter learns from.

Many sequences run as one "super-sequence": sequence b occupies positions [b*L, (b+1)*L) and a block-diagonal mask
keeps them apart (RoPE is relative, so the offset changes nothing).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..checkpoint.spec import TargetSpec
from ..model.contract import MASK_HIDDEN, MASK_VISIBLE, Contract, k_name, v_name
from ..model.layers import rope_cos_sin, rope_inv_freq
from ..model.loading import TargetModels


def device_of(models: TargetModels) -> torch.device:
    """Where the target's weights live."""
    return models.target.embed_tokens.weight.device


def kv_zeros(spec: TargetSpec, context: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Empty fp32 caches of every cache-owning layer for `context` positions."""
    c = Contract(spec, None, context=context, draft_len=1, prefill_lengths=(context,))
    return {s.name: torch.zeros(s.shape, device=device) for s in c.kv_tensors()}


def block_mask(first: torch.Tensor, last: torch.Tensor, context: int) -> torch.Tensor:
    """[1,1,R,C] additive mask: row r sees keys [first[r], last[r]]."""
    keys = torch.arange(context, device=first.device)[None, :]
    visible = (keys >= first[:, None]) & (keys <= last[:, None])
    return torch.where(visible, MASK_VISIBLE, MASK_HIDDEN)[None, None]


@torch.no_grad()
def run_target(models: TargetModels, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
               kv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One target forward over token ids at scattered positions (contiguous=False). Weights in bf16 or fp16 run
    under autocast to that dtype; activations and caches stay fp32."""
    weights = models.target.embed_tokens.weight
    tokens = ids.view(1, -1).int()
    emb = models.embedder(tokens)["embeddings"]
    ple = models.per_layer_embedder(tokens)["per_layer_embeddings"] if models.per_layer_embedder else None
    with torch.autocast(weights.device.type, weights.dtype, enabled=weights.dtype != torch.float32):
        return models.target(emb, ple, pos.int(), mask, contiguous=False, **kv)


@torch.no_grad()
def continue_prompts(models: TargetModels, prompts: Sequence[Sequence[int]], length: int, temperature: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, length] token ids: each prompt (cut to length-1) continued by the target, all in one batch: greedily
    (temperature 0) or sampled at `temperature` with `generator` (a CPU generator)."""
    device = device_of(models)
    b_count, context = len(prompts), len(prompts) * length
    seqs = [list(p[: length - 1]) for p in prompts]

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float().cpu() / temperature, -1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)

    kv = kv_zeros(models.spec, context, device)
    blocks = torch.tensor([b for b, s in enumerate(seqs) for _ in s], device=device)
    offs = torch.tensor([j for s in seqs for j in range(len(s))], device=device)
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    pos = blocks * length + offs
    out = run_target(models, ids, pos, block_mask(blocks * length, pos, context), kv)
    last_rows = torch.cumsum(torch.tensor([len(s) for s in seqs], device=device), 0) - 1
    pending = pick(out["logits"][0, last_rows])
    kv = {n: out[n] for n in kv}
    active = list(range(b_count))
    while active:
        for b, tok in zip(active, pending.tolist()):
            seqs[b].append(tok)
        active_now = [b for b in active if len(seqs[b]) < length]
        if not active_now:
            break
        keep = torch.tensor([active.index(b) for b in active_now], device=device)
        rows = torch.tensor(active_now, device=device)
        pos = rows * length + torch.tensor([len(seqs[b]) - 1 for b in active_now], device=device)
        out = run_target(models, pending[keep], pos, block_mask(rows * length, pos, context), kv)
        kv = {n: out[n] for n in kv}
        pending, active = pick(out["logits"][0]), active_now
    return torch.tensor(seqs)


def greedy_continue(models: TargetModels, prompts: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """[B, length] token ids: each prompt (cut to length-1) continued greedily by the target, all in one batch."""
    return continue_prompts(models, prompts, length)


def store_layers(spec: TargetSpec) -> list[int]:
    """The layers whose caches a drafter may read (one per attention type), ascending."""
    return sorted(set(spec.store_layers.values()))


def shift_keys(k: torch.Tensor, inv_freq: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Roped key rows k [n,L,Hkv,hd] moved by delta[n] positions (RoPE rotations compose), computed in fp32."""
    cos, sin = (t[:, None, None, :] for t in rope_cos_sin(delta.to(inv_freq.device), inv_freq))
    x = k.float()
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin).to(k.dtype)


@torch.no_grad()
def teacher_records(models: TargetModels, seqs: torch.Tensor, top_k: int,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Run the target once over `seqs` [B, L] and keep, per position, what drafter training reads (CPU tensors):
    `activations` [B,L,H] and the store layers' K/V rows `k_<i>`/`v_<i>` [B,L,Hkv,hd] in `dtype` (keys roped at
    their position within their own sequence), and the `top_k`
    largest logits (`teacher_values` fp32, `teacher_indices` int32, [B,L,k], largest first)."""
    device = device_of(models)
    b_count, length = seqs.shape
    context = b_count * length
    flat = seqs.reshape(-1).to(device)
    starts = (torch.arange(b_count, device=device) * length).repeat_interleave(length)
    pos = starts + torch.arange(length, device=device).repeat(b_count)
    kv = kv_zeros(models.spec, context, device)
    out = run_target(models, flat, pos, block_mask(starts, pos, context), kv)
    values, indices = out["logits"][0].float().topk(top_k, -1)
    records = {"activations": out["activations"][0].reshape(b_count, length, -1).to(dtype),
               "teacher_values": values.reshape(b_count, length, top_k),
               "teacher_indices": indices.int().reshape(b_count, length, top_k)}
    for layer in store_layers(models.spec):
        k = out[k_name(layer)][0]  # [Hkv, C, hd]
        v = out[v_name(layer)][0]  # [Hkv, hd, C]
        k = k.permute(1, 0, 2).reshape(b_count, length, *k.shape[::2])
        inv_freq = rope_inv_freq(models.spec, models.spec.layer_types[layer]).to(device)
        records[f"k_{layer}"] = shift_keys(k, inv_freq, -torch.arange(b_count, device=device) * length).to(dtype)
        records[f"v_{layer}"] = v.permute(2, 0, 1).reshape(b_count, length, v.shape[0], v.shape[1]).to(dtype)
    return {name: t.cpu().contiguous() for name, t in records.items()}
