"""`edge-mtp export`: checkpoints -> checked LiteRT models -> one .litertlm bundle, written atomically."""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import atomic_file, writable_parent
from ..contract import Contract
from ..errors import EdgeMtpError
from ..model.drafter import Drafter
from ..model.loading import TargetModels, load_drafter, load_target
from ..spec import spec_to_dict
from .litertlm import BundleMetadata, read_litertlm, write_litertlm
from .signatures import export_units

DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL = (32, 128)
DEFAULT_DRAFT_LEN = 3
TOLERANCE = 1e-4  # max abs error / reference magnitude, per output of every signature
MANIFEST_VERSION = 1


@dataclass
class ExportSummary:
    """What an export produced and what it cost."""

    out: str
    bytes: int
    sections: list[dict]
    signatures: dict[str, list[str]]
    checks: dict[str, dict]
    wall_seconds: float
    peak_rss_mib: float
    stages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly form (for --json)."""
        return asdict(self)


def tokenizer_files(target_dir: Path) -> tuple[Path, BundleMetadata]:
    """The checkpoint's tokenizer.json and the start/stop tokens and chat template LiteRT-LM needs."""
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


def gallery_entry(bundle: Path, name: str, contract: Contract) -> dict:
    """An AI Edge Gallery model_allowlist.json entry for the bundle."""
    return {
        "name": name,
        "modelId": f"local/{bundle.stem}",
        "modelFile": bundle.name,
        "description": f"Gemma 4 with MTP drafter (draft length {contract.draft_len}), exported by edge-mtp.",
        "sizeInBytes": bundle.stat().st_size,
        "version": "1",
        "llmSupportImage": False,
        "llmSupportAudio": False,
        "defaultConfig": {"topK": 1, "topP": 1.0, "temperature": 0.0, "maxTokens": contract.context,
                          "accelerators": "cpu,gpu"},
        "taskTypes": ["llm_chat", "llm_prompt_lab"],
    }


def export_litert(target_dir: str | Path, assistant_dir: str | Path | None, out: str | Path, *,
                  draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                  prefill: tuple[int, ...] = DEFAULT_PREFILL, check: bool = True,
                  on_stage: Callable[[str], None] = lambda s: None) -> ExportSummary:
    """Export a target (and its assistant) to a .litertlm bundle at `out`; every signature is checked numerically."""
    out = Path(out)
    check_output(out, draft_len)
    on_stage("loading checkpoints")
    models = load_target(target_dir)
    drafter = load_drafter(assistant_dir, models.spec) if assistant_dir is not None else None
    return export_litert_models(models, drafter, out, draft_len=draft_len, context=context, prefill=prefill,
                                check=check, on_stage=on_stage, source_assistant=assistant_dir)


def check_output(out: Path, draft_len: int) -> None:
    """Refuse a bad --out or --draft-len before any expensive work."""
    if out.suffix != ".litertlm":
        raise EdgeMtpError(f"Output {out} should end in .litertlm (use --format onnx for an ONNX bundle).")
    if draft_len < 1:
        raise EdgeMtpError("--draft-len must be at least 1.")
    writable_parent(out)


def export_litert_models(models: TargetModels, drafter: Drafter | None, out: Path, *,
                         draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                         prefill: tuple[int, ...] = DEFAULT_PREFILL, check: bool = True,
                         on_stage: Callable[[str], None] = lambda s: None,
                         source_assistant: str | Path | None = None) -> ExportSummary:
    """Export already-loaded modules (see export_litert) to a .litertlm bundle at `out`."""
    start = time.time()
    check_output(out, draft_len)
    stages: list[str] = []

    def stage(text: str) -> None:
        stages.append(text)
        on_stage(text)

    tokenizer, meta = tokenizer_files(models.path)
    if max(prefill) > context:
        raise EdgeMtpError(f"Prefill length {max(prefill)} exceeds the context {context}.")
    contract = Contract(models.spec, drafter.spec if drafter else None, context, draft_len, tuple(sorted(prefill)))
    previous_write, models.target.cache_write = models.target.cache_write, "dus"
    try:
        return _export(models, drafter, contract, out, tokenizer, meta, check, stage, stages, start, source_assistant)
    finally:
        models.target.cache_write = previous_write


def _export(models: TargetModels, drafter: Drafter | None, contract: Contract, out: Path, tokenizer: Path,
            meta: BundleMetadata, check: bool, stage: Callable[[str], None], stages: list[str], start: float,
            source_assistant) -> ExportSummary:
    from .litert import check_unit, convert_unit

    draft_len, context = contract.draft_len, contract.context
    paths: dict[str, Path] = {}
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as tmp:
        work = Path(tmp)
        for unit in export_units(models, drafter, contract):
            stage(f"converting {unit.name}: {', '.join(s.name for s, _ in unit.signatures)}")
            paths[unit.name] = convert_unit(unit, contract, work / f"{unit.name}.tflite")
            if check:
                stage(f"checking {unit.name} against PyTorch")
                checks[unit.name] = check_unit(unit, contract, paths[unit.name])
                _enforce_tolerance(unit.name, checks[unit.name])
        manifest = {
            "format": "edge-mtp-litertlm", "format_version": MANIFEST_VERSION, "draft_len": draft_len,
            "context": context, "prefill_lengths": list(contract.prefill_lengths), "kv_layout": "K[1,Hkv,C,hd] V[1,Hkv,hd,C]",
            "target": spec_to_dict(models.spec), "drafter": spec_to_dict(drafter.spec) if drafter else None,
            "quantization": "fp32",
            "source": {"target": str(models.path), "assistant": str(source_assistant) if source_assistant else None},
        }
        stage("writing bundle")
        with atomic_file(out) as partial:
            write_litertlm(partial, paths, contract, tokenizer, meta, manifest, work)
            read_litertlm(partial)  # refuse to publish a bundle we cannot read back
    (out.parent / f"{out.stem}.allowlist.json").write_text(
        json.dumps({"models": [gallery_entry(out, out.stem, contract)]}, indent=2))
    bundle = read_litertlm(out)
    return ExportSummary(
        out=str(out), bytes=out.stat().st_size,
        sections=[{"type": s.data_type, "model_type": s.model_type, "bytes": s.end - s.begin} for s in bundle.sections],
        signatures={u: [s.name for s in sigs] for u, sigs in _signature_names(contract).items()},
        checks=checks, wall_seconds=time.time() - start,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, stages=stages)


def _signature_names(contract: Contract) -> dict:
    out = {"embedder": [contract.embedder()], "target": list(contract.target_signatures())}
    if contract.target.ple_dim:
        out["per_layer_embedder"] = [contract.per_layer_embedder()]
    if contract.drafter is not None:
        out["drafter"] = [contract.drafter_signature()]
    return out


def _enforce_tolerance(model: str, report: dict[str, dict]) -> None:
    for signature, outputs in report.items():
        for name, row in outputs.items():
            if row["relative"] > TOLERANCE:
                raise EdgeMtpError(
                    f"The converted {model} signature '{signature}' differs from PyTorch on '{name}' "
                    f"(max error {row['max_abs_error']:.3g} vs magnitude {row['scale']:.3g}); this is a converter "
                    "miscompile: please report it with the checkpoint's config.json.")


def remove_quietly(path: Path) -> None:
    """Delete a file or folder if present."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
