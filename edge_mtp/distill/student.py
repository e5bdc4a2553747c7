"""The drafter's side of distillation: every draft round of prepared sequences unrolled at once, and its loss.

Objective, as the drafter is used at inference (gemma4.md §3-§4, LiteRT-LM protocol): for a sequence x_0..x_{L-1}
the target ran once (causal), giving activations a_j, logits l_j and its store-layer caches. A round at bonus
position N feeds step 0 concat(E(x_N), a_{N-1}) at input_pos N-1 with keys [0, N-1] visible; step i > 0 feeds
concat(E(x_{N+i}), carry of step i-1) at the same position and mask. Step i is trained to predict argmax l_{N+i}
(the target's greedy token after x_{N+i}) with cross-entropy, plus KL to the target's top-k softmax at N+i, plus
cross-entropy of the centroid head against that token's cluster. Sequences of a batch sit side by side in one
block-diagonal context, and every round of every sequence is one query row of a single Drafter call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.hf_config import drafter_config, generation_config
from ..checkpoint.layout import ORDERING, drafter_tensors
from ..checkpoint.spec import DrafterSpec, TargetSpec
from ..model.contract import k_name, v_name
from ..model.drafter import Drafter
from ..model.embedder import Embedder
from ..util.atomic import atomic_file
from .geometry import cluster_tokens
from .teacher import block_mask, shift_keys


def cluster_of_tokens(drafter: Drafter) -> torch.Tensor:
    """[V] cluster index of every token under the drafter's token_ordering."""
    s = drafter.spec
    out = torch.empty(s.vocab_size, dtype=torch.long, device=drafter.token_ordering.device)
    out[drafter.token_ordering.long()] = torch.arange(s.vocab_size, device=out.device) // s.tokens_per_centroid
    return out


def head_argmax(drafter: Drafter, y: torch.Tensor, dense: torch.Tensor, cluster_of: torch.Tensor) -> torch.Tensor:
    """Argmax of the inference head for many rows: the dense logits restricted to the top clusters' tokens."""
    s = drafter.spec
    if not s.use_ordered_embeddings:
        return dense.argmax(-1)
    top = drafter.centroids(y).topk(s.centroid_top_k, -1).indices
    allowed = torch.zeros(y.shape[0], s.num_centroids, dtype=torch.bool, device=y.device).scatter_(1, top, True)
    return dense.masked_fill(~allowed[:, cluster_of], float("-inf")).argmax(-1)


@dataclass
class DraftRows:
    """Every draft round of a batch of sequences, unrolled: per step i, the drafter state y, carry and teacher."""

    hidden: list[torch.Tensor]  # per step: y [R, h] (final-normed drafter state)
    carries: list[torch.Tensor]  # per step: projected carry [R, Hb]
    teacher_values: list[torch.Tensor]  # per step: the target's top-k logits [R, k] of the token to predict
    teacher_indices: list[torch.Tensor]  # per step: their token ids [R, k], the greedy token first
    block: torch.Tensor  # [R] sequence index b within the batch
    bonus: torch.Tensor  # [R] bonus position N within the sequence


ROW_FIELDS = ("tokens", "loss_mask", "length")  # the records that say which draft rounds a batch has


def round_starts(records: dict[str, torch.Tensor], draft_len: int, trained_only: bool = True) -> tuple[torch.Tensor,
                                                                                                        torch.Tensor]:
    """(sequence, N) of every draft round with all its steps inside the sequence (and, trained_only, trained)."""
    n, length = records["tokens"].shape
    ns = torch.arange(length)
    ok = (ns[None] >= 1) & (ns[None] <= records["length"][:, None] - draft_len)
    if trained_only:
        ok &= records["loss_mask"].bool()
    b, pos = ok.nonzero(as_tuple=True)
    return b, pos


def count_rows(records: dict[str, torch.Tensor], draft_len: int) -> int:
    """Trained draft rounds in `records`."""
    return len(round_starts(records, draft_len)[0])


def draft_rows(drafter: Drafter, embedder: Embedder, records: dict[str, torch.Tensor], draft_len: int,
               trained_only: bool = True) -> DraftRows:
    """Run the drafter over all rounds of prepared `records` (on the drafter's device) at once."""
    device = records["tokens"].device
    b_count, length = records["tokens"].shape
    context = b_count * length
    rb, rn = (t.to(device) for t in round_starts({k: records[k].cpu() for k in ROW_FIELDS}, draft_len, trained_only))
    flat = records["tokens"].reshape(-1)
    base = rb * length
    input_pos = (base + rn - 1).int()
    mask = block_mask(base, base + rn - 1, context)
    caches = {}
    offsets = torch.arange(b_count, device=device) * length
    for kind, layer in sorted({(kind, drafter.store_layers[kind]) for kind in drafter.spec.layer_types}):
        # keys are stored roped at their position within their sequence; here sequence b starts at b * L
        k = shift_keys(records[f"k_{layer}"].float(), getattr(drafter, f"inv_freq_{kind}"), offsets)
        v = records[f"v_{layer}"].float()  # [n, L, Hkv, hd]
        caches[k_name(layer)] = k.reshape(context, *k.shape[2:]).permute(1, 0, 2)[None]
        caches[v_name(layer)] = v.reshape(context, *v.shape[2:]).permute(1, 2, 0)[None]
    acts = records["activations"].float().reshape(context, -1)
    carry = acts[base + rn - 1][None]
    values = records["teacher_values"].reshape(context, -1)
    indices = records["teacher_indices"].reshape(context, -1).long()
    rows = DraftRows([], [], [], [], rb, rn)
    for i in range(draft_len):
        emb = embedder(flat[base + rn + i][None].int())["embeddings"]
        out = drafter(torch.cat([emb, carry], -1), input_pos, mask, hidden_only=True, **caches)
        carry = out["projected_activations"]
        rows.hidden.append(out["hidden"][0])
        rows.carries.append(carry[0])
        rows.teacher_values.append(values[base + rn + i])
        rows.teacher_indices.append(indices[base + rn + i])
    return rows


def accepted_per_round(drafter: Drafter, rows: DraftRows, cluster_of: torch.Tensor) -> torch.Tensor:
    """[R] how many leading draft steps of each round the inference head gets right (0..G)."""
    table = drafter.embed_tokens.weight
    hits = torch.ones(len(rows.bonus), dtype=torch.bool, device=rows.bonus.device)
    accepted = torch.zeros(len(rows.bonus), device=rows.bonus.device)
    for y, indices in zip(rows.hidden, rows.teacher_indices):
        dense = (y @ table.t()).float()
        hits &= head_argmax(drafter, y, dense, cluster_of) == indices[:, 0]
        accepted += hits.float()
    return accepted


def loss_sum(drafter: Drafter, rows: DraftRows, kl_weight: float, cluster_of: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the per-row loss (mean over the G steps of CE + kl_weight * KL + centroid CE)."""
    table = drafter.embed_tokens.weight
    total = torch.zeros((), device=table.device)
    for y, values, indices in zip(rows.hidden, rows.teacher_values, rows.teacher_indices):
        dense = (y @ table.t()).float()
        hard = indices[:, 0]
        log_q = F.log_softmax(dense, -1)
        loss = F.nll_loss(log_q, hard, reduction="sum")
        if kl_weight:
            log_p = F.log_softmax(values.float(), -1)
            loss = loss + kl_weight * (log_p.exp() * (log_p - log_q.gather(1, indices))).sum()
        if drafter.spec.use_ordered_embeddings:
            loss = loss + F.cross_entropy(drafter.centroids(y).float(), cluster_of[hard], reduction="sum")
        total = total + loss / len(rows.hidden)
    return total


@torch.no_grad()
def init_drafter(spec: DrafterSpec, target: TargetSpec, table: torch.Tensor, seed: int) -> Drafter:
    """A fresh drafter: default random weights, unit norms, output table = a random projection of the target's
    embedding rows `table` (so similar tokens start close), token clusters from those rows."""
    torch.manual_seed(seed)
    drafter = Drafter(spec, target)
    rows = table.float()
    projected = rows @ torch.randn(rows.shape[1], spec.hidden_size)
    drafter.embed_tokens.weight.copy_(projected * (spec.hidden_size ** -0.5 / projected.std().clamp_min(1e-6)))
    if spec.use_ordered_embeddings:
        drafter.token_ordering.copy_(cluster_tokens(table, spec.num_centroids, seed=seed))
        drafter.refresh_inverse_ordering()
    return drafter


def _tensor_at(module: torch.nn.Module, local: str) -> torch.Tensor:
    owner, _, attr = local.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def save_assistant(drafter: Drafter, target: TargetSpec, out_dir: Path, draft_len: int,
                   dtype: str | None = None) -> None:
    """Write `drafter` as a Hugging Face Gemma4AssistantForCausalLM checkpoint (each file atomically)."""
    from safetensors.torch import save_file

    spec = replace(drafter.spec, num_assistant_tokens=draft_len, dtype=dtype or drafter.spec.dtype)
    torch_dtype = getattr(torch, spec.dtype)
    tensors = {}
    for e in drafter_tensors(spec):
        t = _tensor_at(drafter, e.local).detach().cpu()
        tensors[e.name] = (t.to(torch.int64) if e.role == ORDERING else t.to(torch_dtype)).contiguous().clone()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    for name, cfg in (("config.json", drafter_config(spec)),
                      ("generation_config.json", generation_config(target, draft_len))):
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2))
