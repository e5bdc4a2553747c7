"""`edge-mtp export`: checkpoints -> checked models -> one bundle (a .litertlm file or an ONNX folder), written
atomically. The format's adapter (export/litert_format.py, export/onnx_format.py) makes and writes the models; the
driver (export/driver.py) decides which, in which order and with which recipe."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..bundle.litertlm import BundleMetadata
from ..checkpoint.locate import checkpoint_files
from ..model.contract import Contract
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint, TargetModels, TargetSource, kv_scales, load_drafter, use_scales
from ..util.errors import EdgeMtpError
from ..util.memory import PeakMemory
from .driver import Progress, StreamedExport, export_resource_errors, signature_names
from .options import (DEFAULT_CONTEXT, DEFAULT_DRAFT_LEN, DEFAULT_KV_CACHE, DEFAULT_PREFILL, DEFAULT_RECIPE, LITERT, ONNX,
                      check_context, check_export_options, resolve_recipe)


@dataclass
class ExportSummary:
    """What an export produced and what it cost."""

    out: str
    bytes: int
    sections: list[dict]
    signatures: dict[str, list[str]]
    checks: dict[str, float]  # worst relative error vs PyTorch per converted piece
    wall_seconds: float
    peak_rss_mib: float
    stages: list[str] = field(default_factory=list)
    quantization: dict | None = None
    recipe: str = DEFAULT_RECIPE  # the quantization recipe applied (what `auto` chose)

    def to_dict(self) -> dict:
        """JSON-friendly form (for --json)."""
        return asdict(self)


def tokenizer_and_metadata(target_dir: Path) -> tuple[Path, BundleMetadata]:
    """The checkpoint's tokenizer.json and the start/stop tokens and chat template LiteRT-LM needs (a LoRA adapter's
    are its base's)."""
    target_dir = checkpoint_files(target_dir)
    tokenizer = target_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise EdgeMtpError(f"No tokenizer.json in {target_dir}; copy the model's tokenizer files next to its weights.")
    config = json.loads((target_dir / "config.json").read_text())
    text = config.get("text_config", config)
    generation_file = target_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    bos = generation.get("bos_token_id", text.get("bos_token_id", 2))
    eos = generation.get("eos_token_id", text.get("eos_token_id", 1))
    template = None
    if (target_dir / "chat_template.jinja").is_file():
        template = (target_dir / "chat_template.jinja").read_text()
    elif (target_dir / "tokenizer_config.json").is_file():
        template = json.loads((target_dir / "tokenizer_config.json").read_text()).get("chat_template")
    return tokenizer, BundleMetadata(int(bos), [int(e) for e in (eos if isinstance(eos, list) else [eos])], template)


def export_bundle(fmt: str, target: str | Path | TargetSource | TargetModels, assistant: str | Path | Drafter | None,
                  out: str | Path, *, draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                  prefill: tuple[int, ...] = DEFAULT_PREFILL, quant: str = DEFAULT_RECIPE, check: bool = True,
                  on_stage: Callable[[str], None] = lambda s: None,
                  on_progress: Progress = lambda what, done, total: None,
                  allow_template_mismatch: bool = False, in_place_cache: bool = False, sliding_ring: bool = True,
                  kv_cache: str = DEFAULT_KV_CACHE) -> ExportSummary:
    """Export a target and its assistant (checkpoint folders, streamed piece by piece; or modules in memory) to a
    bundle of format `fmt` at `out`: every piece checked against PyTorch (`check`), the bundle against the streamed
    reference. The options are checked before any checkpoint is read.

    `in_place_cache` (LiteRT): the target takes param_tensor and updates its caches in place (model/kv_update.py),
    which LiteRT-LM's GPU executor needs for MTP. `sliding_ring` (LiteRT): sliding layers keep a ring of about the
    window instead of the context (model/contract.py ring_size). `kv_cache`: the caches' type (model/kv_quant.py)."""
    start = time.time()
    out = Path(out)
    check_export_options(out, fmt, draft_len, context, tuple(prefill), quant, in_place_cache, kv_cache)
    if fmt == LITERT:
        from .litert_format import LitertFormat as Format
    else:
        from .onnx_format import OnnxFormat as Format
    source_assistant, drafter = None, assistant
    if isinstance(target, (str, Path)):
        check_context(target, context, tuple(prefill))
        target, source_assistant = TargetCheckpoint(target), assistant
        drafter = load_drafter(assistant, target.spec) if assistant is not None else None
    source = TargetSource(target) if isinstance(target, TargetModels) else target
    quant = resolve_recipe(quant, source.spec)
    contract = Contract(source.spec, drafter.spec if drafter else None, context, draft_len, tuple(sorted(prefill)),
                        kv_dtype=kv_cache, param_tensor=in_place_cache, sliding_ring=sliding_ring and fmt == LITERT,
                        kv_scales=kv_scales(source) if kv_cache == "int8" else ())
    tokenizer, meta = tokenizer_and_metadata(source.directory)
    model = source.models.target
    previous_write, model.cache_write = model.cache_write, Format.CACHE_WRITE
    previous_ring, model.ring = model.ring, contract.ring_size
    use_scales(contract.scales_by_kind(), model, drafter)
    previous_gather = getattr(drafter, "gather_rows", None)  # None: no drafter, or a wrapper of one (tests)
    if previous_gather is not None:
        drafter.gather_rows = Format.FP32_GATHER and quant == "fp32"
    memory, stages = PeakMemory(), []

    def stage(text: str) -> None:
        stages.append(text)
        on_stage(text)

    try:
        with memory, export_resource_errors(out), Format.open(out, contract, stage) as bundle:
            job = StreamedExport(source, drafter, contract, bundle, quant, check, stage, on_progress)
            paths = job.run()
            report = bundle.write(out, paths, job.reports, source, drafter, tokenizer, meta, quant, source_assistant,
                                  allow_template_mismatch)
    finally:
        model.cache_write, model.ring = previous_write, previous_ring
        use_scales({}, model, drafter)
        if previous_gather is not None:
            drafter.gather_rows = previous_gather
    size, sections = Format.publish(out, contract)
    return ExportSummary(
        out=str(out), bytes=size, sections=sections,
        signatures={u: [s.name for s in sigs] for u, sigs in signature_names(contract).items()},
        checks={name: r.fp32_error for name, r in job.reports.items()}, wall_seconds=time.time() - start,
        peak_rss_mib=memory.peak_mib, stages=stages, quantization=report, recipe=quant)


def export_litert(target_dir: str | Path, assistant_dir: str | Path | None, out: str | Path,
                  **options) -> ExportSummary:
    """A target (and its assistant) to a .litertlm bundle at `out` (options: export_bundle's)."""
    return export_bundle(LITERT, target_dir, assistant_dir, out, **options)


def export_onnx(target_dir: str | Path, assistant_dir: str | Path | None, out: str | Path,
                **options) -> ExportSummary:
    """A target (and its assistant) to an ONNX bundle folder at `out` (options: export_bundle's)."""
    return export_bundle(ONNX, target_dir, assistant_dir, out, **options)
