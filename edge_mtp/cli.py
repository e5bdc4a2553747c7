"""edge-mtp command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import gc
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from .demo import default_bundle, default_pair
from .export.options import (COMMAND_RECIPE, DEFAULT_CONTEXT, DEFAULT_DRAFT_LEN, DEFAULT_KV_CACHE, DEFAULT_OUT,
                             DEFAULT_PREFILL, FORMATS, KV_CACHES, LITERT, ONNX, check_export_options,
                             export_assistant, parse_prefill)
from .util.atomic import check_output, interrupt_on_sigterm
from .util.errors import EdgeMtpError
from .util.prompts import DEFAULT_PROMPTS, read_prompts
from .util.quiet import native_output_captured, verbose_requested


SEED = click.IntRange(0, 2**32 - 1)  # what every random generator we seed accepts


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _say(message: str) -> None:
    click.echo(message, err=True)


def _options(*options):
    """Apply click options in the order listed."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


class _Group(click.Group):
    """Keeps native-library chatter off the terminal (unless --verbose) and turns EdgeMtpError, and click's own
    usage errors, into one `error:` line on stderr and exit 2, never a traceback; that line is always the last one."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        interrupt_on_sigterm()
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            _fail(e.format_message() + (f" (see '{e.ctx.command_path} --help')" if e.ctx else ""), e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            _fail("aborted.", 1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        with native_output_captured(ctx.params.get("verbose") or verbose_requested()):
            try:
                return super().invoke(ctx)
            except EdgeMtpError as e:
                message = str(e)
            gc.collect()  # native objects the failed command held say goodbye now, while their output is captured
        _fail(message)


@click.group(cls=_Group)
@click.version_option(package_name="edge-mtp")
@click.option("--verbose", is_flag=True, help="Show the native libraries' own log lines (also: EDGE_MTP_VERBOSE=1).")
def main(verbose: bool) -> None:
    """Gemma 4 + MTP assistant -> phone-ready LiteRT-LM / ONNX bundles, validated and benchmarked."""


@main.command()
@click.option("--preset", default="tiny", show_default=True, help="e2b, e4b, tiny, tiny-mqa or wide.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Writes OUT/target and OUT/assistant.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default=None, help="Default: the preset's.")
@click.option("--multimodal-layout", is_flag=True, help="Target in the gemma4 wrapper layout (model.language_model.*).")
@click.option("--shard-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="MiB per safetensors shard.")
def synth(preset: str, out: Path, seed: int, dtype: str | None, multimodal_layout: bool, shard_size: int) -> None:
    """Write a random-weight target and its assistant in the exact Hugging Face layout."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from .checkpoint.synth import write_pair

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=not sys.stderr.isatty(), console=None) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"writing {what}", total=total)
            bar.update(tasks[what], completed=done)

        target = write_pair(out, preset, seed, dtype and {"bf16": "bfloat16", "fp32": "float32"}[dtype],
                            multimodal_layout, shard_size << 20, progress)
    click.echo(f"wrote {out / 'target'} and {out / 'assistant'} ({preset}, {target.dtype})")


@main.command()
@click.option("--target", "target_dir", help="Target checkpoint directory, cached HF repo id, or LoRA adapter folder (default: demo pair).")
@click.option("--assistant", "assistant_dir", help="Assistant checkpoint directory or cached HF repo id.")
@click.option("--no-assistant", is_flag=True, help="Export the target alone (no MTP drafter).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=LITERT, show_default=True,
              help="litert: one .litertlm file; onnx: a bundle folder (graphs, tokenizer, manifest.json).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help=f"A .litertlm file (default {DEFAULT_OUT[LITERT]}) or, with --format onnx, a folder "
                   f"(default {DEFAULT_OUT[ONNX]}).")
@click.option("--draft-len", default=DEFAULT_DRAFT_LEN, show_default=True,
              help="Draft tokens per verify (verify takes G+1).")
@click.option("--context", default=DEFAULT_CONTEXT, show_default=True, help="KV cache length C (max tokens on device).")
@click.option("--prefill", default=",".join(map(str, DEFAULT_PREFILL)), show_default=True,
              help="Prefill signature lengths.")
@click.option("--quant", default=COMMAND_RECIPE, show_default=True,
              help="auto (int4 from 1 B parameters, int8 below), fp32, fp16, int8, int4 (channelwise in LiteRT, "
                   "blocks of 32 in ONNX), int4-b32, int4-b64, int4-b128 or mixed; the bundle records what it cost.")
@click.option("--allow-template-mismatch", is_flag=True,
              help="Export even if LiteRT-LM cannot render the chat template as transformers does (recorded).")
@click.option("--gpu", is_flag=True,
              help="Let LiteRT-LM's GPU executor draft too: the target updates its KV cache in place (it takes "
                   "param_tensor); the CPU executor runs such a bundle as well (README, GPU-delegable graphs).")
@click.option("--full-sliding-cache", is_flag=True,
              help="Give sliding-window layers a cache of the whole context instead of a ring of about the window "
                   "(LiteRT; ONNX and --gpu bundles always have whole caches).")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default=DEFAULT_KV_CACHE, show_default=True,
              help="The KV cache's type: int8 quarters its memory, at the cost docs/quantization.md reports "
                   "(LiteRT bundles, not with --gpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def export(target_dir: str | None, assistant_dir: str | None, no_assistant: bool, fmt: str, out: Path | None,
           draft_len: int, context: int, prefill: str, quant: str, allow_template_mismatch: bool, gpu: bool,
           full_sliding_cache: bool, kv_cache: str, as_json: bool) -> None:
    """Export a target and its MTP assistant to one .litertlm bundle, checking every graph against PyTorch."""
    from .export.pipeline import export_bundle

    out = out or DEFAULT_OUT[fmt]
    lengths = parse_prefill(prefill)
    check_export_options(out, fmt, draft_len, context, lengths, quant, in_place_cache=gpu, kv_cache=kv_cache)
    if target_dir is None:
        target_dir, demo_assistant = default_pair(_say)
        assistant_dir = assistant_dir or demo_assistant
    assistant_dir = export_assistant(assistant_dir, no_assistant)
    with export_progress() as (stage, progress):
        summary = export_bundle(fmt, target_dir, assistant_dir, out, draft_len=draft_len, context=context,
                                prefill=lengths, quant=quant, on_stage=stage, on_progress=progress,
                                allow_template_mismatch=allow_template_mismatch, in_place_cache=gpu,
                                sliding_ring=not full_sliding_cache, kv_cache=kv_cache)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    click.echo(f"wrote {summary.out} ({summary.bytes / 2**20:.1f} MiB) in {summary.wall_seconds:.0f} s, "
               f"peak memory {summary.peak_rss_mib:.0f} MiB")
    for section in summary.sections:
        click.echo(f"  {section['type']:<18} {section['model_type'] or '':<28} {section['bytes']:>12,} bytes")
    for model, sigs in summary.signatures.items():
        click.echo(f"  {model:<20} {', '.join(sigs)}")
    worst = max(summary.checks.values(), default=0.0)
    click.echo(f"  every converted piece vs PyTorch: max rel. error {worst:.1e}")
    if summary.quantization:
        q = summary.quantization
        line = (f"  bundle vs {q.get('reference', 'fp32')} ({summary.recipe}): logit rel. error "
                f"{q['logit_relative_error']:.3g}, top-1 agreement {q['top1_agreement']:.3f}")
        if q.get("drafter_top1_agreement") is not None:
            line += f", drafter top-1 agreement {q['drafter_top1_agreement']:.3f}"
        click.echo(line)


@contextmanager
def export_progress():
    """(on_stage, on_progress) callbacks drawing one progress bar with an ETA over the export's pieces on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True, log_path=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("exporting", total=None)

        def stage(text: str) -> None:
            bar.update(task, description=text)
            console.log(text)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield stage, progress


_LOOP_OPTIONS = (  # what `run` and `chat` share: bundle, backend, drafting, sampling
    click.argument("bundle", required=False, type=click.Path(path_type=Path)),
    click.option("--backend", type=click.Choice(["litert", "onnx", "torch"]), default=None,
                 help="Default: the bundle's own format."),
    click.option("--accelerator", type=click.Choice(["cpu", "gpu", "npu", "xnnpack", "nnapi", "coreml", "qnn"]),
                 default="cpu", show_default=True,
                 help="LiteRT: cpu/gpu/npu; ONNX Runtime: cpu/xnnpack/nnapi/coreml/qnn."),
    click.option("--draft-len", type=click.IntRange(min=1), default=None, help="Default: the bundle's."),
    click.option("--no-mtp", is_flag=True, help="Plain decoding (no drafter)."),
    click.option("--temperature", default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-k", default=0, show_default=True),
    click.option("--top-p", default=1.0, show_default=True),
    click.option("--seed", type=SEED, default=None),
    click.option("--no-verify", is_flag=True,
                 help="Skip checking the bundle against its recorded sha256 (faster start)."),
)


def gpu_delegation(model) -> dict | None:
    """On LiteRT's GPU accelerator: [ops on the GPU, all ops] per model and signature; None elsewhere."""
    return getattr(model.backend, "delegation", None) or None


@main.command()
@_options(*_LOOP_OPTIONS)
@click.option("--prompt", default="Once upon a time", show_default=True)
@click.option("--prompt-ids", default=None, help="Comma-separated token ids instead of --prompt.")
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, stats.")
def run(bundle: Path | None, backend: str | None, accelerator: str, prompt: str, prompt_ids: str | None,
        max_tokens: int, draft_len: int | None, no_mtp: bool, temperature: float, top_k: int, top_p: float,
        seed: int | None, chat: bool, as_json: bool, no_verify: bool) -> None:
    """Generate with the on-device draft/verify loop; streams text, then prints the acceptance statistics."""
    from .runtime.api import check_generation, load

    check_generation(max_tokens, temperature, top_k, top_p)
    source: str | list[int] = prompt
    if prompt_ids is not None:
        try:
            source = [int(x) for x in prompt_ids.split(",")]
        except ValueError:
            raise EdgeMtpError(f"--prompt-ids takes comma-separated integers, not '{prompt_ids}'.") from None
        if min(source) < 0:
            raise EdgeMtpError(f"--prompt-ids holds the negative id {min(source)}; token ids start at 0.")
    model = load(bundle or default_bundle(_say), backend=backend, accelerator=accelerator, verify=not no_verify)
    tokens: list[int] = []
    shown = ""
    for token in model.generate(source, max_tokens=max_tokens, draft_len=draft_len, mtp=not no_mtp,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=chat):
        tokens.append(token)
        if not as_json:
            text = model.tokenizer.reply_text(tokens)
            click.echo(text[len(shown):], nl=False)
            shown = text
    stats = model.last_stats.to_dict()
    if gpu_delegation(model):
        stats["gpu_delegated_ops"] = gpu_delegation(model)
    if as_json:
        stop = tokens[-1] if tokens and tokens[-1] in model.tokenizer.stop_tokens else None
        click.echo(json.dumps({"tokens": tokens, "text": model.tokenizer.reply_text(tokens), "stop_token": stop,
                               "stats": stats}))
        return
    click.echo()
    click.echo(f"[{len(tokens)} tokens, {stats['tokens_per_second']:.1f} tok/s, TTFT {stats['time_to_first_token_ms']:.0f} ms"
               + ("" if no_mtp else f", acceptance {stats['acceptance_rate']:.2f}, {stats['mean_accepted_length']:.2f} "
                  f"tokens/verify, drafted {stats['drafted']}, accepted {stats['accepted']}") + "]", err=True)


CHAT_HELP = "/stats: the last reply's acceptance and speed; /reset: new conversation; Ctrl-D: leave."


@main.command()
@_options(*_LOOP_OPTIONS)
@click.option("--max-tokens", default=256, show_default=True, help="Most tokens per reply.")
def chat(bundle: Path | None, backend: str | None, accelerator: str, max_tokens: int, draft_len: int | None,
         no_mtp: bool, temperature: float, top_k: int, top_p: float, seed: int | None, no_verify: bool) -> None:
    """Chat with a bundle on the draft/verify loop, the KV cache kept across turns.

    /stats: the last reply's acceptance and speed; /reset: new conversation; Ctrl-D: leave.
    """
    from .runtime.api import check_generation, load
    from .runtime.chat import ChatSession, TurnOptions
    from .runtime.sampling import SamplingConfig

    check_generation(max_tokens, temperature, top_k, top_p)
    model = load(bundle or default_bundle(_say), backend=backend, accelerator=accelerator, verify=not no_verify)
    session = ChatSession(model, TurnOptions(max_tokens, draft_len, not no_mtp,
                                             SamplingConfig(temperature, top_k, top_p, seed)))
    click.echo(CHAT_HELP, err=True)
    while True:
        click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            click.echo()
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            click.echo("[new conversation]", err=True)
        elif text.strip() == "/stats":
            click.echo(_chat_stats(session), err=True)
        elif text.strip().startswith("/"):
            click.echo(f"unknown command {text.strip()}; {CHAT_HELP}", err=True)
        elif text.strip():
            _chat_turn(session, text)


def _chat_turn(session, text: str) -> None:
    """Stream one reply (stop token hidden); a turn the bundle cannot take is reported and the session goes on."""
    tokens, shown = [], ""
    try:
        for token in session.send(text):
            tokens.append(token)
            shown_now = session.model.tokenizer.reply_text(tokens)
            click.echo(shown_now[len(shown):], nl=False)
            shown = shown_now
    except EdgeMtpError as e:
        click.echo(f"error: {e}", err=True)
        return
    click.echo()


def _chat_stats(session) -> str:
    """The last reply's statistics in one line."""
    st = session.last_stats
    if not st.generated:
        return "[no reply yet]"
    line = (f"[{st.generated} tokens, {st.tokens_per_second:.1f} tok/s, TTFT {st.time_to_first_token_ms:.0f} ms, "
            f"prompt {st.prompt_tokens} tokens of which {session.reused} reused from the cache")
    if st.verifies:
        line += (f", acceptance {st.acceptance_rate:.2f}, {st.mean_accepted_length:.2f} tokens/verify, drafted "
                 f"{st.drafted}, accepted {st.accepted}")
    return line + "]"


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", "target_dir", help="Original target checkpoint or LoRA adapter folder (default: the one recorded at export).")
@click.option("--assistant", "assistant_dir", help="Original assistant checkpoint (default: recorded at export).")
@click.option("--prompts", type=click.Path(exists=True, path_type=Path), help="Text file, one prompt per line.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=24, show_default=True,
              help="Greedy tokens generated per prompt.")
@click.option("--max-rel-error", type=click.FloatRange(min=0), default=None,
              help="fp32 bundles (default 1e-3); a quantized bundle is held to what its recipe cost at export.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None, help="fp32 bundles (default 0.99).")
@click.option("--min-acceptance-ratio", type=click.FloatRange(min=0), default=None,
              help="Default 0.8 of the PyTorch drafter's.")
@click.option("--no-litert-lm", is_flag=True, help="Skip running Google's LiteRT-LM runtime.")
@click.option("--weights-only", is_flag=True,
              help="Only find every checkpoint tensor byte for byte in the bundle: fast, exact, no graphs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write a markdown report.")
def validate(bundle: Path, target_dir: str | None, assistant_dir: str | None, prompts: Path | None, max_tokens: int,
             max_rel_error: float | None, min_top1: float | None, min_acceptance_ratio: float | None,
             no_litert_lm: bool, weights_only: bool, as_json: bool, report_path: Path | None) -> None:
    """Prove a bundle against its original checkpoints at any recipe; exit 0 pass, 1 fail, 2 unusable input."""
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from .checks.validate import Thresholds
    from .checks.validate import validate as run_validation

    limits = Thresholds()
    for name, value in (("max_relative_error", max_rel_error), ("min_top1_agreement", min_top1),
                        ("min_acceptance_ratio", min_acceptance_ratio)):
        if value is not None:
            limits = replace(limits, **{name: value})
    texts = read_prompts(prompts)
    if report_path is not None:
        check_output(report_path, folder=False, option="--report")
    console = Console(stderr=True)
    with console.status("validating") as status:
        report = run_validation(bundle, target_dir, assistant_dir, texts, max_tokens, limits,
                                use_litert_lm=not no_litert_lm, on_stage=status.update, weights_only=weights_only)
    if report_path:
        report_path.write_text(report.markdown())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title=f"validate {bundle}")
        for column in ("check", "subject", "result", "detail", "reference", "criterion"):
            table.add_column(column)
        for c in report.checks:
            table.add_row(c.kind, c.subject, "[green]pass" if c.passed else "[red]FAIL", c.detail, c.reference,
                          c.criterion)
        Console().print(table)
        click.echo("PASS" if report.passed else "FAIL")
    sys.exit(0 if report.passed else 1)


@main.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["litert", "onnx", "torch"]), default=None)
@click.option("--accelerator", type=click.Choice(["cpu", "gpu", "npu"]), default="cpu", show_default=True)
@click.option("--prompts", type=click.Path(exists=True, path_type=Path), help="Text file, one prompt per line.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=48, show_default=True,
              help="Tokens generated per prompt and configuration.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write acceptance / speed-up plots (PNG).")
@click.option("--simulate-acceptance", type=click.FloatRange(0.0, 1.0), default=None,
              help="Also run MTP with each draft replaced by the true next token with this probability (all graphs run).")
def bench(bundle: Path | None, backend: str | None, accelerator: str, prompts: Path | None, max_tokens: int,
          as_json: bool, plot_path: Path | None, simulate_acceptance: float | None) -> None:
    """Measure decode, verify and draft costs and acceptance; predict and measure speed-up; recommend a draft length."""
    from .bench import bench as run_bench
    from .bench import plot
    from .runtime.api import load

    texts = read_prompts(prompts) or DEFAULT_PROMPTS
    if plot_path is not None:
        check_output(plot_path, folder=False, option="--plot")
    model = load(bundle or default_bundle(_say), backend=backend, accelerator=accelerator)
    result = run_bench(model.backend, [model.tokenizer.encode(t) for t in texts], max_tokens, simulate_acceptance)
    if plot_path:
        plot(result, str(plot_path))
    delegation = gpu_delegation(model)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), **({"gpu_delegated_ops": delegation} if delegation else {})},
                              indent=2))
        return
    if delegation:
        click.echo("GPU: " + "; ".join(f"{name} {sig} {on}/{total} ops" for name, sigs in delegation.items()
                                       for sig, (on, total) in sigs.items()))
    base = result.baseline
    click.echo(f"plain decoding: {base.tokens_per_second:.1f} tok/s, {base.ms_per_decode:.2f} ms per decode step")
    if result.mtp:
        click.echo(f"drafter step: {result.draft_cost:.2f} x decode; per-token acceptance a = {result.acceptance_fit:.2f}; "
                   f"acceptance by position: {', '.join(f'{p:.2f}' for p in result.mtp[-1].per_position_acceptance)}")
        click.echo(" γ   verify/decode   predicted   measured")
        for g, predicted in result.predicted_speedup.items():
            measured = result.measured_speedup.get(g)
            click.echo(f"{g:2d}   {result.verify_cost[g]:13.2f}   {predicted:8.2f}x   "
                       + (f"{measured:7.2f}x" if measured is not None else "  (needs re-export)"))
    click.echo(result.recommendation)
    sim = result.simulated
    if sim:
        click.echo(f"SIMULATED acceptance {sim.acceptance:.2f} (not the drafter's own: each draft replaced by the true "
                   f"next token with this probability; every graph still runs), draft length {sim.draft_len}:")
        click.echo(f"  plain {sim.plain_tokens_per_second:.1f} tok/s, MTP {sim.mtp_tokens_per_second:.1f} tok/s: "
                   f"{sim.speedup:.2f}x measured, {sim.predicted_speedup:.2f}x predicted; realised acceptance "
                   f"{sim.measured_acceptance:.2f}, {sim.mean_accepted_length:.2f} tokens per verify")
        click.echo(f"  ms per decode {sim.ms_per_decode:.2f}, per verify {sim.ms_per_verify:.2f}, "
                   f"per draft step {sim.ms_per_draft_step:.2f}")
        if sim.diverged_prompts:
            click.echo(f"  {sim.diverged_prompts} prompt(s) left the recorded plain continuation (a near-tie between "
                       "verify and decode kernels), which lowers the realised acceptance")


_PREPARE_OPTIONS = (
    click.option("--target", "target_dir", help="Target checkpoint directory, cached HF repo id, or a LoRA adapter "
                 "directory (adapter_config.json naming its base) merged at load."),
    click.option("--data", multiple=True, help="Text, JSONL or Parquet files (records with 'text' or 'messages'), "
                 "folders of them, or a dataset repo id in the local Hugging Face cache."),
    click.option("--prompts", type=click.Path(exists=True), help="File of prompts, one per line."),
    click.option("--sequences", "num_sequences", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Training sequences to prepare (a multiple of the process count)."),
    click.option("--eval-sequences", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Held-out sequences."),
    click.option("--seq-len", type=click.IntRange(min=2), default=64, show_default=True),
    click.option("--prompt-len", type=click.IntRange(min=2), default=16, show_default=True,
                 help="Prompt tokens the target continues (text data)."),
    click.option("--top-k", type=click.IntRange(min=1), default=64, show_default=True,
                 help="Target logits kept per position for the KL term."),
    click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="0: greedy continuations; above: sampled ones."),
)
_TRAIN_OPTIONS = (
    click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True),
    click.option("--draft-len", type=click.IntRange(1, 16), default=3, show_default=True,
                 help="Draft steps unrolled in training."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True),
    click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Sequences per optimizer step, all processes together."),
    click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Micro-batches per optimizer step."),
    click.option("--resume", is_flag=True, help="Continue from OUT/distill_state.pt."),
    click.option("--init", "init_from", help="Start from an existing assistant (e.g. Google's, for a fine-tuned target)."),
    click.option("--eval-every", type=click.IntRange(min=1), default=None,
                 help="Held-out acceptance every N steps into OUT/distill_log.jsonl (default: --save-every)."),
    click.option("--save-every", type=click.IntRange(min=1), default=50, show_default=True),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
)
_COMMON_OPTIONS = (
    click.option("--seed", type=SEED, default=0, show_default=True),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
                 help="Accelerators run the target in bf16 and the drafter under bf16 autocast."),
)


@contextmanager
def _distill_progress():
    """Rich bars for both phases: (prepare callback, train callback); tokens/s and ETA on each."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True) as bar:
        tasks: dict[str, tuple[int, float]] = {}

        def task(name: str, total: int):
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, info=""), time.perf_counter()
            return tasks[name]

        def prepared(done: int, total: int) -> None:
            t, start = task("preparing", total)
            bar.update(t, completed=done, total=total, info=f"{done / (time.perf_counter() - start):.1f} seq/s")

        def trained(tokens_per_step: int):
            def update(step: int, total: int, loss: float, acceptance: float) -> None:
                t, start = task("training", total)
                first = tasks.setdefault("first step", (step - 1, start))[0]
                rate = (step - first) * tokens_per_step / (time.perf_counter() - start)
                bar.update(t, completed=step, total=total,
                           info=f"loss {loss:.3f}  acceptance {acceptance:.2f}  {rate:,.0f} tok/s")
            return update

        yield prepared, trained


def _report(result, out_dir: Path, as_json: bool) -> None:
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 speaks for all
        return
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"wrote {out_dir}: held-out acceptance {result.acceptance_before:.2f} -> {result.acceptance_after:.2f}, "
               f"tokens per verify {result.mean_accepted_length_before:.2f} -> {result.mean_accepted_length_after:.2f} "
               f"({result.seconds:.0f} s)")


@main.group(invoke_without_command=True)
@_options(*_PREPARE_OPTIONS, *_TRAIN_OPTIONS, *_COMMON_OPTIONS)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Assistant checkpoint to write.")
@click.option("--shards", "shards_dir", type=click.Path(path_type=Path), help="Where the shards go (default OUT/shards).")
@click.pass_context
def distill(ctx: click.Context, target_dir: str | None, out_dir: Path | None, shards_dir: Path | None,
            data: tuple[str, ...], prompts: str | None, seq_len: int, as_json: bool, **options) -> None:
    """Train an MTP assistant for a target from the target's own activations and KV cache.

    Without a subcommand: `prepare` then `train`, the shards kept in OUT/shards. Under torchrun
    (--nproc-per-node N) both phases run data-parallel."""
    if ctx.invoked_subcommand is not None:
        return
    if not target_dir or out_dir is None:
        raise click.UsageError("distill needs --target and --out (or a subcommand: prepare, train)")
    from .distill import distill as run_distill

    check_output(out_dir, folder=True)
    num_sequences, eval_sequences = options.pop("num_sequences"), options.pop("eval_sequences")
    with _distill_progress() as (prepared, trained):
        result = run_distill(target_dir, out_dir, data=list(data) or None, prompts=prompts, seq_len=seq_len,
                             num_sequences=num_sequences, eval_prompts=eval_sequences, shards_dir=shards_dir,
                             progress=trained(options["batch"] * seq_len), prepare_progress=prepared, **options)
    _report(result, out_dir, as_json)


@distill.command("prepare")
@_options(*_PREPARE_OPTIONS, *_COMMON_OPTIONS)
@click.option("--shards", "shards_dir", type=click.Path(path_type=Path), required=True, help="Folder to write.")
def distill_prepare(target_dir: str | None, shards_dir: Path, data: tuple[str, ...], **options) -> None:
    """Run the target once over the data and write shards (tokens, activations, store-layer KV rows, top-k logits)."""
    from .distill import prepare

    if not target_dir:
        raise click.UsageError("distill prepare needs --target")
    check_output(shards_dir, folder=True, option="--shards")
    with _distill_progress() as (prepared, _):
        index = prepare(target_dir, shards_dir, data=list(data) or None, progress=prepared, **options)
    click.echo(f"wrote {shards_dir}: {index['train_sequences']} + {index['eval_sequences']} held-out sequences of "
               f"{index['seq_len']} tokens ({index['continuation']}), {index['bytes_per_token']:,} bytes per token")


@distill.command("train")
@_options(*_TRAIN_OPTIONS, *_COMMON_OPTIONS)
@click.option("--shards", "shards_dir", type=click.Path(path_type=Path), required=True, help="Prepared shards.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Assistant checkpoint to write.")
def distill_train(shards_dir: Path, out_dir: Path, as_json: bool, **options) -> None:
    """Train the assistant from prepared shards; the target is not loaded."""
    from .distill import train
    from .distill.shards import ShardSet

    check_output(out_dir, folder=True)
    seq_len = ShardSet.open(shards_dir).index["seq_len"]
    with _distill_progress() as (_, trained):
        result = train(shards_dir, out_dir, progress=trained(options["batch"] * seq_len), **options)
    _report(result, out_dir, as_json)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New bundle folder.")
@click.option("--quant", required=True, help="fp16, int8, int4[-b64|-b128] or mixed.")
def quantize(bundle: Path, out: Path, quant: str) -> None:
    """Quantize a finished fp32 ONNX bundle folder into a new folder (no re-export), with its quantization report."""
    from .export.onnx_requantize import quantize_onnx_bundle

    with export_progress() as (stage, progress):
        q = quantize_onnx_bundle(bundle, out, quant, on_stage=stage, on_progress=progress)["quantization_report"]
    click.echo(json.dumps({k: v for k, v in q.items() if k != "prompt_token_ids"}, indent=2))


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--gpu-check", is_flag=True, help="A .litertlm: list the ops LiteRT's GPU delegate would refuse, per signature.")
@click.option("--no-verify", is_flag=True, help="Skip checking a bundle's sections against their recorded sha256.")
def inspect(path: str, as_json: bool, gpu_check: bool, no_verify: bool) -> None:
    """Describe a checkpoint directory (geometry, parameters, KV sharing) or a .litertlm bundle."""
    from .checks.inspect import describe_bundle, describe_checkpoint

    if gpu_check:
        from .runtime.gpu_check import check_bundle, describe, report_dict

        reports = check_bundle(Path(path))
        click.echo(json.dumps(report_dict(reports), indent=2) if as_json else describe(reports))
        return
    if path.endswith(".litertlm"):
        info = describe_bundle(Path(path), verify=not no_verify)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        click.echo(f"bundle {info['path']} (LiteRT-LM format {info['version']}, {info['bytes']:,} bytes), "
                   f"speculative decoding: {'yes' if info['supports_mtp'] else 'no'}")
        for section in info["sections"]:
            click.echo(f"  {section['type']:<18} {section.get('model_type') or '':<28} {section['bytes']:>12,} bytes")
            for sig, io in section.get("signatures", {}).items():
                click.echo(f"    {sig}")
                for kind in ("inputs", "outputs"):
                    click.echo(f"      {kind}: " + ", ".join(f"{t['name']}{t['shape']}:{t['dtype']}" for t in io[kind]))
        return
    info = describe_checkpoint(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    geo = info["geometry"]
    click.echo(f"{info['kind']}: {info['path']}")
    click.echo(f"  parameters: {info['parameters']:,}")
    click.echo(f"  hidden {geo['hidden_size']}, layers {len(geo['layer_types'])}, heads {geo['num_heads']}/"
               f"{geo['num_kv_heads']}, head dim {geo['head_dim']}/{geo['global_head_dim']}, "
               f"window {geo['sliding_window']}, vocab {geo['vocab_size']}, dtype {geo['dtype']}")
    if info["kind"] == "target":
        click.echo(f"  parameters without the PLE table: {info['parameters_without_ple_table']:,}")
        click.echo(f"  KV store layers: {info['kv_store_layers']}; cache-owning layers: {info['kv_layers']}")
        click.echo(f"  KV bytes per token (bf16): {info['kv_bytes_per_token_bf16']:,}")
    else:
        click.echo(f"  backbone width {geo['backbone_hidden_size']}, centroid head "
                   f"{'on' if geo['use_ordered_embeddings'] else 'off'} ({geo['num_centroids']} / top "
                   f"{geo['centroid_top_k']}), draft length {geo['num_assistant_tokens']}")


if __name__ == "__main__":
    main()
