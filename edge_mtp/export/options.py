"""Every export default and option check, in one place: `edge-mtp export` / `quantize` and the library functions
(export_litert, export_onnx, quantize_onnx_bundle) apply the same checks, each a cheap one-sentence refusal that
runs before any model is loaded or converted.

Recipe names (shared by both formats where they mean the same thing):
  fp32        no quantization
  fp16        fp16 weights, fp32 compute
  int8        channelwise int8 weights, dynamic int8 activations
  int4        4-bit weights, dynamic int8 activations: channelwise in LiteRT (export/quantize.py, INT4_LAYOUT),
              blocks of 32 in ONNX; int4-b32 / int4-b64 / int4-b128 are blockwise 4-bit (one scale per block of the
              row: less rounding error, far slower verify and prefill on LiteRT's CPU)
  mixed       4-bit for the embedding tables and the target, 8-bit for the drafter and for any component whose
              4-bit error exceeds export.driver.MIXED_SENSITIVITY
  auto        int4 from AUTO_INT4_PARAMETERS target parameters (E2B, E4B), int8 below
  int8-kv     refused with a pointer to --kv-cache: the KV cache's type is an option of its own

KV caches (--kv-cache): float32, or int8 (model/kv_quant.py: static scales from the checkpoint's k_norm weights,
quantized and dequantized inside the graphs; LiteRT bundles without --gpu).
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.spec import TargetSpec
from ..util.atomic import check_output, writable_parent
from ..util.errors import EdgeMtpError

LITERT, ONNX = "litert", "onnx"
FORMATS = (LITERT, ONNX)
DEFAULT_OUT = {LITERT: Path("model.litertlm"), ONNX: Path("model-onnx")}
DEFAULT_DRAFT_LEN = 3
DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL = (32, 128)
DEMO_CONTEXT = 1024  # the demo bundle `run`, `chat` and `bench` export on first use

RECIPES = ("fp32", "fp16", "int8", "int4", "int4-b32", "int4-b64", "int4-b128", "mixed")
AUTO = "auto"
AUTO_INT4_PARAMETERS = 1_000_000_000  # E2B in int8 is a 4.8 GiB phone bundle; int4 2.45 GiB
# The command asks for what a phone wants; the library keeps the exact numerics a caller measures against.
COMMAND_RECIPE = AUTO
DEFAULT_RECIPE = "fp32"
KV_CACHES = ("float32", "int8")
DEFAULT_KV_CACHE = "float32"
KV_RECIPES = ("int8-kv",)
INT8_KV_REASON = ("Recipe 'int8-kv' is not a weight recipe: an int8 KV cache is chosen with --kv-cache int8 "
                  "(LiteRT bundles), beside any of the weight recipes " + ", ".join(RECIPES) + ".")


def check_recipe(name: str) -> None:
    """Refuse an unknown (or not yet available) recipe before any conversion work."""
    if name == AUTO:
        return
    if name in KV_RECIPES:
        raise EdgeMtpError(INT8_KV_REASON)
    if name not in RECIPES:
        raise EdgeMtpError(f"Unknown quantization recipe '{name}'; choose one of {AUTO}, {', '.join(RECIPES)}.")


def resolve_recipe(name: str, spec: TargetSpec) -> str:
    """The recipe `name` means for a target: `auto` becomes int4 from 1 B parameters (E2B, E4B), int8 below."""
    from ..checkpoint.layout import parameter_count, target_tensors

    if name != AUTO:
        return name
    return "int4" if parameter_count(target_tensors(spec)) >= AUTO_INT4_PARAMETERS else "int8"


def parse_prefill(text: str) -> tuple[int, ...]:
    """The sorted prefill lengths of a comma-separated --prefill value such as '32,128'."""
    try:
        lengths = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise EdgeMtpError(f"--prefill takes comma-separated token counts such as 32,128, not '{text}'.") from None
    if not lengths or min(lengths) < 1:
        raise EdgeMtpError("--prefill needs at least one positive length.")
    return lengths


def check_out(out: Path, fmt: str) -> None:
    """Refuse an --out that cannot take a bundle of this format (a .litertlm file, or an ONNX bundle folder)."""
    from ..bundle.onnx_folder import is_onnx_bundle

    if fmt not in FORMATS:
        raise EdgeMtpError(f"Unknown bundle format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if fmt == LITERT and out.suffix != ".litertlm":
        raise EdgeMtpError(f"--out {out} should end in .litertlm (or pass --format onnx for a bundle folder).")
    if fmt == ONNX and out.suffix == ".litertlm":
        raise EdgeMtpError(f"Output {out} names a .litertlm file; an ONNX bundle is a folder (use --format litert "
                           "for a .litertlm).")
    check_output(out, folder=fmt == ONNX)
    if fmt == ONNX and out.is_dir() and any(out.iterdir()) and not is_onnx_bundle(out):
        raise EdgeMtpError(f"Output folder {out} is not empty and is not an edge-mtp ONNX bundle; choose an empty "
                           "or new folder so nothing of yours is overwritten.")


def check_kv_cache(kv_cache: str, fmt: str, in_place_cache: bool) -> None:
    """Refuse an unknown --kv-cache, or an int8 one where the bundle cannot hold it."""
    if kv_cache not in KV_CACHES:
        raise EdgeMtpError(f"Unknown --kv-cache '{kv_cache}'; choose one of {', '.join(KV_CACHES)}.")
    if kv_cache == "int8" and fmt != LITERT:
        raise EdgeMtpError("--kv-cache int8 is for LiteRT bundles (ONNX bundles keep float32 caches); use "
                           "--format litert or drop --kv-cache.")
    if kv_cache == "int8" and in_place_cache:
        raise EdgeMtpError("--kv-cache int8 cannot be combined with --gpu: LiteRT's GPU cache-update kernel writes "
                           "float rows in place, with no room for the quantize step; drop one of the two.")


def check_export_options(out: Path, fmt: str, draft_len: int, context: int, prefill: tuple[int, ...], quant: str,
                         in_place_cache: bool = False, kv_cache: str = DEFAULT_KV_CACHE) -> None:
    """Refuse a bad --out, --draft-len, --context, --prefill, --quant, --gpu or --kv-cache before any model is
    loaded; then create the output's folder (the export's scratch space lives next to the bundle)."""
    check_out(out, fmt)
    if in_place_cache and fmt != LITERT:
        raise EdgeMtpError("--gpu is for LiteRT-LM bundles: drop it, or use --format litert.")
    check_kv_cache(kv_cache, fmt, in_place_cache)
    if draft_len < 1:
        raise EdgeMtpError(f"--draft-len must be at least 1, not {draft_len}.")
    if not prefill or min(prefill) < 1:
        raise EdgeMtpError("--prefill needs at least one positive length.")
    if max(prefill) > context or draft_len + 2 > context:
        raise EdgeMtpError(f"--context {context} is smaller than the longest prefill ({max(prefill)}) or the verify "
                           f"window ({draft_len + 1} tokens plus one); raise --context.")
    check_recipe(quant)
    writable_parent(out)


def check_context(target_dir: str | Path, context: int, prefill: tuple[int, ...]) -> None:
    """Refuse a --context beyond the checkpoint's positions, or beyond what its KV caches and masks (fp32, as
    exported) leave room for in memory; reads only the checkpoint's config.json."""
    from ..checkpoint.locate import resolve_checkpoint
    from ..util.memory import available_bytes
    from ..checkpoint.spec import max_positions, read_config, target_spec_from_config

    folder = resolve_checkpoint(target_dir)
    config = read_config(folder)
    limit = max_positions(config, f"{folder}/config.json")
    if limit is not None and context > limit:
        raise EdgeMtpError(f"--context {context} exceeds the {limit} positions the target supports "
                           f"(max_position_embeddings in {folder}/config.json); lower --context.")
    spec = target_spec_from_config(config, f"{folder}/config.json")
    need = context * (spec.kv_bytes_per_token(4) + 4 * max(prefill))  # every K/V cache, the widest mask
    free = available_bytes()
    if free and need > free:
        raise EdgeMtpError(f"--context {context} needs at least {need / 2**30:.1f} GiB for the KV caches and masks, "
                           f"more than the {free / 2**30:.1f} GiB of memory available; lower --context.")


def export_assistant(assistant_dir: str | Path | None, no_assistant: bool) -> str | Path | None:
    """The assistant an export drafts with: refuse a target without one unless MTP is explicitly left out."""
    if no_assistant:
        return None
    if assistant_dir is None:
        raise EdgeMtpError("--assistant is required with --target (or pass --no-assistant to export without MTP).")
    return assistant_dir


def check_quantize_options(src: Path, out: Path, quant: str) -> None:
    """Refuse a bad `quantize` source, --out or --quant before the source bundle is read."""
    if src.exists() and not src.is_dir():
        raise EdgeMtpError(f"{src} is a file: quantize takes ONNX bundle folders, and LiteRT bundles are quantized "
                           "at export (edge-mtp export --quant int8, int4, ...).")
    check_recipe(quant)
    if quant == AUTO:
        raise EdgeMtpError(f"Recipe '{AUTO}' is for export; name the recipe to quantize with: {', '.join(RECIPES)}.")
    if out.resolve() == src.resolve():
        raise EdgeMtpError("Write the quantized bundle to another folder; the fp32 source is measured against.")
    check_out(out, ONNX)
