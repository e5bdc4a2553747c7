"""A prompt of more than 8K tokens through a ring bundle whose context holds it, in LiteRT-LM and in our loop.

The tiny pair exported at context 8448 (rings of window + 128 - 1 slots, full layers of 8448) takes a prompt of
8,200 tokens: both runtimes give the same text with MTP on and off. A prompt that also fits a 4096-context bundle of
the same checkpoint gives that bundle's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from edge_mtp.export.pipeline import export_litert
from edge_mtp.runtime.backends.litert import LiteRTBackend
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.runtime.speculative import generate_tokens

LONG, SHORT, PREFILL = 8448, 4096, (128,)
MAX_TOKENS = 24
LONG_PROMPT_TOKENS = 8200


@pytest.fixture(scope="module")
def bundles(synth_pair, tmp_path_factory) -> dict[int, object]:
    """The tiny pair exported at each context."""
    root = tmp_path_factory.mktemp("long")
    out = {}
    for context in (LONG, SHORT):
        out[context] = root / f"tiny-{context}.litertlm"
        export_litert(synth_pair / "target", synth_pair / "assistant", out[context], context=context, prefill=PREFILL)
    return out


@pytest.fixture(scope="module")
def tokenizer(synth_pair):
    return AutoTokenizer.from_pretrained(synth_pair / "target")


def _prompt(tokenizer, tokens: int) -> str:
    """Seeded text of exactly `tokens` tokens (the tiny tokenizer gives the start token, then one per character)."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz  ,."), tokens - 1))
    assert len(tokenizer(text)["input_ids"]) == tokens
    return text


def test_a_prompt_past_8k_runs_mtp_like_plain_in_litert_lm_and_our_loop(bundles, tokenizer):
    text = _prompt(tokenizer, LONG_PROMPT_TOKENS)
    ids = tokenizer(text)["input_ids"]
    assert SHORT < len(ids) and len(ids) + MAX_TOKENS < LONG
    backend = LiteRTBackend(bundles[LONG])
    ours = {mtp: generate_tokens(backend, ids, max_tokens=MAX_TOKENS, mtp=mtp)[0] for mtp in (False, True)}
    assert len(ours[False]) == MAX_TOKENS and ours[True] == ours[False]
    on = run_litertlm(bundles[LONG], [text], max_tokens=MAX_TOKENS, context=LONG, mtp=True)
    off = run_litertlm(bundles[LONG], [text], max_tokens=MAX_TOKENS, context=LONG, mtp=False)
    assert on.supports_mtp and on.texts == off.texts == [tokenizer.decode(ours[False], skip_special_tokens=False)]


def test_a_prompt_both_bundles_hold_gives_the_same_tokens(bundles, tokenizer):
    text = _prompt(tokenizer, SHORT - MAX_TOKENS - 8)
    ids = tokenizer(text)["input_ids"]
    tokens = {c: generate_tokens(LiteRTBackend(bundles[c]), ids, max_tokens=MAX_TOKENS, mtp=True)[0]
              for c in (LONG, SHORT)}
    assert len(tokens[SHORT]) == MAX_TOKENS and tokens[LONG] == tokens[SHORT]
    texts = {c: run_litertlm(bundles[c], [text], max_tokens=MAX_TOKENS, context=c, mtp=True).texts for c in (LONG, SHORT)}
    assert texts[LONG] == texts[SHORT] == [tokenizer.decode(tokens[SHORT], skip_special_tokens=False)]
