"""Presets, config.json parsing, refusals and the pair check."""

from __future__ import annotations

import pytest

from edge_mtp.checkpoint.hf_config import drafter_config, target_config
from edge_mtp.checkpoint.layout import drafter_tensors, parameter_count, target_tensors
from edge_mtp.checkpoint.spec import (DRAFTER_PRESETS, TARGET_PRESETS, check_pair, drafter_spec_from_config,
                                      preset_pair, target_spec_from_config)
from edge_mtp.util.errors import PairMismatchError, UnsupportedModelError


@pytest.mark.parametrize("name,target_params,assistant_params", [
    ("e2b", 4_628_569_344, 77_731_328), ("e4b", 7_463_013_376, 78_517_760)])
def test_real_presets_have_the_published_parameter_counts(name, target_params, assistant_params):
    target, drafter = preset_pair(name)
    assert parameter_count(target_tensors(target)) == target_params
    assert parameter_count(drafter_tensors(drafter)) == assistant_params
    check_pair(target, drafter)


def test_e2b_kv_sharing_matches_gemma4_reference():
    t = TARGET_PRESETS["e2b"]
    assert t.store_layers == {"sliding": 13, "full": 14}
    assert [t.kv_source(i) for i in (15, 19, 24, 29, 34)] == [13, 14, 14, 14, 14]
    assert len(t.kv_layers) == 15 and t.kv_bytes_per_token(2) == 18 * 1024
    assert TARGET_PRESETS["e4b"].store_layers == {"sliding": 22, "full": 23}
    assert TARGET_PRESETS["e4b"].kv_bytes_per_token(2) == 56 * 1024
    assert t.layer_intermediate_size(14) == 6144 and t.layer_intermediate_size(15) == 12288


def test_tiny_preset_keeps_every_feature():
    t = TARGET_PRESETS["tiny"]
    assert [t.kv_sharing_mode(i) for i in range(6)] == [None, "store", "store", "reuse", "reuse", "reuse"]
    assert t.ple_dim and t.double_wide_mlp and t.final_softcap == 30.0 and t.sliding_window == 4


@pytest.mark.parametrize("name", list(TARGET_PRESETS))
def test_config_round_trip_in_both_layouts(name):
    spec = TARGET_PRESETS[name]
    assert target_spec_from_config(target_config(spec)) == spec
    assert target_spec_from_config(target_config(spec, multimodal=True)) == spec
    drafter = DRAFTER_PRESETS[f"{name}-assistant"]
    assert drafter_spec_from_config(drafter_config(drafter), {"num_assistant_tokens": 3}) == drafter


def test_transformers_serialised_config_is_parsed(hf_pairs):
    import json
    cfg = json.loads((hf_pairs["tiny"]["target_dir"] / "config.json").read_text())
    assert "global_head_dim" not in cfg  # transformers writes per_layer_config instead
    assert target_spec_from_config(cfg) == TARGET_PRESETS["tiny"]


@pytest.mark.parametrize("change,message", [
    ({"enable_moe_block": True}, "Mixture-of-Experts"),
    ({"attention_k_eq_v": True}, "shared K=V attention"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
    ({"tie_word_embeddings": False}, "untied"),
])
def test_unsupported_families_are_refused(change, message):
    cfg = target_config(TARGET_PRESETS["tiny"]) | change
    with pytest.raises(UnsupportedModelError, match=message):
        target_spec_from_config(cfg)


def test_non_gemma4_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="model_type 'llama' is not a Gemma 4 text model"):
        target_spec_from_config({"model_type": "llama"})
    with pytest.raises(UnsupportedModelError, match="not a Gemma 4 assistant"):
        drafter_spec_from_config(target_config(TARGET_PRESETS["tiny"]))


def test_mismatched_pair_is_refused_with_the_field_named():
    target = TARGET_PRESETS["tiny"]
    with pytest.raises(PairMismatchError, match="backbone width is 1536 but the target's is 64"):
        check_pair(target, DRAFTER_PRESETS["e2b-assistant"])
    with pytest.raises(PairMismatchError, match="KV heads is 1 but the target's is 2"):
        check_pair(target, DRAFTER_PRESETS["tiny-mqa-assistant"].__class__(
            **{**DRAFTER_PRESETS["tiny-assistant"].__dict__, "num_kv_heads": 1}))
