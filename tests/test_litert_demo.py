"""The trained demo pair in Google's LiteRT-LM: same tokens, and the same acceptance as our own loop."""

from __future__ import annotations

import pytest

from edge_mtp.demo import assistant_dir, target_dir
from edge_mtp.export.pipeline import export_bundle
from edge_mtp.model.contract import Contract, k_name, v_name
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.api import load
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import generate_tokens

from conftest import DEMO_CONTEXT, DEMO_PREFILL

PROMPTS = ["The file", "A generator function", "If the value is"]
MAX_TOKENS = 32


def _pytorch_loop(model_tokenizer) -> tuple[list[str], int, int]:
    models = load_target(target_dir())
    drafter = load_drafter(assistant_dir(), models.spec)
    backend = TorchBackend(models, drafter, Contract(models.spec, drafter.spec, DEMO_CONTEXT, 3, DEMO_PREFILL))
    texts, accepted, drafted = [], 0, 0
    for prompt in PROMPTS:
        tokens, stats = generate_tokens(backend, model_tokenizer.encode(prompt), max_tokens=MAX_TOKENS,
                                        stop_tokens=model_tokenizer.stop_tokens)
        texts.append(model_tokenizer.decode([t for t in tokens if t not in model_tokenizer.stop_tokens]))
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    return texts, accepted, drafted


@pytest.fixture(scope="module")
def reference(demo_bundle):
    return _pytorch_loop(load(demo_bundle).tokenizer)


def test_litert_lm_success_rate_equals_our_loop(demo_bundle, reference):
    texts, accepted, drafted = reference
    assert accepted / drafted > 0.5  # a drafter that really agrees, so the comparison means something
    on = run_litertlm(demo_bundle, PROMPTS, MAX_TOKENS, DEMO_CONTEXT, mtp=True)
    off = run_litertlm(demo_bundle, PROMPTS, MAX_TOKENS, DEMO_CONTEXT, mtp=False)
    assert off.texts == texts
    assert all(a.startswith(b) for a, b in zip(on.texts, texts))  # LiteRT-LM's MTP may overshoot max tokens
    assert on.success_rate == pytest.approx(accepted / drafted, abs=1e-5)


def test_our_litert_backend_makes_the_same_decisions(demo_bundle, reference):
    texts, accepted, drafted = reference
    model = load(demo_bundle)
    got_accepted = got_drafted = 0
    for prompt, want in zip(PROMPTS, texts):
        tokens = list(model.generate(prompt, max_tokens=MAX_TOKENS))
        assert model.tokenizer.decode([t for t in tokens if t not in model.tokenizer.stop_tokens]) == want
        got_accepted += model.last_stats.accepted
        got_drafted += model.last_stats.drafted
    assert (got_accepted, got_drafted) == (accepted, drafted)


def test_a_drafter_reading_the_wrong_cache_breaks_the_acceptance_equality(demo_bundle, reference, tmp_path,
                                                                           monkeypatch):
    """The classic shared-KV wiring bug: the drafter binds layer 0's cache instead of the sliding store layer's."""
    _, accepted, drafted = reference
    models = load_target(target_dir())
    drafter = load_drafter(assistant_dir(), models.spec)
    wrong = {"sliding": 0, "full": models.spec.store_layers["full"]}
    assert models.spec.layer_types[0] == "sliding" and wrong["sliding"] != models.spec.store_layers["sliding"]
    drafter.store_layers = wrong
    names = {k_name(i) for i in wrong.values()} | {v_name(i) for i in wrong.values()}
    monkeypatch.setattr(Contract, "drafter_kv_tensors",
                        lambda self: tuple(t for t in self.kv_tensors() if t.name in names))
    out = tmp_path / "miswired.litertlm"
    export_bundle("litert", models, drafter, out, context=DEMO_CONTEXT, prefill=DEMO_PREFILL)
    run = run_litertlm(out, PROMPTS, MAX_TOKENS, DEMO_CONTEXT, mtp=True)
    off = run_litertlm(demo_bundle, PROMPTS, MAX_TOKENS, DEMO_CONTEXT, mtp=False)
    assert all(a.startswith(b) for a, b in zip(run.texts, off.texts))  # output stays correct...
    assert run.success_rate < 0.5 * accepted / drafted  # ...while acceptance collapses, which the check catches
    assert run.success_rate != pytest.approx(accepted / drafted, abs=1e-5)
