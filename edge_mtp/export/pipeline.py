"""`edge-mtp export`: checkpoints -> checked LiteRT models -> one .litertlm bundle, written atomically."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..bundle.litertlm import BundleMetadata, read_litertlm, source_files, write_litertlm
from ..bundle.tokenizer import Tokenizer
from ..checkpoint.chat_template import checkpoint_specials, fit_template
from ..checkpoint.locate import checkpoint_files, resolve_checkpoint
from ..checkpoint.spec import spec_to_dict
from ..model.contract import Contract
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint, TargetModels, TargetSource, kv_scales, load_drafter, use_scales
from ..util.atomic import atomic_file
from ..util.errors import EdgeMtpError
from ..util.memory import PeakMemory
from .bundle_check import enforce, litert_bundle_report
from .driver import Progress, StreamedExport, export_resource_errors
from .options import (DEFAULT_CONTEXT, DEFAULT_DRAFT_LEN, DEFAULT_KV_CACHE, DEFAULT_PREFILL, DEFAULT_RECIPE, LITERT,
                      check_context, check_export_options, resolve_recipe)

MANIFEST_VERSION = 1


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


GALLERY_SAMPLING = {"topK": 64, "topP": 0.95, "temperature": 1.0}  # Google's Gemma 4 entries (allowlist 1.0.13+)
GALLERY_MAX_TOKENS = 4000


def gallery_entry(bundle: Path, name: str, contract: Contract) -> dict:
    """An AI Edge Gallery model_allowlist.json entry for the bundle, with the fields of Google's Gemma 4 entries.

    The GPU is offered only where the bundle drafts there too (an in-place cache, export --gpu) or has no drafter:
    Gallery users switch accelerators with MTP on, and LiteRT-LM 0.18.1's GPU executor cannot draft otherwise."""
    drafts = contract.drafter is not None
    gpu = not drafts or contract.param_tensor
    return {
        "name": name,
        "modelId": f"local/{bundle.stem}",
        "modelFile": bundle.name,
        "description": f"Gemma 4 with MTP drafter (draft length {contract.draft_len}), exported by edge-mtp."
        if drafts else "Gemma 4, exported by edge-mtp.",
        "sizeInBytes": bundle.stat().st_size,
        "version": "1",
        "llmSupportImage": False,
        "llmSupportAudio": False,
        "maxContextLength": contract.context,
        "capabilities": ["speculative_decoding"] if drafts else [],
        "defaultConfig": {**GALLERY_SAMPLING, "maxTokens": min(GALLERY_MAX_TOKENS, contract.context),
                          "accelerators": "cpu,gpu" if gpu else "cpu"},
        "taskTypes": ["llm_chat", "llm_prompt_lab"],
    }


def export_litert(target_dir: str | Path, assistant_dir: str | Path | None, out: str | Path, *,
                  draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                  prefill: tuple[int, ...] = DEFAULT_PREFILL, quant: str = DEFAULT_RECIPE,
                  on_stage: Callable[[str], None] = lambda s: None,
                  on_progress: Progress = lambda what, done, total: None,
                  allow_template_mismatch: bool = False, in_place_cache: bool = False,
                  sliding_ring: bool = True, kv_cache: str = DEFAULT_KV_CACHE) -> ExportSummary:
    """Export a target (and its assistant) to a .litertlm bundle at `out`, streaming the checkpoint piece by piece.

    `in_place_cache`: the bundle also drafts on LiteRT-LM's GPU executor (see export_litert_models)."""
    out = Path(out)
    check_export_options(out, LITERT, draft_len, context, prefill, quant, in_place_cache, kv_cache)
    check_context(target_dir, context, prefill)
    source = TargetCheckpoint(target_dir)
    drafter = load_drafter(assistant_dir, source.spec) if assistant_dir is not None else None
    return export_litert_models(source, drafter, out, draft_len=draft_len, context=context, prefill=prefill,
                                quant=quant, on_stage=on_stage, on_progress=on_progress,
                                source_assistant=assistant_dir, allow_template_mismatch=allow_template_mismatch,
                                in_place_cache=in_place_cache, sliding_ring=sliding_ring, kv_cache=kv_cache)


def export_litert_models(source: TargetSource | TargetModels, drafter: Drafter | None, out: Path, *,
                         draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                         prefill: tuple[int, ...] = DEFAULT_PREFILL, quant: str = DEFAULT_RECIPE,
                         on_stage: Callable[[str], None] = lambda s: None,
                         on_progress: Progress = lambda what, done, total: None,
                         source_assistant: str | Path | None = None,
                         allow_template_mismatch: bool = False, in_place_cache: bool = False,
                         sliding_ring: bool = True, kv_cache: str = DEFAULT_KV_CACHE) -> ExportSummary:
    """Export a target source (a checkpoint opened for streaming, or modules in memory) to a .litertlm at `out`.

    `in_place_cache`: the target takes param_tensor and updates its caches in place (model/kv_update.py), which
    LiteRT-LM's GPU executor needs for MTP."""
    start = time.time()
    out = Path(out)
    check_export_options(out, LITERT, draft_len, context, prefill, quant, in_place_cache, kv_cache)
    if isinstance(source, TargetModels):
        source = TargetSource(source)
    quant = resolve_recipe(quant, source.spec)
    contract = Contract(source.spec, drafter.spec if drafter else None, context, draft_len, tuple(sorted(prefill)),
                        kv_dtype=kv_cache, param_tensor=in_place_cache, sliding_ring=sliding_ring,
                        kv_scales=kv_scales(source) if kv_cache == "int8" else ())
    tokenizer, meta = tokenizer_and_metadata(source.directory)
    manifest = {
        "format": "edge-mtp-litertlm", "format_version": MANIFEST_VERSION, "draft_len": contract.draft_len,
        "param_tensor": contract.param_tensor, "sliding_ring": contract.sliding_ring, **contract.kv_record(),
        "context": contract.context, "prefill_lengths": list(contract.prefill_lengths),
        "kv_layout": "K[1,Hkv,C,hd] V[1,Hkv,hd,C]", "target": spec_to_dict(source.spec),
        "drafter": spec_to_dict(drafter.spec) if drafter else None, "quantization": quant,
        "source": {"target": str(source.origin), "assistant": str(source_assistant) if source_assistant else None,
                   "sha256": {"target": source_files(source.origin), "assistant":
                              source_files(resolve_checkpoint(source_assistant)) if source_assistant else None}},
    }
    target = source.models.target
    previous_write, target.cache_write = target.cache_write, "dus"
    previous_ring, target.ring = target.ring, contract.ring_size
    use_scales(contract.scales_by_kind(), target, drafter)
    previous_gather = getattr(drafter, "gather_rows", None)  # None: no drafter, or a wrapper of one (tests)
    if previous_gather is not None:
        drafter.gather_rows = quant == "fp32"  # its table stays float (model/drafter.py)
    memory, stages = PeakMemory(), []

    def stage(text: str) -> None:
        stages.append(text)
        on_stage(text)

    try:
        with memory, export_resource_errors(out), \
                tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as tmp:
            work = Path(tmp)
            job = StreamedExport(source, drafter, contract, work, quant, stage, on_progress)
            paths = job.run()
            stage("writing the candidate bundle")
            candidate = work / "candidate.litertlm"
            write_litertlm(candidate, paths, contract, tokenizer, meta, manifest, work)
            report = litert_bundle_report(candidate, source, drafter, contract,
                                          Tokenizer(tokenizer.read_text(), meta.start_token, meta.stop_tokens), stage)
            enforce(report, str(out), exact=quant == "fp32" and kv_cache == "float32")
            report["components"] = {name: {k: v for k, v in asdict(r).items() if k != "seconds"}  # reproducible
                                    for name, r in job.reports.items()}
            manifest["quantization_report"] = report
            fit = fit_template(meta.chat_template, checkpoint_specials(source.directory) if meta.chat_template else {},
                               candidate, contract.context, allow_template_mismatch)
            meta.chat_template, manifest["chat_template"] = fit.template, fit.to_dict()
            candidate.unlink()
            stage("writing bundle")
            with atomic_file(out) as partial:
                write_litertlm(partial, paths, contract, tokenizer, meta, manifest, work)
                read_litertlm(partial)
    finally:
        target.cache_write, target.ring = previous_write, previous_ring
        use_scales({}, target, drafter)
        if previous_gather is not None:
            drafter.gather_rows = previous_gather
    (out.parent / f"{out.stem}.allowlist.json").write_text(
        json.dumps({"models": [gallery_entry(out, out.stem, contract)]}, indent=2))
    bundle = read_litertlm(out)
    return ExportSummary(
        out=str(out), bytes=out.stat().st_size,
        sections=[{"type": s.data_type, "model_type": s.model_type, "bytes": s.end - s.begin} for s in bundle.sections],
        signatures={u: [s.name for s in sigs] for u, sigs in _signature_names(contract).items()},
        checks={name: r.fp32_error for name, r in job.reports.items()}, wall_seconds=time.time() - start,
        peak_rss_mib=memory.peak_mib, stages=stages, quantization=manifest.get("quantization_report"), recipe=quant)


def _signature_names(contract: Contract) -> dict:
    out = {"embedder": [contract.embedder()], "target": list(contract.target_signatures())}
    if contract.target.ple_dim:
        out["per_layer_embedder"] = [contract.per_layer_embedder()]
    if contract.drafter is not None:
        out["drafter"] = [contract.drafter_signature()]
    return out
