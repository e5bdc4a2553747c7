#!/usr/bin/env python3
"""Writes vectors.json: hand-made greedy MTP traces and the decisions and statistics they must produce.

Usage: python3 make_vectors.py   (standard library only; writes vectors.json next to this file)

Each case lists the model's answers (first decode, then per round the drafts and the target's greedy
rows v0..vG; a round with no drafts is a plain decode). The `expected` block is computed below by a
small reference of the loop, written independently of the Kotlin one, with these rules
(LiteRT-LM's, reference/litertlm-mtp.md section 4):

- After prefill a first decode gives t at position N = prompt_len.
- Round: if G > 0 and N + G + 1 <= context, draft d1..dG, verify [t, d1..dG] -> v0..vG, accept
  k = longest prefix with d_i == v_{i-1}, emit d1..dk then the bonus v_k, next t = v_k at N + k + 1.
  Otherwise, if N < context, plain decode [t] -> v0, emit v0, N += 1; else stop (context full).
- Output stops after max_tokens tokens (the first token counts; an accepted run is truncated) or at
  a stop token (emitted, nothing after it), even inside an accepted run.
- Statistics count every verify round in full, before truncation: drafted, accepted (sum of k),
  verifies, plain_decodes, draft_acceptance_rate = accepted / drafted, acceptance_rate =
  accepted / (accepted + rounds with k < G), mean_accepted_length = (accepted + verifies) / verifies,
  per_position_acceptance[i] = fraction of verify rounds with k > i; x / 0 = 0.0.
  accepted_per_round has one entry per verify round (plain decodes have none).

The Python runtime (edge_mtp) is meant to regenerate this file with the same schema from real runs.
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


def ratio(a, b):
    return a / b if b else 0.0


def expected(c):
    """Replays the case through the reference loop; checks that the trace is consistent with it."""
    g, context, stop, max_tokens = c["draft_len"], c["context"], set(c["stop_tokens"]), c["max_tokens"]
    rounds = iter(c["rounds"])
    tokens, ks, plain, done = [], [], 0, False

    def emit(run):
        nonlocal done
        for tok in run:
            if done:
                return
            tokens.append(tok)
            done = tok in stop or len(tokens) >= max_tokens

    t, n = c["first_token"], c["prompt_len"]
    emit([t])
    while not done:
        if g > 0 and n + g + 1 <= context:
            r = next(rounds)
            d, v = r["drafts"], r["target_argmax"]
            assert r["position"] == n and len(d) == g and len(v) == g + 1, (c["name"], r)
            k = 0
            while k < g and d[k] == v[k]:
                k += 1
            ks.append(k)
            emit(d[:k] + [v[k]])
            t, n = v[k], n + k + 1
        elif n < context:
            r = next(rounds)
            assert r["position"] == n and r["drafts"] == [] and len(r["target_argmax"]) == 1, (c["name"], r)
            plain += 1
            t, n = r["target_argmax"][0], n + 1
            emit([t])
        else:
            break
    assert next(rounds, None) is None, f"{c['name']}: unused rounds"
    verifies, accepted = len(ks), sum(ks)
    rejected = sum(1 for k in ks if k < g)
    return {
        "tokens": tokens,
        "accepted_per_round": ks,
        "drafted": verifies * g,
        "accepted": accepted,
        "verifies": verifies,
        "plain_decodes": plain,
        "draft_acceptance_rate": ratio(accepted, verifies * g),
        "acceptance_rate": ratio(accepted, accepted + rejected),
        "mean_accepted_length": ratio(accepted + verifies, verifies),
        "per_position_acceptance": [ratio(sum(1 for k in ks if k > i), verifies) for i in range(g)],
    }


def main():
    cases = [dict(c, expected=expected(c)) for c in CASES]
    text = json.dumps({"version": 1, "cases": cases}, indent=1)
    (HERE / "vectors.json").write_text(text + "\n")
    print(f"wrote {len(cases)} cases to vectors.json")


if __name__ == "__main__":
    main()
