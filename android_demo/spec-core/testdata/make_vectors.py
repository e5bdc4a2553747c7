#!/usr/bin/env python3
"""Writes vectors.json: greedy MTP traces and the decisions and statistics the Python runtime makes on them.

Usage: .venv/bin/python android_demo/spec-core/testdata/make_vectors.py   (from the repository root)

Each case lists the models' answers (first decode, then per round the drafts and the target's greedy rows
v0..vG; a round with no drafts is a plain decode). The `expected` block is what edge_mtp's own draft/verify loop
(edge_mtp.runtime.speculative, the loop every Python backend runs) emits and counts when a ReplayBackend serves
those answers; the Kotlin spec-core must reproduce it decision for decision. tests/test_kotlin_vectors.py fails
when this file and the committed vectors.json disagree.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def case(name, g, max_tokens, context, prompt_len, first, rounds, stop=(1,)):
    return {"name": name, "draft_len": g, "max_tokens": max_tokens, "context": context, "prompt_len": prompt_len,
            "stop_tokens": list(stop), "first_token": first,
            "rounds": [{"position": p, "drafts": d, "target_argmax": v} for p, d, v in rounds]}


CASES = [
    case("full_accept", 3, 9, 64, 4, 10, [
        (4, [11, 12, 13], [11, 12, 13, 14]),
        (8, [15, 16, 17], [15, 16, 17, 18]),
    ]),
    case("zero_accept", 2, 4, 64, 3, 20, [
        (3, [30, 31], [21, 40, 41]),
        (4, [32, 33], [22, 42, 43]),
        (5, [34, 35], [23, 44, 45]),
    ]),
    case("partial_accept", 4, 12, 128, 5, 50, [
        (5, [51, 52, 60, 61], [51, 52, 53, 70, 71]),
        (8, [54, 62, 63, 64], [54, 55, 72, 73, 74]),
        (10, [56, 57, 58, 59], [56, 57, 58, 59, 60]),
        (15, [65, 66, 67, 68], [61, 80, 81, 82, 83]),
    ]),
    case("max_tokens_inside_accepted_run", 3, 6, 64, 2, 7, [
        (2, [8, 9, 10], [8, 9, 10, 11]),
        (6, [12, 13, 14], [12, 13, 14, 15]),
    ]),
    case("stop_token_inside_accepted_run", 3, 50, 64, 3, 30, [
        (3, [31, 32, 33], [31, 32, 34, 35]),
        (6, [36, 1, 37], [36, 1, 37, 38]),
    ], stop=(1, 106)),
    case("stop_token_as_bonus", 2, 50, 64, 3, 40, [
        (3, [41, 42], [41, 106, 43]),
    ], stop=(1, 106)),
    case("context_end_fallback", 3, 50, 12, 4, 90, [
        (4, [91, 92, 93], [91, 92, 93, 94]),
        (8, [95, 96, 97], [95, 99, 98, 97]),
        (10, [], [100]),
        (11, [], [101]),
    ]),
    case("first_token_is_stop", 2, 10, 32, 3, 1, []),
    case("mtp_off_plain_decode", 0, 4, 32, 2, 5, [
        (2, [], [6]),
        (3, [], [7]),
        (4, [], [8]),
    ]),
]


def expected(c):
    """Run edge_mtp's loop over the case's answers and report what it emitted and counted."""
    from edge_mtp.runtime.backends.replay import ReplayBackend, ReplayRound
    from edge_mtp.runtime.speculative import generate_tokens

    g = c["draft_len"]
    backend = ReplayBackend(c["first_token"], [ReplayRound(**r) for r in c["rounds"]], c["context"], g)
    prompt = [3] * c["prompt_len"]
    tokens, stats = generate_tokens(backend, prompt, max_tokens=c["max_tokens"], mtp=g > 0,
                                    stop_tokens=c["stop_tokens"])
    assert not backend.script, f"{c['name']}: unused rounds"
    s = stats.to_dict()
    keys = ("accepted_per_round", "drafted", "accepted", "verifies", "plain_decodes", "draft_acceptance_rate",
            "acceptance_rate", "mean_accepted_length", "per_position_acceptance")
    out = {"tokens": tokens, **{k: s[k] for k in keys}}
    if g == 0:
        out["per_position_acceptance"] = []
    return out


def render():
    """The vectors.json text for CASES."""
    cases = [dict(c, expected=expected(c)) for c in CASES]
    return json.dumps({"version": 1, "cases": cases}, indent=1) + "\n"


def main():
    (HERE / "vectors.json").write_text(render())
    print(f"wrote {len(CASES)} cases to vectors.json")


if __name__ == "__main__":
    main()
