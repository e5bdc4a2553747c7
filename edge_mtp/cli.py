"""edge-mtp command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import EdgeMtpError


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns EdgeMtpError into one line on stderr and exit 2 (bad input), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeMtpError as e:
            _fail(str(e))


@click.group(cls=_Group)
@click.version_option(package_name="edge-mtp")
def main() -> None:
    """Gemma 4 + MTP assistant -> phone-ready LiteRT-LM / ONNX bundles, validated and benchmarked."""


@main.command()
@click.option("--preset", default="tiny", show_default=True, help="e2b, e4b, tiny, tiny-mqa or wide.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Writes OUT/target and OUT/assistant.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default=None, help="Default: the preset's.")
@click.option("--multimodal-layout", is_flag=True, help="Target in the gemma4 wrapper layout (model.language_model.*).")
@click.option("--shard-size", default=2048, show_default=True, help="MiB per safetensors shard.")
def synth(preset: str, out: Path, seed: int, dtype: str | None, multimodal_layout: bool, shard_size: int) -> None:
    """Write a random-weight target and its assistant in the exact Hugging Face layout."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from .layout import drafter_tensors, target_tensors
    from .spec import preset_pair, with_dtype
    from .synth import total_bytes, write_drafter, write_target

    target, drafter = preset_pair(preset)
    if dtype:
        name = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
        target, drafter = with_dtype(target, name), with_dtype(drafter, name)
    shard = shard_size << 20
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=not sys.stderr.isatty(), console=None) as bar:
        for label, spec, entries, write in (
                ("target", target, target_tensors(target),
                 lambda p: write_target(out / "target", target, seed, multimodal_layout, shard, p)),
                ("assistant", drafter, drafter_tensors(drafter),
                 lambda p: write_drafter(out / "assistant", drafter, target, seed + 1, shard, p))):
            task = bar.add_task(f"writing {label}", total=total_bytes(spec, entries))
            write(lambda done, task=task: bar.update(task, completed=done))
    click.echo(f"wrote {out / 'target'} and {out / 'assistant'} ({preset}, {target.dtype})")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: str, as_json: bool) -> None:
    """Describe a checkpoint directory (geometry, parameters, KV sharing)."""
    from .inspect_checkpoint import describe_checkpoint

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
