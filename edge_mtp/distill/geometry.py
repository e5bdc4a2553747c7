"""A drafter geometry for a target, and the token clusters of its centroid head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checkpoint.spec import FULL, SLIDING, DrafterSpec, TargetSpec


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
