"""The Gemma 4 assistant, one draft step, in LiteRT-LM's `mtp_drafter` contract."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.spec import FULL, SLIDING, DrafterSpec, TargetSpec
from .contract import k_name, v_name
from .kv_quant import KvScales
from .kv_update import read_cache
from .layers import DecoderLayer, KeyView, RMSNorm, rope_cos_sin, rope_inv_freq, take
from .target import ring_of


class Drafter(nn.Module):
    """activations [1,1,2Hb] = concat(scaled target embedding of the last token, carry) -> logits, next carry.

    `input_pos` int32 [1] follows LiteRT-LM: it is N-1 for the token at position N, and the query is roped at
    input_pos + 1 (what transformers does). `mask` [1,1,1,C] is the committed-context mask (keys [0, N-1]); the
    sliding layers also hide keys at or before input_pos - window. The caches are the target's store-layer caches,
    passed under the target's own names; a sliding one may be a ring (Target), read whole with its newest position
    taken as input_pos. Every row of a T-row call is an independent query (training batches
    rounds that way with hidden_only=True). With the centroid head, the logits of tokens outside the top clusters are
    min(candidate scores) - 1, computed in-graph (no host sync).
    """

    def __init__(self, spec: DrafterSpec, target: TargetSpec, sliding_window: int | None = None):
        super().__init__()
        self.spec = spec
        self.store_layers = dict(target.store_layers)
        self.window = sliding_window if sliding_window is not None else spec.sliding_window
        h = spec.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, False, spec.intermediate_size)
                                    for i in range(spec.num_layers))
        self.norm = RMSNorm(h, spec.rms_eps)
        self.pre_projection = nn.Linear(2 * spec.backbone_hidden_size, h, bias=False)
        self.post_projection = nn.Linear(h, spec.backbone_hidden_size, bias=False)
        if spec.use_ordered_embeddings:
            self.centroids = nn.Linear(h, spec.num_centroids, bias=False)
            self.register_buffer("token_ordering", torch.arange(spec.vocab_size, dtype=torch.int32))
            # token_ordering's inverse, kept ready so that a converted graph holds it as a constant (see
            # token_positions); `_inverse_of` names the ordering it was computed from
            self.register_buffer("inverse_ordering", torch.arange(spec.vocab_size, dtype=torch.int32, device="cpu"),
                                 persistent=False)
            self._inverse_of: tuple[int, int] | None = None
        # How the centroid head reads its candidate rows, set by the export from the table's recipe: EMBEDDING_LOOKUP
        # (ai-edge-quantizer quantizes those tables, GATHER ones it leaves fp32: 256 MiB of the E2B bundle), GATHER
        # in fp32 bundles: LiteRT-LM compiles the drafter for the GPU with constant-tensor sharing, under which ML
        # Drift takes EMBEDDING_LOOKUP tables only in int8/int4/int2 and aborts on a float one. Both copy rows.
        self.gather_rows = False
        self.kv_scales: dict[str, KvScales] = {}  # the target's, for int8 caches (model/kv_quant.py)
        for kind in (SLIDING, FULL):
            self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(spec, kind), persistent=False)

    def cache_names(self) -> list[str]:
        """The target caches this drafter reads (store layers of the attention types it uses)."""
        layers = sorted({self.store_layers[k] for k in self.spec.layer_types})
        return [n for i in layers for n in (k_name(i), v_name(i))]

    def head(self, y: torch.Tensor) -> torch.Tensor:
        """Logits [1,1,V] from the final-normed state y [1,1,h]: dense tied head or the centroid head.

        The centroid head scores the tokens of the top-k clusters; every other token gets min(scores) - 1. It is
        built without a scatter (GPU-delegable): each cluster's row of scores is gathered from the k scored rows
        plus one fill row (by the cluster's rank among the top k, or k), which lays the vocabulary out in
        `token_ordering` order, and one constant gather puts it back into token order.
        """
        table = self.embed_tokens.weight
        if not self.spec.use_ordered_embeddings:
            return torch.matmul(y, table.t())
        s = self.spec
        k, clusters, width = s.centroid_top_k, s.num_centroids, s.tokens_per_centroid
        _, top = torch.topk(self.centroids(y).reshape(1, clusters), k)
        top = top.reshape(k).to(torch.int32)
        candidates = take(self.token_ordering.reshape(clusters, width), 0, top).reshape(k * width)
        rows = take(table, 0, candidates) if self.gather_rows else F.embedding(candidates.long(), table)
        scores = torch.matmul(rows, y.reshape(-1, 1)).reshape(k, width)
        fill = torch.minimum(scores[:1], scores.amin(dim=(0, 1), keepdim=True) - 1.0)  # a row of min - 1
        chosen = (torch.arange(clusters, dtype=torch.int32).reshape(clusters, 1) == top.reshape(1, k)).float()
        # [clusters, k] times a [k] constant, summed (exact small integers): 3 ops where a sum row by row was 96, a
        # third of an E2B draft step's head. Not [k, clusters] times [k, 1]: LiteRT's GPU delegate multiplies that
        # as if the constant were its first element, which gave every chosen cluster rank 0 there.
        rank = k - (chosen * torch.arange(k, 0, -1, dtype=torch.float32)).sum(dim=1)  # k: not chosen
        ordered = take(torch.cat([scores, fill]), 0, rank.to(torch.int32)).reshape(s.vocab_size)
        return take(ordered, 0, self.token_positions()).reshape(1, 1, s.vocab_size)

    def token_positions(self) -> torch.Tensor:
        """[V] int32: where each token sits in `token_ordering` (its inverse), a constant once converted.

        Computed outside the graph: traced, the inverse is a scatter over the vocabulary that the converter folds for
        small vocabularies but not for Gemma's 262144 tokens, and LiteRT then ran it on every draft step (37 of the
        44 ms an E2B draft step took). An export traces the inverse as it was last computed: call
        `refresh_inverse_ordering` after changing `token_ordering` (eager calls notice the change themselves).
        """
        if not torch.compiler.is_exporting() and self._inverse_of != self._ordering_key():
            self.refresh_inverse_ordering()
        return self.inverse_ordering

    def refresh_inverse_ordering(self) -> None:
        """Recompute `token_positions` from the current `token_ordering`."""
        ordering = self.token_ordering
        inverse = torch.empty_like(ordering, device="cpu")
        inverse[ordering.long()] = torch.arange(ordering.shape[0], dtype=torch.int32, device="cpu")
        self.inverse_ordering, self._inverse_of = inverse, self._ordering_key()

    def _ordering_key(self) -> tuple[int, int]:
        return self.token_ordering.data_ptr(), self.token_ordering._version

    def forward(self, activations: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                hidden_only: bool = False, param_tensor: torch.Tensor | None = None,
                **kv_caches: torch.Tensor) -> dict[str, torch.Tensor]:
        """`param_tensor` (a LiteRT bundle whose target writes its caches in place): the caches are read the in-place
        way (model/kv_update.py), whole; on LiteRT's GPU any other read of them reads something else."""
        s = self.spec
        query_pos = input_pos + 1
        rope = {kind: rope_cos_sin(query_pos, getattr(self, f"inv_freq_{kind}")) for kind in (SLIDING, FULL)}
        one_row = activations.shape[1] == 1  # training passes many independent rows at scattered positions
        gather = one_row and param_tensor is None
        ring = ring_of(self.store_layers, mask, kv_caches)
        sliding = KeyView.ring(input_pos, input_pos[:1], mask, self.window, ring) if ring and one_row else \
            KeyView.sliding(input_pos, mask, self.window, contiguous=gather)
        views = {FULL: KeyView(mask), SLIDING: sliding}
        x = self.pre_projection(activations)
        for i, layer in enumerate(self.layers):
            kind = s.layer_types[i]
            src = self.store_layers[kind]
            attn = layer.self_attn

            def attention(a: torch.Tensor, attn=attn, kind=kind, src=src) -> torch.Tensor:
                q = attn.query(a, *rope[kind])
                return attn.o_proj(read_cache(views[kind], q, kv_caches[k_name(src)], kv_caches[v_name(src)],
                                              param_tensor, self.kv_scales.get(kind)))

            x = layer(x, attention)
        y = self.norm(x)
        if hidden_only:  # training: T independent query rows; the (one-row) output head is applied by the caller
            return {"hidden": y, "projected_activations": self.post_projection(y)}
        return {"logits": self.head(y), "projected_activations": self.post_projection(y)}
