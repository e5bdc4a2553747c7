"""`edge-mtp export`: checkpoints -> checked LiteRT models -> one .litertlm bundle, written atomically."""

from __future__ import annotations

import json
import resource
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
from ..prompts import DEFAULT_PROMPTS
from .litertlm import BundleMetadata, read_litertlm, write_litertlm
from .quality import open_backend, quantization_report
from .quantize import DEFAULT_RECIPE, check_recipe, quantize_models, relative_error
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
    quantization: dict | None = None

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
                  prefill: tuple[int, ...] = DEFAULT_PREFILL, quant: str = DEFAULT_RECIPE, check: bool = True,
                  on_stage: Callable[[str], None] = lambda s: None) -> ExportSummary:
    """Export a target (and its assistant) to a .litertlm bundle at `out`; every signature is checked numerically."""
    out = Path(out)
    check_output(out, draft_len)
    check_recipe(quant)
    on_stage("loading checkpoints")
    models = load_target(target_dir)
    drafter = load_drafter(assistant_dir, models.spec) if assistant_dir is not None else None
    return export_litert_models(models, drafter, out, draft_len=draft_len, context=context, prefill=prefill,
                                quant=quant, check=check, on_stage=on_stage, source_assistant=assistant_dir)


def check_output(out: Path, draft_len: int) -> None:
    """Refuse a bad --out or --draft-len before any expensive work."""
    if out.suffix != ".litertlm":
        raise EdgeMtpError(f"Output {out} should end in .litertlm (use --format onnx for an ONNX bundle).")
    if draft_len < 1:
        raise EdgeMtpError("--draft-len must be at least 1.")
    writable_parent(out)


def export_litert_models(models: TargetModels, drafter: Drafter | None, out: Path, *,
                         draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                         prefill: tuple[int, ...] = DEFAULT_PREFILL, quant: str = DEFAULT_RECIPE,
                         check: bool = True, on_stage: Callable[[str], None] = lambda s: None,
                         source_assistant: str | Path | None = None) -> ExportSummary:
    """Export already-loaded modules (see export_litert) to a .litertlm bundle at `out`."""
    start = time.time()
    check_output(out, draft_len)
    check_recipe(quant)
    if max(prefill) > context:
        raise EdgeMtpError(f"Prefill length {max(prefill)} exceeds the context {context}.")
    contract = Contract(models.spec, drafter.spec if drafter else None, context, draft_len, tuple(sorted(prefill)))
    job = _LitertExport(models, drafter, contract, out, quant, on_stage)
    job.manifest["source"] = {"target": str(models.path),
                              "assistant": str(source_assistant) if source_assistant else None}
    previous_write, models.target.cache_write = models.target.cache_write, "dus"
    try:
        with tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as tmp:
            job.work = Path(tmp)
            job.convert(check)
            job.quantize()
            job.write()
    finally:
        models.target.cache_write = previous_write
    (out.parent / f"{out.stem}.allowlist.json").write_text(
        json.dumps({"models": [gallery_entry(out, out.stem, contract)]}, indent=2))
    bundle = read_litertlm(out)
    return ExportSummary(
        out=str(out), bytes=out.stat().st_size,
        sections=[{"type": s.data_type, "model_type": s.model_type, "bytes": s.end - s.begin} for s in bundle.sections],
        signatures={u: [s.name for s in sigs] for u, sigs in _signature_names(contract).items()},
        checks=job.checks, wall_seconds=time.time() - start,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, stages=job.stages,
        quantization=job.manifest.get("quantization_report"))


class _LitertExport:
    """One export job: convert and check each model, quantize, write the bundle (in a temporary work folder)."""

    def __init__(self, models: TargetModels, drafter: Drafter | None, contract: Contract, out: Path, quant: str,
                 on_stage: Callable[[str], None]):
        self.models, self.drafter, self.contract, self.out, self.quant = models, drafter, contract, out, quant
        self.on_stage = on_stage
        self.tokenizer, self.meta = tokenizer_files(models.path)
        self.units = export_units(models, drafter, contract)
        self.paths: dict[str, Path] = {}
        self.checks: dict[str, dict] = {}
        self.stages: list[str] = []
        self.work = Path(".")
        self.manifest = {
            "format": "edge-mtp-litertlm", "format_version": MANIFEST_VERSION, "draft_len": contract.draft_len,
            "context": contract.context, "prefill_lengths": list(contract.prefill_lengths),
            "kv_layout": "K[1,Hkv,C,hd] V[1,Hkv,hd,C]", "target": spec_to_dict(models.spec),
            "drafter": spec_to_dict(drafter.spec) if drafter else None, "quantization": quant,
        }

    def stage(self, text: str) -> None:
        self.stages.append(text)
        self.on_stage(text)

    def convert(self, check: bool) -> None:
        """Convert every model to fp32 .tflite; check each signature against PyTorch."""
        from .litert import check_unit, convert_unit

        for unit in self.units:
            self.stage(f"converting {unit.name}: {', '.join(s.name for s, _ in unit.signatures)}")
            self.paths[unit.name] = convert_unit(unit, self.contract, self.work / f"{unit.name}.tflite")
            if check:
                self.stage(f"checking {unit.name} against PyTorch")
                self.checks[unit.name] = check_unit(unit, self.contract, self.paths[unit.name])
                _enforce_tolerance(unit.name, self.checks[unit.name])

    def quantize(self) -> None:
        """Apply the recipe model by model, then measure what it cost against the fp32 models."""
        if self.quant == "fp32":
            return
        self.stage(f"quantizing ({self.quant})")
        fp32 = dict(self.paths)
        self.paths, chosen = quantize_models(fp32, self.quant, self.work, self._sensitivity)
        self.stage("measuring the quantization cost against fp32")
        reference = self.work / "fp32.litertlm"
        write_litertlm(reference, fp32, self.contract, self.tokenizer, self.meta, self.manifest, self.work)
        candidate = self.work / "quantized.litertlm"
        write_litertlm(candidate, self.paths, self.contract, self.tokenizer, self.meta, self.manifest, self.work)
        report = quantization_report(open_backend(reference), open_backend(candidate), self._prompts())
        report["components"] = {name: {"recipe": chosen[name], "bytes": self.paths[name].stat().st_size,
                                       "fp32_bytes": fp32[name].stat().st_size} for name in fp32}
        self.manifest["quantization_report"] = report

    def _sensitivity(self, name: str, trial: Path) -> float:
        """Relative error of a component's main output when quantized (used by the 'mixed' recipe)."""
        from .litert import run_tflite
        from .signatures import sample_inputs

        unit = next(u for u in self.units if u.name == name)
        signature = unit.signatures[-1][0]  # verify for the target, the only signature elsewhere
        inputs = sample_inputs(signature, self.contract, seed=7)
        key = next(o.name for o in signature.outputs if not o.name.startswith("kv_cache"))
        want = run_tflite(self.paths[name], signature.name, inputs)
        return relative_error(run_tflite(trial, signature.name, inputs), want, key)

    def _prompts(self) -> list[list[int]]:
        from ..runtime.api import Tokenizer

        tok = Tokenizer(self.tokenizer.read_text(), self.meta.start_token, self.meta.stop_tokens)
        limit = max(4, self.contract.context // 3)
        return [tok.encode(p)[:limit] for p in DEFAULT_PROMPTS]

    def write(self) -> None:
        """Assemble the bundle atomically and read it back before publishing it."""
        self.stage("writing bundle")
        with atomic_file(self.out) as partial:
            write_litertlm(partial, self.paths, self.contract, self.tokenizer, self.meta, self.manifest, self.work)
            read_litertlm(partial)


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
