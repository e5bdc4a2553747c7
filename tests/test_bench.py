"""bench: acceptance fit, plots and JSON, the model on the demo bundle, and simulated acceptance (the model and the
advice on a fake clock: test_bench_clock.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_mtp.bench import bench, expected_tokens, fit_acceptance, plot, simulate
from edge_mtp.cli import main

from scripted_backend import ScriptedBackend

PROMPTS = [[5, 9, 2, 11, 7], [3, 1, 4, 1, 5, 9, 2, 6]]


def _scripted():
    return ScriptedBackend(context=256, draft_len=3, wrong_step=lambda pos, step: (pos * 7 + step) % 5 == 0)


def test_acceptance_fit_and_expected_tokens():
    assert fit_acceptance([0.8, 0.64, 0.512]) == pytest.approx(0.8)
    assert expected_tokens([0.8, 0.64], 0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.8 ** 3 + 0.8 ** 4)
    assert fit_acceptance([0.0, 0.0]) == 0.0


def test_plot_and_cli_json(tiny_bundle, tmp_path):
    result = bench(_scripted(), PROMPTS, max_tokens=12)
    plot(result, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    path, _ = tiny_bundle
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nabc\n")
    out = CliRunner().invoke(main, ["bench", str(path), "--prompts", str(prompts), "--max-tokens", "8", "--json"])
    assert out.exit_code == 0, out.output[-1000:]
    data = json.loads(out.output[out.output.index("{"):])
    assert data["exported_draft_len"] == 3 and set(data["measured_speedup"]) == {"1", "2", "3"}


def test_simulated_acceptance_is_the_chosen_probability():
    """Scripted pair (a perfect drafter): over ~1500 tokens the verify accepts each draft with probability A.

    The realised acceptance over n Bernoulli trials has standard deviation sqrt(A(1-A)/n), and P(draft i accepted)
    = A^i over R rounds has sqrt(p(1-p)/R); a correct simulation stays within 4 of them (failure odds < 1e-4),
    a drafter consulted one position off would accept almost nothing.
    """
    backend = ScriptedBackend(context=4096, draft_len=3)
    a = 0.6
    sim, = simulate(backend, [[5, 9, 2, 11, 7]], [a], max_tokens=1500, seed=1)
    assert sim.diverged_prompts == 0 and sim.draft_len == 3
    assert sim.judged_drafts > 500
    assert abs(sim.measured_acceptance - a) <= 4 * (a * (1 - a) / sim.judged_drafts) ** 0.5, sim
    expected = 1 + a + a ** 2 + a ** 3
    sd = sum((a ** i * (1 - a ** i) / sim.rounds) ** 0.5 for i in (1, 2, 3))  # sd of a sum <= the sum of the sds
    assert abs(sim.mean_accepted_length - expected) <= 4 * sd, (sim.mean_accepted_length, expected)


def test_simulated_acceptance_on_the_demo_pair(demo_bundle, tmp_path):
    """A = 1: every draft accepted (G+1 tokens per verify); A = 0: none (1); 0.6 within 4 standard deviations."""
    import edge_mtp
    from edge_mtp.util.prompts import DEFAULT_PROMPTS

    model = edge_mtp.load(demo_bundle)
    g = model.contract.draft_len
    prompts = [model.tokenizer.encode(p) for p in DEFAULT_PROMPTS]
    one, zero, mid = simulate(model.backend, prompts, [1.0, 0.0, 0.6], max_tokens=48)
    assert one.diverged_prompts == zero.diverged_prompts == mid.diverged_prompts == 0
    assert one.mean_accepted_length == g + 1 and one.measured_acceptance == 1.0
    assert zero.mean_accepted_length == 1.0 and zero.measured_acceptance == 0.0
    assert one.ms_per_verify > 0 and one.ms_per_draft_step > 0 and one.plain_tokens_per_second > 0
    assert abs(mid.measured_acceptance - 0.6) <= 4 * (0.6 * 0.4 / mid.judged_drafts) ** 0.5, mid

    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("The file\n")
    out = CliRunner().invoke(main, ["bench", str(demo_bundle), "--prompts", str(prompts_file), "--max-tokens", "12",
                                    "--simulate-acceptance", "1", "--json"])
    assert out.exit_code == 0, out.output[-1000:]
    data = json.loads(out.output[out.output.index("{"):])["simulated"]
    assert data["acceptance"] == 1.0 and data["draft_len"] == g and data["mean_accepted_length"] == g + 1
    assert {"plain_tokens_per_second", "mtp_tokens_per_second", "speedup", "predicted_speedup", "ms_per_decode",
            "ms_per_verify", "ms_per_draft_step"} <= set(data)
    text = CliRunner().invoke(main, ["bench", str(demo_bundle), "--prompts", str(prompts_file), "--max-tokens", "8",
                                     "--simulate-acceptance", "0.5"]).output
    assert "SIMULATED acceptance 0.50" in text


class VerifyTie(ScriptedBackend):
    """The verify picks another token than plain decoding after position 20 (as int8 kernels may at a near-tie)."""

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        out = super().run_target(signature, embeddings, per_layer_embeddings, input_pos, mask)
        for row in np.flatnonzero(input_pos == 20) if signature == "verify" else ():
            out["logits"][0, row] = np.roll(out["logits"][0, row], 1)
        return out


def test_simulation_follows_the_verify_past_a_near_tie():
    """At A = 1 every draft must still be accepted although the verify leaves the plain continuation at position 21:
    the continuation is re-recorded from the verify's token on, not compared with a stale one."""
    sim, = simulate(VerifyTie(context=256, draft_len=3), [[5, 9, 2, 11, 7]], [1.0], max_tokens=60)
    assert sim.diverged_prompts == 0 and sim.measured_acceptance == 1.0 and sim.mean_accepted_length == 4.0
