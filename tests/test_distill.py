"""distill: the training path is the inference path, training helps, resume is exact, the output loads everywhere."""

from __future__ import annotations

import pytest
import torch

from helpers import Interrupt, stop_at

from edge_mtp.checkpoint.spec import check_pair
from edge_mtp.distill import (STATE_FILE, cluster_of_tokens, cluster_tokens, default_drafter_spec, distill,
                              draft_rows, greedy_continue, head_argmax, teacher_records)
from edge_mtp.distill.teacher import kv_zeros, run_target
from edge_mtp.model.contract import causal_mask, drafter_mask
from edge_mtp.model.loading import load_drafter, load_target

ARGS = dict(steps=30, batch=6, seq_len=24, prompt_len=6, num_sequences=96, eval_prompts=3, save_every=10, lr=5e-3)


@pytest.fixture(scope="module")
def trained(synth_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "assistant"
    return out, distill(synth_pair / "target", out, **ARGS)


def test_training_lowers_loss_and_raises_acceptance(trained):
    _, result = trained
    assert len(result.losses) == ARGS["steps"]
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])
    assert result.acceptance_after > result.acceptance_before
    assert result.mean_accepted_length_after > result.mean_accepted_length_before


def test_resume_continues_from_the_saved_step(synth_pair, trained, tmp_path):
    _, full = trained
    out = tmp_path / "assistant"

    with pytest.raises(Interrupt):
        distill(synth_pair / "target", out, progress=stop_at(15), **ARGS)
    assert torch.load(out / STATE_FILE, weights_only=False)["step"] == 10
    resumed = distill(synth_pair / "target", out, resume=True, **ARGS)
    assert resumed.start_step == 10 and len(resumed.losses) == ARGS["steps"]
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)
    assert resumed.acceptance_before == full.acceptance_before


def test_output_loads_with_our_loader_and_transformers(synth_pair, trained):
    from transformers import Gemma4AssistantForCausalLM

    out, _ = trained
    models = load_target(synth_pair / "target")
    drafter = load_drafter(out, models.spec)
    check_pair(models.spec, drafter.spec)
    assert drafter.spec.num_assistant_tokens == 3 and drafter.spec.use_ordered_embeddings
    assert sorted(drafter.token_ordering.tolist()) == list(range(models.spec.vocab_size))
    model, info = Gemma4AssistantForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.generation_config.num_assistant_tokens == 3


@torch.no_grad()
def test_batched_rows_equal_one_step_drafter_calls(synth_pair):
    """Every row of the block-diagonal training batch equals the real one-row drafter step on that sequence alone."""
    models = load_target(synth_pair / "target")
    drafter = load_drafter(synth_pair / "assistant", models.spec)
    seqs = greedy_continue(models, [[2, 40, 41, 42], [2, 7, 100, 9, 33]], 14)
    length = seqs.shape[1]
    records = {"tokens": seqs.int(), "loss_mask": torch.ones_like(seqs, dtype=torch.uint8),
               "prompt_len": torch.tensor([4, 5]), "length": torch.tensor([length, length]),
               **teacher_records(models, seqs, models.spec.vocab_size)}
    rows = draft_rows(drafter, models.embedder, records, 3)
    clusters = cluster_of_tokens(drafter)
    assert len(rows.bonus) == 2 * (length - 3)
    for r in (0, 4, len(rows.bonus) - 1):
        b, n = int(rows.block[r]), int(rows.bonus[r])
        tgt = run_target(models, seqs[b], torch.arange(length), torch.from_numpy(causal_mask(0, length, length)),
                         kv_zeros(models.spec, length))
        caches = {k: tgt[k] for k in drafter.cache_names()}
        carry = tgt["activations"][:, n - 1:n]
        for i in range(3):
            emb = models.embedder(seqs[b, n + i].view(1, 1).int())["embeddings"]
            out = drafter(torch.cat([emb, carry], -1), torch.tensor([n - 1], dtype=torch.int32),
                          torch.from_numpy(drafter_mask(n - 1, length)), **caches)
            carry = out["projected_activations"]
            torch.testing.assert_close(rows.carries[i][r], carry[0, 0], rtol=1e-4, atol=1e-4)
            y = rows.hidden[i][r:r + 1]
            dense = y @ drafter.embed_tokens.weight.t()
            assert int(head_argmax(drafter, y, dense, clusters)) == int(out["logits"].argmax())
            values, order = tgt["logits"][0, n + i].sort(descending=True)
            torch.testing.assert_close(rows.teacher_values[i][r], values, rtol=1e-4, atol=1e-4)
            assert int(rows.teacher_indices[i][r][0]) == int(order[0])


def test_greedy_continue_matches_plain_decoding(synth_pair):
    from edge_mtp.model.contract import Contract
    from edge_mtp.runtime.backends.torch import TorchBackend
    from edge_mtp.runtime.speculative import generate_tokens

    models = load_target(synth_pair / "target")
    prompts = [[2, 40, 41, 42], [2, 7, 100, 9, 33, 18]]
    seqs = greedy_continue(models, prompts, 20)
    backend = TorchBackend(models, None, Contract(models.spec, None, 32, 3, (8,)))
    for prompt, seq in zip(prompts, seqs):
        plain, _ = generate_tokens(backend, prompt, max_tokens=20 - len(prompt), mtp=False)
        assert seq.tolist() == prompt + plain


def test_clusters_are_a_balanced_permutation_and_geometry_matches_target(synth_pair):
    models = load_target(synth_pair / "target")
    spec = default_drafter_spec(models.spec)
    check_pair(models.spec, spec)
    ordering = cluster_tokens(models.target.embed_tokens.weight, spec.num_centroids)
    assert sorted(ordering.tolist()) == list(range(models.spec.vocab_size))


def test_clusters_group_tokens_with_similar_embeddings():
    """Rows drawn around 8 orthogonal directions, ids shuffled: clusters must be (nearly) pure; the identity
    ordering, or any ordering blind to the embeddings, mixes the groups."""
    gen = torch.Generator().manual_seed(0)
    vocab, groups, width = 256, 8, 16
    labels = torch.randperm(vocab, generator=gen) % groups
    weight = torch.eye(width)[labels] * 10 + 0.5 * torch.randn(vocab, width, generator=gen)

    def purity(ordering: torch.Tensor) -> float:
        blocks = labels[ordering].reshape(groups, vocab // groups)
        return float(sum(torch.bincount(b).max() for b in blocks)) / vocab

    ordering = cluster_tokens(weight, groups)
    assert sorted(ordering.tolist()) == list(range(vocab))
    assert purity(ordering) >= 0.7 and purity(torch.arange(vocab)) < 0.35, purity(ordering)


def test_committed_demo_pair_meets_the_acceptance_bar():
    """Greedy, draft length 3, on 9 prompts (3 from held-out documents): acceptance >= 0.6, >= 2.2 tokens/verify."""
    from edge_mtp.model.contract import Contract
    from edge_mtp.demo import assistant_dir, target_dir
    from edge_mtp.model.loading import load_drafter, load_target
    from edge_mtp.util.prompts import DEFAULT_PROMPTS
    from edge_mtp.bundle.tokenizer import Tokenizer
    from edge_mtp.runtime.backends.torch import TorchBackend
    from edge_mtp.runtime.speculative import generate_tokens
    from edge_mtp.checkpoint.spec import check_pair

    models = load_target(target_dir())
    drafter = load_drafter(assistant_dir(), models.spec)
    check_pair(models.spec, drafter.spec)
    backend = TorchBackend(models, drafter, Contract(models.spec, drafter.spec, 256, 3, (16,)))
    tokenizer = Tokenizer((target_dir() / "tokenizer.json").read_text(), models.spec.bos_token_id,
                          list(models.spec.eos_token_ids))
    prompts = ["Called by the parser to give the application", "This interface adds three extra methods to",
               "If the name represents a directory, return", "The list is", "A generator function",
               *DEFAULT_PROMPTS]
    accepted = drafted = verifies = 0
    for prompt in prompts:
        _, stats = generate_tokens(backend, tokenizer.encode(prompt), max_tokens=48)
        accepted, drafted, verifies = accepted + stats.accepted, drafted + stats.drafted, verifies + stats.verifies
    assert accepted / drafted >= 0.6 and (accepted + verifies) / verifies >= 2.2, (accepted, drafted, verifies)
