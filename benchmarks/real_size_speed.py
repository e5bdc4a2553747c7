"""MTP speed on one bundle (meant for real-size E2B/E4B), all figures measured in one run on this machine.

Prints: decode / verify(G+1) / draft-step ms per direct call and their ratios (also for an ONNX twin with --onnx);
our loop's plain decode tokens/s against LiteRT-LM's own counter on the same bundle and CPU thread count, and both
runtimes' MTP/plain with the bundle's own drafter (a random drafter gives acceptance ~0: its drafting overhead);
MTP/plain at simulated acceptances (every graph runs, drafts replaced by the true next token with probability A;
see edge_mtp.bench.simulate), measured and predicted by the cost model, with the draft length the model would pick
at each A and the host time per round outside the timed model steps; and the draft length
`edge-mtp bench` recommends for the bundle's own drafter.

    .venv/bin/python -m benchmarks.real_size_speed --bundle E2B.litertlm [--onnx E2B-onnx] [--threads 2]
        [--max-tokens 32] [--rounds 2] [--acceptance 0.5,0.6,0.7,0.8,0.9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.loop_speed import compare_loops, print_costs, print_loops, signature_ms
from edge_mtp.bench import bench, predict, simulate
from edge_mtp.bundle import open_bundle
from edge_mtp.util.prompts import DEFAULT_PROMPTS


def main() -> None:
    """Measure and print the speed figures of one bundle (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a .litertlm bundle with a drafter")
    parser.add_argument("--onnx", type=Path, help="the same pair as an ONNX bundle folder, for its signature costs")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, for our runtime and for LiteRT-LM")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt and configuration")
    parser.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS), help="how many default prompts to use")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the loop comparison (best of)")
    parser.add_argument("--calls", type=int, default=20, help="direct calls per signature")
    parser.add_argument("--acceptance", default="0.5,0.6,0.7,0.8,0.9", help="simulated acceptances, comma-separated")
    args = parser.parse_args()

    from edge_mtp.runtime.backends.litert import LiteRTBackend

    tokenizer = open_bundle(args.bundle).tokenizer
    backend = LiteRTBackend(args.bundle, threads=args.threads)
    c = backend.contract
    if not backend.has_drafter:
        raise SystemExit(f"{args.bundle} has no drafter: MTP speed cannot be measured.")
    prompts = DEFAULT_PROMPTS[:args.prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    print(f"{args.bundle.name}: {c.target.num_layers} layers, hidden {c.target.hidden_size}, context {c.context}, "
          f"G={c.draft_len}; {args.threads} CPU thread(s); {len(prompts)} prompts x {args.max_tokens} tokens")

    costs = {"LiteRT": signature_ms(backend, args.calls)}
    if args.onnx:
        from edge_mtp.runtime.backends.ort import OnnxBackend

        costs["ONNX"] = signature_ms(OnnxBackend(args.onnx, threads=args.threads), args.calls)
    print_costs(costs)

    print("\n-- loops with the bundle's own drafter (ours vs LiteRT-LM, same bundle and thread count)")
    print_loops(compare_loops(args.bundle, backend, prompts, ids, args.max_tokens, args.threads, args.rounds))

    print("\n-- edge-mtp bench (the bundle's own drafter)")
    result = bench(backend, ids, args.max_tokens)
    print(f"drafter acceptance {result.acceptance_fit:.2f}; {result.recommendation}")

    acceptances = [float(a) for a in args.acceptance.split(",")]
    print("\n-- SIMULATED acceptance (drafts replaced by the true next token with probability A; every graph runs)")
    print("   A   MTP/plain measured  predicted  meas/pred  realised A  tokens/verify  best G by the model  host/round")
    for sim in simulate(backend, ids, acceptances, args.max_tokens):
        a = sim.acceptance
        model = predict([a ** i for i in range(1, c.draft_len + 1)], a, result.verify_cost, result.draft_cost)
        best = max(model, key=model.get)
        round_ms = sim.mean_accepted_length / sim.mtp_tokens_per_second * 1000
        host = round_ms - sim.ms_per_verify - c.draft_len * sim.ms_per_draft_step
        print(f"{a:5.2f} {sim.speedup:18.2f}x {sim.predicted_speedup:9.2f}x {sim.speedup / sim.predicted_speedup:10.2f}"
              f" {sim.measured_acceptance:11.2f} {sim.mean_accepted_length:14.2f}   {best} ({model[best]:.2f}x)"
              f"{'':10}{host:6.2f} ms ({host / round_ms:.0%})"
              + (f"  [{sim.diverged_prompts} prompt(s) diverged]" if sim.diverged_prompts else ""))
    print("   (host/round: a round's wall time outside its timed draft steps and verify, i.e. acceptance, argmax,\n"
          "    bookkeeping and emission; the embedder calls and input writes are inside the timed steps)")
    print(f"   (plain {sim.plain_tokens_per_second:.1f} tok/s; ms per decode {sim.ms_per_decode:.2f}, "
          f"per verify {sim.ms_per_verify:.2f}, per draft step {sim.ms_per_draft_step:.2f}, as the loop paid them)")


if __name__ == "__main__":
    main()
