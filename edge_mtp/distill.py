"""Distil a Gemma 4 MTP assistant (drafter) for a target, trained on the target's own outputs.

Objective, as the drafter is used at inference (gemma4.md §3-§4, LiteRT-LM protocol): for a sequence x_0..x_{L-1}
the target runs once (causal), giving activations a_j, logits l_j and its store-layer caches. A round at bonus
position N feeds step 0 concat(E(x_N), a_{N-1}) at input_pos N-1 with keys [0, N-1] visible; step i > 0 feeds
concat(E(x_{N+i}), carry of step i-1) at the same position and mask. Step i is trained to predict argmax l_{N+i}
(the target's greedy token after x_{N+i}) with cross-entropy, plus KL to softmax(l_{N+i}), plus cross-entropy of the
centroid head against that token's cluster. Sequences are prompts (from text files, a prompt file, or random
tokens) continued greedily by the target, so most rounds see exactly what the target says.

Many sequences are batched into one "super-sequence": sequence b occupies positions [b*L, (b+1)*L) and a
block-diagonal mask keeps them apart (RoPE is relative, so the offset changes nothing); every round of every
sequence is one query row of a single Drafter call.

CLI wiring (`edge-mtp distill`): --target DIR --out DIR [--data FILE...] [--prompts FILE] [--steps N]
[--draft-len G] [--lr LR] [--batch B] [--seq-len L] [--seed S] [--resume] [--init DIR]; pass a `progress`
callback `(step, total, loss, running_acceptance) -> None` to drive a progress bar.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .atomic import atomic_file
from .contract import MASK_HIDDEN, MASK_VISIBLE, Contract
from .errors import EdgeMtpError
from .hf_config import drafter_config, generation_config
from .layout import ORDERING, drafter_tensors
from .model.drafter import Drafter
from .model.loading import TargetModels, load_drafter, load_target
from .spec import FULL, SLIDING, DrafterSpec, TargetSpec, check_pair

STATE_FILE = "distill_state.pt"
Progress = Callable[[int, int, float, float], None]


@dataclass
class DistillResult:
    """What a distillation run did: loss history (all steps, resumed ones included) and acceptance before/after."""

    out_dir: Path
    start_step: int
    steps: int
    losses: list[float]
    acceptance_before: float
    acceptance_after: float
    mean_accepted_length_before: float
    mean_accepted_length_after: float
    seconds: float
    running_acceptance: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return asdict(self) | {"out_dir": str(self.out_dir)}


# ---------------------------------------------------------------------------------------------------------------
# Geometry and token clusters


def default_drafter_spec(target: TargetSpec, draft_len: int = 3) -> DrafterSpec:
    """An assistant geometry for `target`: 4 layers [S,S,S,F], half width (32..256), the target's KV geometry."""
    h = min(256, max(32, target.hidden_size // 2))
    heads = max(target.num_kv_heads, target.num_heads // 2)
    heads -= heads % target.num_kv_heads
    v = target.vocab_size
    centroids = _divisor_near(v, min(2048, round(4 * math.sqrt(v))))
    top_k = max(centroids // 64, min(centroids // 4, 8), 1)
    return DrafterSpec(
        hidden_size=h, intermediate_size=4 * h, layer_types=(SLIDING, SLIDING, SLIDING, FULL), num_heads=heads,
        num_kv_heads=target.num_kv_heads, head_dim=target.head_dim, global_head_dim=target.global_head_dim,
        sliding_window=target.sliding_window, vocab_size=v, rope_theta_sliding=target.rope_theta_sliding,
        rope_theta_full=target.rope_theta_full, partial_rotary_full=target.partial_rotary_full,
        rms_eps=target.rms_eps, dtype=target.dtype, backbone_hidden_size=target.hidden_size,
        use_ordered_embeddings=True, num_centroids=centroids, centroid_top_k=top_k, num_assistant_tokens=draft_len)


def _divisor_near(n: int, want: int) -> int:
    divisors = [d for d in range(1, min(n, 1 << 16) + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(math.log(d / want)), d))


@torch.no_grad()
def cluster_tokens(embeddings: torch.Tensor, num_clusters: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """token_ordering [V]: a permutation whose V/K-id rows are balanced spherical k-means clusters of `embeddings`."""
    v = embeddings.shape[0]
    size = v // num_clusters
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(embeddings.float(), dim=-1)
    centers = x[torch.randperm(v, generator=gen)[:num_clusters]].clone()
    for _ in range(iters):
        assign = torch.cat([(chunk @ centers.t()).argmax(-1) for chunk in x.split(8192)])
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters)
        empty = counts == 0
        sums[empty] = x[torch.randint(0, v, (int(empty.sum()),), generator=gen)]
        centers = F.normalize(sums, dim=-1)
    # Balanced assignment: most confident tokens first, each to its best cluster that still has room.
    m = min(8, num_clusters)
    best, cand = torch.cat([(chunk @ centers.t()).topk(m, -1).values for chunk in x.split(8192)]), \
        torch.cat([(chunk @ centers.t()).topk(m, -1).indices for chunk in x.split(8192)])
    members: list[list[int]] = [[] for _ in range(num_clusters)]
    leftovers = []
    for tok in torch.argsort(best[:, 0], descending=True).tolist():
        for c in cand[tok].tolist():
            if len(members[c]) < size:
                members[c].append(tok)
                break
        else:
            leftovers.append(tok)
    for c in range(num_clusters):
        while len(members[c]) < size:
            members[c].append(leftovers.pop())
    return torch.tensor([t for group in members for t in group], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Target side: block-diagonal batches, greedy continuations


def _kv_zeros(spec: TargetSpec, context: int) -> dict[str, torch.Tensor]:
    c = Contract(spec, None, context=context, draft_len=1, prefill_lengths=(context,))
    return {s.name: torch.zeros(s.shape) for s in c.kv_tensors()}


def _block_mask(first: torch.Tensor, last: torch.Tensor, context: int) -> torch.Tensor:
    """[1,1,R,C] additive mask: row r sees keys [first[r], last[r]]."""
    keys = torch.arange(context)[None, :]
    visible = (keys >= first[:, None]) & (keys <= last[:, None])
    return torch.where(visible, MASK_VISIBLE, MASK_HIDDEN)[None, None]


@torch.no_grad()
def _run_target(models: TargetModels, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                kv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tokens = ids.view(1, -1).int()
    emb = models.embedder(tokens)["embeddings"]
    ple = models.per_layer_embedder(tokens)["per_layer_embeddings"] if models.per_layer_embedder else None
    return models.target(emb, ple, pos.int(), mask, contiguous=False, **kv)


@torch.no_grad()
def greedy_continue(models: TargetModels, prompts: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """[B, length] token ids: each prompt (cut to length-1) continued greedily by the target, all in one batch."""
    b_count, context = len(prompts), len(prompts) * length
    seqs = [list(p[: length - 1]) for p in prompts]
    kv = _kv_zeros(models.spec, context)
    blocks = torch.tensor([b for b, s in enumerate(seqs) for _ in s])
    offs = torch.tensor([j for s in seqs for j in range(len(s))])
    ids = torch.tensor([t for s in seqs for t in s])
    pos = blocks * length + offs
    out = _run_target(models, ids, pos, _block_mask(blocks * length, pos, context), kv)
    last_rows = torch.cumsum(torch.tensor([len(s) for s in seqs]), 0) - 1
    pending = out["logits"][0, last_rows].argmax(-1)
    kv = {n: out[n] for n in kv}
    active = list(range(b_count))
    while active:
        for b, tok in zip(active, pending.tolist()):
            seqs[b].append(tok)
        active_now = [b for b in active if len(seqs[b]) < length]
        if not active_now:
            break
        keep = torch.tensor([active.index(b) for b in active_now])
        rows = torch.tensor(active_now)
        pos = rows * length + torch.tensor([len(seqs[b]) - 1 for b in active_now])
        out = _run_target(models, pending[keep], pos, _block_mask(rows * length, pos, context), kv)
        kv = {n: out[n] for n in kv}
        pending, active = out["logits"][0].argmax(-1), active_now
    return torch.tensor(seqs)


# ---------------------------------------------------------------------------------------------------------------
# Drafter side


def cluster_of_tokens(drafter: Drafter) -> torch.Tensor:
    """[V] cluster index of every token under the drafter's token_ordering."""
    s = drafter.spec
    out = torch.empty(s.vocab_size, dtype=torch.long)
    out[drafter.token_ordering.long()] = torch.arange(s.vocab_size) // s.tokens_per_centroid
    return out


def head_argmax(drafter: Drafter, y: torch.Tensor, dense: torch.Tensor, cluster_of: torch.Tensor) -> torch.Tensor:
    """Argmax of the inference head for many rows: the dense logits restricted to the top clusters' tokens."""
    s = drafter.spec
    if not s.use_ordered_embeddings:
        return dense.argmax(-1)
    top = drafter.centroids(y).topk(s.centroid_top_k, -1).indices
    allowed = torch.zeros(y.shape[0], s.num_centroids, dtype=torch.bool).scatter_(1, top, True)
    return dense.masked_fill(~allowed[:, cluster_of], float("-inf")).argmax(-1)


@dataclass
class DraftRows:
    """Every draft round of a batch of sequences, unrolled: per step i, the drafter state y, teacher logits, rows."""

    hidden: list[torch.Tensor]  # per step: y [R, h] (final-normed drafter state)
    carries: list[torch.Tensor]  # per step: projected carry [R, Hb]
    teacher: list[torch.Tensor]  # per step: target logits [R, V] of the token the step must predict
    block: torch.Tensor  # [R] sequence index b
    bonus: torch.Tensor  # [R] bonus position N within the sequence


def draft_rows(models: TargetModels, drafter: Drafter, seqs: torch.Tensor, draft_len: int) -> DraftRows:
    """Run the target once over `seqs` [B, L] (block-diagonal) and the drafter over all rounds N in 1..L-G at once."""
    b_count, length = seqs.shape
    context = b_count * length
    flat = seqs.reshape(-1)
    offs = torch.arange(length)
    starts = (torch.arange(b_count) * length).repeat_interleave(length)
    pos = starts + offs.repeat(b_count)
    tgt = _run_target(models, flat, pos, _block_mask(starts, pos, context), _kv_zeros(models.spec, context))
    ns = torch.arange(1, length - draft_len + 1)
    rb, rn = torch.arange(b_count).repeat_interleave(len(ns)), ns.repeat(b_count)
    base = rb * length
    input_pos = (base + rn - 1).int()
    mask = _block_mask(base, base + rn - 1, context)
    caches = {n: tgt[n] for n in drafter.cache_names()}
    carry = tgt["activations"][0, base + rn - 1][None]
    rows = DraftRows([], [], [], rb, rn)
    for i in range(draft_len):
        emb = models.embedder(flat[base + rn + i][None].int())["embeddings"]
        out = drafter(torch.cat([emb, carry], -1), input_pos, mask, hidden_only=True, **caches)
        carry = out["projected_activations"]
        rows.hidden.append(out["hidden"][0])
        rows.carries.append(carry[0])
        rows.teacher.append(tgt["logits"][0, base + rn + i])
    return rows


def _distill_loss(models: TargetModels, drafter: Drafter, seqs: torch.Tensor, prompt_lens: torch.Tensor,
                  draft_len: int, kl_weight: float, cluster_of: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Loss over every round of every sequence in `seqs` [B, L], and the teacher-forced draft acceptance."""
    rows = draft_rows(models, drafter, seqs, draft_len)
    table = drafter.embed_tokens.weight
    total = torch.zeros(())
    hits = torch.ones(len(rows.bonus), dtype=torch.bool)
    accepted = torch.zeros(len(rows.bonus))
    for y, teacher in zip(rows.hidden, rows.teacher):
        dense = y @ table.t()
        hard = teacher.argmax(-1)
        loss = F.cross_entropy(dense, hard)
        if kl_weight:
            loss = loss + kl_weight * F.kl_div(F.log_softmax(dense, -1), F.log_softmax(teacher, -1),
                                               log_target=True, reduction="batchmean")
        if drafter.spec.use_ordered_embeddings:
            loss = loss + F.cross_entropy(drafter.centroids(y), cluster_of[hard])
        total = total + loss / draft_len
        with torch.no_grad():
            hits &= head_argmax(drafter, y, dense, cluster_of) == hard
            accepted += hits.float()
    greedy_rows = rows.bonus >= prompt_lens[rows.block]
    chosen = accepted[greedy_rows] if bool(greedy_rows.any()) else accepted
    return total, float(chosen.mean()) / draft_len


def _init_drafter(spec: DrafterSpec, models: TargetModels, seed: int) -> Drafter:
    """A fresh drafter: default random weights, unit norms, output table = a random projection of the target's
    embedding rows (so similar tokens start close), token clusters from the target's embedding rows."""
    torch.manual_seed(seed)
    drafter = Drafter(spec, models.spec)
    with torch.no_grad():
        rows = models.target.embed_tokens.weight.float()
        table = rows @ torch.randn(rows.shape[1], spec.hidden_size)
        drafter.embed_tokens.weight.copy_(table * (spec.hidden_size ** -0.5 / table.std().clamp_min(1e-6)))
        if spec.use_ordered_embeddings:
            ordering = cluster_tokens(models.target.embed_tokens.weight, spec.num_centroids, seed=seed)
            drafter.token_ordering.copy_(ordering)
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
        t = _tensor_at(drafter, e.local).detach()
        tensors[e.name] = (t.to(torch.int64) if e.role == ORDERING else t.to(torch_dtype)).contiguous().clone()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    for name, cfg in (("config.json", drafter_config(spec)),
                      ("generation_config.json", generation_config(target, draft_len))):
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Prompts and acceptance


def _tokenizer(target_dir: Path):
    from tokenizers import Tokenizer

    file = target_dir / "tokenizer.json"
    if not file.is_file():
        raise EdgeMtpError(f"No tokenizer.json in {target_dir}; --data and --prompts need the target's tokenizer "
                           "(or omit them to distil from random prompts).")
    return Tokenizer.from_file(str(file))


def _make_prompts(target_dir: Path, spec: TargetSpec, data: Sequence[Path] | None, prompts: Path | Sequence[str] | None,
                  count: int, held_out: int, prompt_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, held-out evaluation prompts), each starting with BOS."""
    gen = torch.Generator().manual_seed(seed + 17)
    bos = [spec.bos_token_id]
    if data:
        tok = _tokenizer(target_dir)
        ids: list[int] = []
        for file in data:
            path = Path(file)
            if not path.is_file():
                raise EdgeMtpError(f"Data file {path} does not exist.")
            ids += tok.encode(path.read_text(errors="replace"), add_special_tokens=False).ids
        split = int(len(ids) * 0.95)
        if split < 4 * prompt_len:
            raise EdgeMtpError(f"The data files hold only {len(ids)} tokens; give at least {8 * prompt_len}.")

        def windows(lo: int, hi: int, n: int) -> list[list[int]]:
            starts = torch.randint(lo, max(lo + 1, hi - prompt_len), (n,), generator=gen).tolist()
            return [bos + ids[s: s + prompt_len - 1] for s in starts]

        return windows(0, split, count), windows(split, len(ids), held_out)
    if prompts is not None:
        tok = _tokenizer(target_dir)
        lines = Path(prompts).read_text().splitlines() if isinstance(prompts, (str, Path)) else list(prompts)
        encoded = [bos + tok.encode(line, add_special_tokens=False).ids[: prompt_len - 1]
                   for line in lines if line.strip()]
        if not encoded:
            raise EdgeMtpError(f"The prompt file {prompts} has no non-empty lines.")
        evals = encoded[-held_out:] if len(encoded) > 2 * held_out else encoded[:held_out]
        train = encoded[:-held_out] if len(encoded) > 2 * held_out else encoded
        order = torch.randperm(max(count, len(train)), generator=gen).tolist()[:count]
        return [train[i % len(train)] for i in order], evals
    low = 3 if spec.vocab_size > 8 else 0  # skip pad/eos/bos

    def rand(n: int) -> list[list[int]]:
        return [bos + torch.randint(low, spec.vocab_size, (prompt_len - 1,), generator=gen).tolist() for _ in range(n)]

    return rand(count), rand(held_out)


@torch.no_grad()
def measure_acceptance(models: TargetModels, drafter: Drafter, prompts: Sequence[Sequence[int]], draft_len: int,
                       max_tokens: int = 48) -> tuple[float, float]:
    """(draft acceptance rate, mean accepted length) of greedy MTP generation over `prompts`, with the real loop."""
    from .runtime.backends.torch import TorchBackend
    from .runtime.speculative import generate_tokens

    longest = max(len(p) for p in prompts)
    context = -(-(longest + max_tokens + draft_len + 2) // 8) * 8
    backend = TorchBackend(models, drafter.eval(),
                           Contract(models.spec, drafter.spec, context, draft_len, (max(8, -(-longest // 8) * 8),)))
    accepted = drafted = verifies = 0
    for prompt in prompts:
        _, st = generate_tokens(backend, list(prompt), max_tokens=max_tokens, draft_len=draft_len)
        accepted, drafted, verifies = accepted + st.accepted, drafted + st.drafted, verifies + st.verifies
    return (accepted / drafted if drafted else 0.0), ((accepted + verifies) / verifies if verifies else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The training loop


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _spec_from_dict(d: dict) -> DrafterSpec:
    return DrafterSpec(**(d | {"layer_types": tuple(d["layer_types"])}))


def distill(target_dir: str | Path, out_dir: str | Path, *, data: Sequence[str | Path] | None = None,
            prompts: str | Path | Sequence[str] | None = None, steps: int = 200, draft_len: int = 3,
            lr: float = 3e-3, batch: int = 8, seq_len: int = 64, prompt_len: int = 16, num_sequences: int = 128,
            kl_weight: float = 0.5, seed: int = 0, resume: bool = False, init_from: str | Path | None = None,
            drafter_spec: DrafterSpec | None = None, eval_prompts: int = 4, eval_tokens: int = 48,
            save_every: int = 50, dtype: str | None = None, progress: Progress | None = None) -> DistillResult:
    """Train a Gemma 4 assistant for the target at `target_dir` and write it to `out_dir` (HF layout + resume state).

    data: text files whose windows become prompts; prompts: a file (or list) of one prompt per line; neither: random
    token prompts. steps: total optimizer steps (with resume, training continues up to this). draft_len: G, the
    unrolled draft steps (written as num_assistant_tokens). batch x seq_len: sequences per step and their length
    (prompt_len prompt tokens + greedy continuation). num_sequences: size of the pool of target continuations.
    init_from: start from an existing assistant directory. drafter_spec: geometry override (default
    default_drafter_spec). dtype: storage dtype of the written weights (default the target's).
    progress(step, steps, loss, running_acceptance) is called after every step.
    """
    t0 = time.perf_counter()
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    state_path = out_dir / STATE_FILE
    # checks that need no model first
    if min(steps, draft_len, batch) < 1 or not lr > 0:
        raise EdgeMtpError(f"--steps, --draft-len and --batch must be at least 1 and --lr positive (got {steps}, "
                           f"{draft_len}, {batch}, {lr}).")
    if seq_len <= prompt_len + draft_len:
        raise EdgeMtpError(f"--seq-len {seq_len} must exceed the prompt length {prompt_len} plus the draft length.")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeMtpError(f"--out {out_dir} is a file; name a folder for the assistant checkpoint.")
    if resume and not state_path.is_file():
        raise EdgeMtpError(f"Nothing to resume: {state_path} does not exist; run without --resume first.")
    for file in data or ():
        if not Path(file).is_file():
            raise EdgeMtpError(f"Data file {file} does not exist.")
    models = load_target(target_dir)
    state = None
    if resume:
        try:
            state = torch.load(state_path, weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises anything from EOFError to UnpicklingError
            raise EdgeMtpError(f"{state_path} is not a distill state this edge-mtp can resume "
                               f"({type(e).__name__}); delete it and run without --resume.") from None
        if state["draft_len"] != draft_len:
            raise EdgeMtpError(f"{state_path} was trained with draft length {state['draft_len']}, not {draft_len}.")
        spec = _spec_from_dict(state["spec"])
        drafter = Drafter(spec, models.spec)
        drafter.load_state_dict(state["drafter"])
    elif init_from is not None:
        drafter = load_drafter(init_from, models.spec)
        spec = drafter.spec
    else:
        spec = drafter_spec or default_drafter_spec(models.spec, draft_len)
        drafter = _init_drafter(spec, models, seed)
    check_pair(models.spec, spec)
    for p in drafter.parameters():
        p.requires_grad_(True)
    models.target.requires_grad_(False)
    models.embedder.requires_grad_(False)

    train_prompts, eval_set = _make_prompts(target_dir, models.spec, data, prompts, num_sequences, eval_prompts,
                                            prompt_len, seed)
    if state is None:
        acc_before, len_before = measure_acceptance(models, drafter, eval_set, draft_len, eval_tokens)
        losses: list[float] = []
        running: list[float] = []
        start = 0
    else:
        acc_before, len_before = state["acceptance_before"], state["mean_accepted_length_before"]
        losses, running, start = list(state["losses"]), list(state["running_acceptance"]), int(state["step"])

    pool = torch.cat([greedy_continue(models, train_prompts[i: i + 16], seq_len)
                      for i in range(0, len(train_prompts), 16)])
    prompt_lens = torch.tensor([min(len(p), seq_len - 1) for p in train_prompts])
    optim = torch.optim.AdamW(drafter.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    if state is not None:
        optim.load_state_dict(state["optim"])
    cluster_of = cluster_of_tokens(drafter)
    warmup = max(1, min(20, steps // 10))

    def save(step: int) -> None:
        with atomic_file(state_path) as tmp:
            torch.save({"step": step, "draft_len": draft_len, "spec": asdict(drafter.spec),
                        "drafter": drafter.state_dict(), "optim": optim.state_dict(), "losses": losses,
                        "running_acceptance": running, "acceptance_before": acc_before,
                        "mean_accepted_length_before": len_before}, tmp)
        save_assistant(drafter, models.spec, out_dir, draft_len, dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    drafter.train()
    for step in range(start, steps):
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))[:batch]
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        loss, acc = _distill_loss(models, drafter, pool[pick], prompt_lens[pick], draft_len, kl_weight, cluster_of)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optim.step()
        losses.append(float(loss.detach()))
        running.append(acc)
        if progress:
            progress(step + 1, steps, losses[-1], acc)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1)
    save(max(steps, start))
    acc_after, len_after = measure_acceptance(models, drafter, eval_set, draft_len, eval_tokens)
    return DistillResult(out_dir, start, max(steps, start), losses, acc_before, acc_after, len_before, len_after,
                         time.perf_counter() - t0, running)


__all__ = ["DistillResult", "DraftRows", "distill", "draft_rows", "head_argmax", "cluster_of_tokens",
           "default_drafter_spec", "cluster_tokens", "greedy_continue",
           "measure_acceptance", "save_assistant", "STATE_FILE"]
