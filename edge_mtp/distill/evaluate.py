"""Held-out acceptance: from prepared shards alone (the greedy loop replayed), or with the real loop and the target."""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.contract import Contract
from ..model.drafter import Drafter
from ..model.embedder import Embedder
from ..model.loading import TargetModels
from .shards import EVAL, ShardSet
from .student import accepted_per_round, cluster_of_tokens, draft_rows


@torch.no_grad()
def replay_acceptance(drafter: Drafter, embedder: Embedder, shards: ShardSet, draft_len: int,
                      device: torch.device | str = "cpu", batch: int = 8) -> tuple[float, float]:
    """(draft acceptance rate, mean accepted length) of greedy MTP decoding of the held-out sequences, replayed.

    On a greedy continuation the loop's drafts equal the recorded tokens as long as they are accepted, so each
    round's accepted count is its teacher-forced one; the loop starts at the prompt's end and moves on by the
    accepted count plus the bonus token. Rounds that are not trained (outside model turns) are stepped over.
    """
    was_training = drafter.training
    drafter.eval()
    cluster_of = cluster_of_tokens(drafter)
    accepted = drafted = rounds = 0
    for lo in range(0, shards.count(EVAL), batch):
        records = {k: v.to(device) for k, v in shards.read(EVAL, list(range(lo, min(lo + batch, shards.count(EVAL)))))
                   .items()}
        rows = draft_rows(drafter, embedder, records, draft_len, trained_only=False)
        per_round = {(int(b), int(n)): int(a) for b, n, a in
                     zip(rows.block.tolist(), rows.bonus.tolist(), accepted_per_round(drafter, rows, cluster_of))}
        for b in range(records["tokens"].shape[0]):
            n = max(1, int(records["prompt_len"][b]))
            while (b, n) in per_round:
                if records["loss_mask"][b, n]:
                    a = per_round[(b, n)]
                    accepted, drafted, rounds, n = accepted + a, drafted + draft_len, rounds + 1, n + a + 1
                else:
                    n += 1
    drafter.train(was_training)
    return (accepted / drafted if drafted else 0.0), ((accepted + rounds) / rounds if rounds else 0.0)


@torch.no_grad()
def measure_acceptance(models: TargetModels, drafter: Drafter, prompts: Sequence[Sequence[int]], draft_len: int,
                       max_tokens: int = 48) -> tuple[float, float]:
    """(draft acceptance rate, mean accepted length) of greedy MTP generation over `prompts`, with the real loop."""
    from ..runtime.backends.torch import TorchBackend
    from ..runtime.speculative import generate_tokens

    longest = max(len(p) for p in prompts)
    context = -(-(longest + max_tokens + draft_len + 2) // 8) * 8
    backend = TorchBackend(models, drafter.eval(),
                           Contract(models.spec, drafter.spec, context, draft_len, (max(8, -(-longest // 8) * 8),)))
    accepted = drafted = verifies = 0
    for prompt in prompts:
        _, st = generate_tokens(backend, list(prompt), max_tokens=max_tokens, draft_len=draft_len)
        accepted, drafted, verifies = accepted + st.accepted, drafted + st.drafted, verifies + st.verifies
    return (accepted / drafted if drafted else 0.0), ((accepted + verifies) / verifies if verifies else 0.0)
