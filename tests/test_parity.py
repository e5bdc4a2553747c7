"""Our modules vs transformers, fp32, on checkpoints written by transformers itself (two geometries)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from edge_mtp.model.contract import Contract, causal_mask, drafter_mask, k_name, v_name
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.speculative import generate_tokens

from conftest import GEOMETRIES

CONTEXT = 64


def _close(ours: torch.Tensor, ref: torch.Tensor, scale: float, rel: float = 1e-4) -> float:
    err = float((ours - ref).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel:g} x scale {scale:.3g}"
    return err


def _target_call(models, ids: list[int], start: int, kv: dict) -> dict:
    t = torch.tensor([ids], dtype=torch.int32)
    emb = models.embedder(t)["embeddings"]
    ple = models.per_layer_embedder(t)["per_layer_embeddings"]
    pos = torch.arange(start, start + len(ids), dtype=torch.int32)
    mask = torch.from_numpy(causal_mask(start, len(ids), CONTEXT))
    return models.target(emb, ple, pos, mask, **kv)


def _empty_kv(models) -> dict:
    c = Contract(models.spec, None, context=CONTEXT, prefill_lengths=(8,))
    return {s.name: torch.zeros(s.shape) for s in c.kv_tensors()}


@pytest.fixture(scope="module")
def ours(hf_pairs):
    return {name: load_target(p["target_dir"]) for name, p in hf_pairs.items()}


@pytest.mark.parametrize("name", GEOMETRIES)
@torch.no_grad()
def test_prefill_logits_activations_and_store_caches(hf_pairs, ours, name):
    ref_model, models = hf_pairs[name]["target"], ours[name]
    ids = torch.randint(0, models.spec.vocab_size, (1, 13), generator=torch.Generator().manual_seed(0))
    ref = ref_model.model(ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    ref_logits = ref_model(ids).logits
    out = _target_call(models, ids[0].tolist(), 0, _empty_kv(models))
    scale = float(ref_logits.abs().max())
    _close(out["logits"], ref_logits, scale)
    _close(out["activations"], ref.hidden_states[-1], float(ref.hidden_states[-1].abs().max()))
    for kind, layer in models.spec.store_layers.items():
        k_ref, v_ref = ref.shared_kv_states[f"{kind}_attention"]
        _close(out[k_name(layer)][:, :, :13], k_ref, float(k_ref.abs().max()))
        _close(out[v_name(layer)][:, :, :, :13].transpose(2, 3), v_ref, float(v_ref.abs().max()))


@pytest.mark.parametrize("name", GEOMETRIES)
@torch.no_grad()
def test_incremental_decode_crosses_the_sliding_window(hf_pairs, ours, name):
    ref_model, models = hf_pairs[name]["target"], ours[name]
    assert models.spec.sliding_window < 10
    ids = torch.randint(0, models.spec.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1)).tolist()[0]
    cache, kv, worst = DynamicCache(config=ref_model.config), _empty_kv(models), 0.0
    prompt = 6
    ref = ref_model(torch.tensor([ids[:prompt]]), past_key_values=cache, use_cache=True)
    out = _target_call(models, ids[:prompt], 0, kv)
    kv = {n: out[n] for n in kv}
    for step in range(prompt, len(ids)):  # 42 single-token decode steps
        ref = ref_model(torch.tensor([[ids[step]]]), past_key_values=cache, use_cache=True)
        out = _target_call(models, [ids[step]], step, kv)
        kv = {n: out[n] for n in kv}
        worst = max(worst, _close(out["logits"], ref.logits, float(ref.logits.abs().max())))
    assert len(ids) - prompt >= 40


@torch.no_grad()
def test_multimodal_wrapper_text_path(tmp_path):
    from hf_models import hf_target, save
    from edge_mtp.checkpoint.spec import TARGET_PRESETS

    ref_model = hf_target(TARGET_PRESETS["tiny"], seed=5, multimodal=True)
    models = load_target(save(ref_model, tmp_path / "mm"))
    ids = torch.tensor([[5, 9, 77, 3, 120, 31, 8, 200, 14]])
    ref = ref_model(input_ids=ids).logits
    out = _target_call(models, ids[0].tolist(), 0, _empty_kv(models))
    _close(out["logits"], ref, float(ref.abs().max()))


def _drafter_case(hf_pairs, ours, name: str, dense: bool, tmp_path):
    """Our drafter and transformers' assistant on identical K/V (from a real prefill) and identical visibility."""
    from hf_models import hf_assistant, save
    from edge_mtp.checkpoint.spec import DRAFTER_PRESETS
    from dataclasses import replace

    models = ours[name]
    if dense:
        spec = replace(DRAFTER_PRESETS[f"{name}-assistant"], use_ordered_embeddings=False)
        assistant = hf_assistant(spec, seed=9)
        directory = save(assistant, tmp_path / "dense")
    else:
        assistant, directory = hf_pairs[name]["assistant"], hf_pairs[name]["assistant_dir"]
    # transformers shows the sliding layers the last W+1 handed-over keys; ours shows W (LiteRT-LM's view).
    drafter = load_drafter(directory, models.spec, sliding_window=models.spec.sliding_window + 1)
    p = 11  # bonus position: keys [0, p-1] were written by the target
    ids = torch.randint(0, models.spec.vocab_size, (1, p), generator=torch.Generator().manual_seed(2))
    out = _target_call(models, ids[0].tolist(), 0, _empty_kv(models))
    carry = out["activations"][:, -1:]
    token = torch.tensor([[17]], dtype=torch.int32)
    emb = models.embedder(token)["embeddings"]
    shared = {}
    for kind, layer in models.spec.store_layers.items():
        shared[f"{kind}_attention"] = (out[k_name(layer)][:, :, :p], out[v_name(layer)][:, :, :, :p].transpose(2, 3))
    caches = {n: out[n] for n in drafter.cache_names()}
    worst = []
    for _ in range(3):  # three chained draft steps, each feeding its own carry
        act = torch.cat([emb, carry], dim=-1)
        ref = assistant(inputs_embeds=act, position_ids=torch.tensor([[p]]), attention_mask=torch.ones(1, p),
                        shared_kv_states=shared)
        mine = drafter(act, torch.tensor([p - 1], dtype=torch.int32), torch.from_numpy(drafter_mask(p - 1, CONTEXT)),
                       **caches)
        worst.append(_close(mine["logits"], ref.logits, float(ref.logits.abs().max())))
        _close(mine["projected_activations"], ref.last_hidden_state, float(ref.last_hidden_state.abs().max()))
        assert int(mine["logits"].argmax()) == int(ref.logits.argmax())
        emb = models.embedder(mine["logits"].argmax(-1).int())["embeddings"]
        carry = mine["projected_activations"]
    return worst


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("dense", [False, True], ids=["centroid-head", "dense-head"])
@torch.no_grad()
def test_drafter_matches_assistant(hf_pairs, ours, name, dense, tmp_path):
    _drafter_case(hf_pairs, ours, name, dense, tmp_path)


@pytest.mark.parametrize("name", GEOMETRIES)
@torch.no_grad()
def test_mtp_generate_equals_plain_greedy_and_transformers(hf_pairs, ours, name):
    ref_model, assistant = hf_pairs[name]["target"], hf_pairs[name]["assistant"]
    models = ours[name]
    drafter = load_drafter(hf_pairs[name]["assistant_dir"], models.spec)
    prompts = [[2, 40, 41, 42], [2, 7, 100, 9, 33, 18, 60, 61, 5, 11, 90], [2, 150]]
    for g in (1, 2, 3, 4):
        backend = TorchBackend(models, drafter, Contract(models.spec, drafter.spec, CONTEXT, g, (4, 8)))
        for prompt in prompts:
            plain, _ = generate_tokens(backend, prompt, max_tokens=20, mtp=False)
            mtp, stats = generate_tokens(backend, prompt, max_tokens=20, draft_len=g)
            ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                     eos_token_id=None)[0, len(prompt):].tolist()
            assert mtp == plain == ref
            assert stats.drafted == g * stats.verifies and len(stats.accepted_per_round) == stats.verifies
            if g == 3:
                assisted = ref_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                              eos_token_id=None, assistant_model=assistant)[0, len(prompt):].tolist()
                assert assisted == ref
