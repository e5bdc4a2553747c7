"""MTP vs plain greedy output: the divergence report (runtime.divergence) on a backend whose verify rows can differ
from decodes, the way a runtime that rounds a batched row differently would."""

from __future__ import annotations

import numpy as np
import pytest

from scripted_backend import V, ScriptedBackend, plain_reference, rule
from edge_mtp.model.contract import VERIFY
from edge_mtp.runtime.divergence import divergences, plain_with_gaps, top2_gap

PROMPT = [5, 9, 2, 7]
GAP = 0.25  # the scripted target's margin between its choice and the runner-up


class NearTies(ScriptedBackend):
    """The scripted target with a runner-up GAP below its choice; at `flip` positions a verify row picks the
    runner-up instead (a near-tie broken the other way by a batched row's rounding)."""

    def __init__(self, flip: set[int]):
        super().__init__(context=96)
        self.flip = flip

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        out = super().run_target(signature, embeddings, per_layer_embeddings, input_pos, mask)
        logits = out["logits"]
        for row, (token, position) in enumerate(zip(embeddings[0, :, 0], input_pos)):
            best, runner_up = rule(int(token), int(position)), (rule(int(token), int(position)) + 1) % V
            logits[0, row, runner_up] = 1.0 - GAP
            if signature == VERIFY and int(position) in self.flip:
                logits[0, row, best], logits[0, row, runner_up] = 1.0 - GAP, 1.0
        return out


def test_identical_runs_have_no_divergence():
    assert divergences(NearTies(flip=set()), PROMPT, max_tokens=40) == []


def test_every_divergence_is_reported_with_the_plain_gap():
    # positions 12 and 30 are verified rows of some round (the prompt ends at 3, every round verifies 4 rows)
    backend = NearTies(flip={12, 30})
    found = divergences(backend, PROMPT, max_tokens=40)
    plain = plain_reference(PROMPT, 40)
    assert [d.token for d in found] == [12 - 3, 30 - 3]
    for d in found:
        assert d.plain == plain[d.token] and d.mtp == (d.plain + 1) % V
        assert d.top2_gap == pytest.approx(GAP)
        assert d.to_dict()["top2_gap"] == d.top2_gap


def test_plain_gaps_come_from_the_decodes_of_the_plain_run():
    tokens, gaps = plain_with_gaps(NearTies(flip=set()), PROMPT, max_tokens=10)
    assert tokens == plain_reference(PROMPT, 10)
    assert gaps == pytest.approx([GAP] * 10)
    assert top2_gap(np.array([0.5, 3.0, 2.0])) == 1.0
