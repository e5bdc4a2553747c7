"""`edge-mtp validate`: prove a bundle against the original checkpoints run by transformers.

Three kinds of evidence, each with a documented, overridable threshold:
1. every model and signature of the bundle vs transformers on a prompt set (errors, cosine, top-1 agreement);
2. greedy generation token for token: transformers (plain and assisted), our runtime on the bundle (MTP on and
   off), our PyTorch modules, and LiteRT-LM for .litertlm bundles; a divergence at a near-tie is reported as a tie;
3. the exported drafter's acceptance vs the PyTorch drafter's on the same prompts (wiring bugs and broken
   quantization show up here while the output stays correct).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import resolve_checkpoint
from .contract import DECODE, VERIFY, drafter_mask
from .errors import EdgeMtpError
from .reference import TransformersPair, error_metrics
from .runtime.api import Model, load
from .runtime.speculative import SpeculativeDecoder

from .prompts import DEFAULT_PROMPTS


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits (CLI flags of the same names override them)."""

    max_relative_error: float = 1e-3  # max |bundle - transformers| / max |transformers|, per output
    min_top1_agreement: float = 0.99  # fraction of rows whose argmax agrees
    min_acceptance_ratio: float = 0.8  # exported drafter acceptance / PyTorch drafter acceptance
    min_meaningful_acceptance: float = 0.05  # below this the PyTorch drafter itself is too weak to compare
    tie_tolerance: float = 1e-3  # a divergence where the top-2 logit gap is below this (relative) is a tie


@dataclass
class Check:
    """One line of the report."""

    kind: str
    subject: str
    passed: bool
    detail: str
    metrics: dict = field(default_factory=dict)


@dataclass
class Report:
    """Everything validate found, and its verdict."""

    bundle: str
    thresholds: Thresholds
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        """JSON form."""
        return {"bundle": self.bundle, "passed": self.passed, "thresholds": asdict(self.thresholds),
                "checks": [asdict(c) for c in self.checks]}

    def markdown(self) -> str:
        """A markdown report."""
        lines = [f"# edge-mtp validate: {self.bundle}", "", f"**Verdict: {'PASS' if self.passed else 'FAIL'}**", "",
                 "| check | subject | result | detail |", "|---|---|---|---|"]
        lines += [f"| {c.kind} | {c.subject} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for c in self.checks]
        lines += ["", "Thresholds: " + ", ".join(f"{k} = {v}" for k, v in asdict(self.thresholds).items())]
        return "\n".join(lines) + "\n"


class _Validator:
    def __init__(self, model: Model, ref: TransformersPair, thresholds: Thresholds, report: Report):
        self.model, self.ref, self.t, self.report = model, ref, thresholds, report
        self.backend = model.backend
        self.decoder = SpeculativeDecoder(model.backend)
        self.contract = model.contract

    def add(self, kind: str, subject: str, metrics: dict, passed: bool | None = None, detail: str = "") -> None:
        if passed is None:
            passed = (metrics["relative_error"] <= self.t.max_relative_error
                      and metrics["top1_agreement"] >= self.t.min_top1_agreement)
            detail = detail or (f"rel. error {metrics['relative_error']:.2e}, cosine {metrics['cosine']:.6f}, "
                                f"top-1 {metrics['top1_agreement']:.3f}")
        self.report.checks.append(Check(kind, subject, bool(passed), detail, metrics))

    # -- graphs -----------------------------------------------------------------------------------------------

    def graphs(self, prompts: list[list[int]]) -> None:
        emb, ple, dec, pre, ver, dra = ([] for _ in range(6))
        for ids in prompts:
            want = self.ref.forward(ids)
            emb.append((np.concatenate([self.backend.embed(t)[0][0] for t in ids]), self.ref.embedding(ids)))
            if self.contract.target.ple_dim:
                ple.append((np.concatenate([self.backend.embed(t)[1][0] for t in ids]), self.ref.per_layer_embedding(ids)))
            self.backend.reset()
            rows = [self.decoder.step(DECODE, [t], j) for j, t in enumerate(ids)]
            dec.append((np.concatenate([r["logits"][0] for r in rows]), want["logits"]))
            dec.append((np.concatenate([r["activations"][0] for r in rows]), want["activations"]))
            self.backend.reset()
            self.decoder.prefill(ids[:-1])
            pre.append((self.decoder.step(DECODE, [ids[-1]], len(ids) - 1)["logits"][0], want["logits"][-1:]))
            g = self.contract.draft_len
            if self.backend.has_drafter and len(ids) >= g + 2:
                start = len(ids) - g - 1
                self.backend.reset()
                self.decoder.prefill(ids[:start])
                out = self.decoder.step(VERIFY, ids[start:], start)
                ver.append((out["logits"][0], want["logits"][start:]))
            if self.backend.has_drafter and self.ref.assistant is not None:
                dra.extend(self._drafter_rows(ids, want))
        self._compare("embedder", "embeddings", emb)
        if ple:
            self._compare("per_layer_embedder", "per_layer_embeddings", ple)
        self._compare("target", "decode logits + activations, every position", dec)
        self._compare("target", "prefill_* then decode, last logits", pre)
        if ver:
            self._compare("target", f"verify (G={self.contract.draft_len}) logits", ver)
        if dra:
            self._compare("drafter", "mtp_drafter logits + projected activations", dra)

    def _drafter_rows(self, ids: list[int], want: dict) -> list:
        """Chained draft steps, both sides fed the same inputs (the transformers side's) over the same K/V."""
        self.backend.reset()
        self.decoder.prefill(ids)
        position = len(ids)
        token = int(np.argmax(want["logits"][-1]))
        carry = want["activations"][-1]
        rows = []
        for _ in range(self.contract.draft_len):
            act = np.concatenate([self.ref.embedding([token])[0], carry])[None, None].astype(np.float32)
            got = self.backend.run_drafter(act, np.array([position - 1], np.int32),
                                           drafter_mask(position - 1, self.contract.context))
            ref = self.ref.draft_step(act, want["shared_kv"], position, self.contract.drafter.sliding_window)
            rows.append((got["logits"][0, 0][None], ref["logits"][None]))
            rows.append((got["projected_activations"][0, 0][None], ref["projected_activations"][None]))
            token, carry = int(np.argmax(ref["logits"])), ref["projected_activations"]
        return rows

    def _compare(self, model: str, what: str, pairs: list) -> None:
        metrics = [error_metrics(got, want) for got, want in pairs]
        worst = {"max_abs_error": max(m["max_abs_error"] for m in metrics),
                 "relative_error": max(m["relative_error"] for m in metrics),
                 "cosine": min(m["cosine"] for m in metrics),
                 "top1_agreement": float(np.mean([m["top1_agreement"] for m in metrics]))}
        self.add("graph", f"{model}: {what}", worst)

    # -- generation -------------------------------------------------------------------------------------------

    def generation(self, prompts: list[list[int]], max_tokens: int, torch_backend, engine_texts) -> None:
        stops = self.model.tokenizer.stop_tokens
        totals = {"bundle": [0, 0], "pytorch": [0, 0]}
        for i, ids in enumerate(prompts):
            truth = self.ref.greedy(ids, max_tokens, stops)
            candidates = {"bundle (no MTP)": list(self.model.generate(ids, max_tokens=max_tokens, mtp=False))}
            if self.backend.has_drafter:
                candidates["bundle (MTP)"] = list(self.model.generate(ids, max_tokens=max_tokens))
                stats = self.model.last_stats
                totals["bundle"][0] += stats.accepted
                totals["bundle"][1] += stats.drafted
            if self.ref.assistant is not None:
                candidates["transformers assisted"] = self.ref.greedy(ids, max_tokens, stops, assisted=True)
            if torch_backend is not None:
                from .runtime.speculative import generate_tokens

                tokens, stats = generate_tokens(torch_backend, ids, max_tokens=max_tokens, stop_tokens=stops,
                                                mtp=torch_backend.has_drafter)
                candidates["PyTorch modules (MTP)"] = tokens
                totals["pytorch"][0] += stats.accepted
                totals["pytorch"][1] += stats.drafted
            for name, tokens in candidates.items():
                self._compare_tokens(f"prompt {i + 1}: {name}", ids, tokens, truth)
            for engine, texts in (engine_texts or {}).items():
                # LiteRT-LM does not print the stop token, and its MTP loop may overshoot max tokens by a few.
                want = self.model.tokenizer.decode([t for t in truth if t not in stops])
                got = texts[i]
                ok = got.startswith(want)
                self.add("greedy", f"prompt {i + 1}: {engine}", {}, ok,
                         ("identical text" if got == want else "identical text, then the runtime's overshoot")
                         if ok else f"differs: {got[:40]!r} vs {want[:40]!r}")
        self._acceptance(totals)

    def _compare_tokens(self, subject: str, prompt: list[int], got: list[int], truth: list[int]) -> None:
        n = min(len(got), len(truth))
        pos = next((j for j in range(n) if got[j] != truth[j]), None)
        if pos is None and len(got) == len(truth):
            self.add("greedy", subject, {"tokens": len(got)}, True, f"{len(got)} tokens identical to transformers")
            return
        pos = n if pos is None else pos
        gap = self.ref.top2_gap(prompt + truth[:pos])
        scale = float(np.abs(self.ref.forward(prompt + truth[:pos])["logits"][-1]).max()) or 1.0
        tie = gap <= self.t.tie_tolerance * scale
        self.add("greedy", subject, {"diverges_at": pos, "top2_gap": gap}, tie,
                 f"diverges at token {pos} where the top-2 gap is {gap:.2e}: "
                 + ("a near-tie, not a bug" if tie else "a real difference"))

    # -- chat -------------------------------------------------------------------------------------------------

    def chat(self, bundle: Path, target_dir: Path, max_tokens: int, use_litert_lm: bool) -> None:
        """The bundle's chat template vs the checkpoint's in transformers, byte for byte on every conversation; then
        one conversation through LiteRT-LM's Conversation API, MTP on and off, vs our loop on the same prompt."""
        from .chat_template import CONVERSATIONS, checkpoint_specials, litertlm_conversations, references
        from .export.pipeline import tokenizer_files

        stored = self.model.tokenizer.chat_template
        original = tokenizer_files(target_dir)[1].chat_template if (target_dir / "tokenizer.json").is_file() else None
        if not stored or not original:  # nothing to compare
            return
        specials = checkpoint_specials(target_dir)
        bos = specials.get("bos_token") or ""  # transformers renders it; LiteRT-LM and we prepend it as an id
        want = references(original, specials)
        self._same_renderings("edge-mtp runtime", {n: bos + _rendered(stored, CONVERSATIONS[n]) for n in want}, want)
        if not use_litert_lm or bundle.suffix != ".litertlm":
            return
        context, conversation = self.contract.context, "multi-turn"
        jobs = [(None, CONVERSATIONS[n], 0) for n in want] + [(None, CONVERSATIONS[conversation], max_tokens)]
        modes = (True, False) if self.backend.has_drafter else (False,)  # the first run also renders
        runs = {mtp: litertlm_conversations(bundle, context, jobs if mtp == modes[0] else jobs[-1:], mtp=mtp)
                for mtp in modes}
        renderings = runs[modes[0]]
        self._same_renderings("LiteRT-LM", {n: bos + r.text if r.error is None else f"(error: {r.error})"
                                            for n, r in zip(want, renderings)}, want)
        ids = self.model.tokenizer.encode(want[conversation].removeprefix(bos))
        stops = self.model.tokenizer.stop_tokens
        tokens = list(self.model.generate(ids, max_tokens=max_tokens, mtp=False))
        text_tokens = [t for t in tokens if t not in stops]  # LiteRT-LM's reply leaves the stop token out
        text = self.model.tokenizer.decode(text_tokens)
        for mtp, results in runs.items():
            reply = results[-1]
            # without MTP (no overshoot) the conversation's length tells how many prompt tokens it prefilled
            same_prompt = mtp or (reply.token_count or 0) - len(ids) in (len(tokens), len(text_tokens))
            ok = reply.reply is not None and reply.reply.startswith(text) and same_prompt
            self.add("chat", f"{conversation} conversation: LiteRT-LM Conversation ({'MTP' if mtp else 'no MTP'}) "
                     "vs our loop", {"prompt_tokens": len(ids), "tokens": len(tokens)}, ok,
                     f"same text ({len(tokens)} tokens) from the same {len(ids)}-token prompt" if ok else
                     f"differs: {(reply.reply or reply.error or '')[:40]!r} vs {text[:40]!r}, conversation length "
                     f"{reply.token_count} for a {len(ids)}-token prompt")

    def _same_renderings(self, who: str, got: dict[str, str], want: dict[str, str]) -> None:
        """One check: `who` renders every conversation exactly as transformers does."""
        from .chat_template import first_difference

        bad = next((n for n in want if got[n] != want[n]), None)
        self.add("chat", f"template: {who} vs transformers", {"conversations": len(want)}, bad is None,
                 f"{len(want)} conversations byte-identical ({', '.join(want)})" if bad is None else
                 f"the {bad} conversation {first_difference(want[bad], got[bad])}")

    def _acceptance(self, totals: dict) -> None:
        if not self.backend.has_drafter or totals["pytorch"][1] == 0:
            return
        bundle = totals["bundle"][0] / max(totals["bundle"][1], 1)
        pytorch = totals["pytorch"][0] / totals["pytorch"][1]
        meaningful = pytorch >= self.t.min_meaningful_acceptance
        ok = not meaningful or bundle >= self.t.min_acceptance_ratio * pytorch
        self.add("acceptance", "exported drafter vs PyTorch drafter",
                 {"bundle": bundle, "pytorch": pytorch}, ok,
                 f"{bundle:.3f} vs {pytorch:.3f} accepted/drafted"
                 + ("" if meaningful else " (PyTorch drafter too weak to compare)")
                 + ("" if ok else ": the exported drafter lost its acceptance (wrong KV wiring or quantization)"))


def validate(bundle: str | Path, target_dir: str | Path | None = None, assistant_dir: str | Path | None = None,
             prompts: list[str] | None = None, max_tokens: int = 24, thresholds: Thresholds = Thresholds(),
             use_litert_lm: bool = True, on_stage: Callable[[str], None] = lambda s: None) -> Report:
    """Validate a bundle; raises EdgeMtpError for unusable input, returns a Report with a verdict otherwise."""
    bundle = Path(bundle)
    on_stage("loading the bundle")
    model = load(bundle)
    manifest_source = _manifest_source(bundle)
    target_dir = target_dir or manifest_source.get("target")
    assistant_dir = assistant_dir or manifest_source.get("assistant")
    if target_dir is None:
        raise EdgeMtpError("Pass --target (and --assistant): the original checkpoints to validate against.")
    on_stage("loading the originals with transformers")
    ref = TransformersPair(target_dir, assistant_dir if model.backend.has_drafter else None)
    report = Report(str(bundle), thresholds)
    v = _Validator(model, ref, thresholds, report)
    ids = [model.tokenizer.encode(p) for p in (prompts or DEFAULT_PROMPTS)]
    if any(len(i) + max_tokens >= model.contract.context for i in ids):
        raise EdgeMtpError(f"A prompt plus {max_tokens} tokens exceeds the bundle's context {model.contract.context}.")
    on_stage("comparing every graph with transformers")
    v.graphs(ids)
    torch_backend = None
    if assistant_dir is not None and model.backend.has_drafter:
        from .model.loading import load_drafter, load_target
        from .runtime.backends.torch import TorchBackend

        models = load_target(target_dir)
        torch_backend = TorchBackend(models, load_drafter(assistant_dir, models.spec), model.contract)
    engine_texts = None
    if use_litert_lm and bundle.suffix == ".litertlm" and model.backend.has_drafter:
        on_stage("running LiteRT-LM")
        from .runtime.litertlm_engine import run_litertlm

        prompt_texts = prompts or DEFAULT_PROMPTS
        engine_texts = {"LiteRT-LM (MTP)": run_litertlm(bundle, prompt_texts, max_tokens, model.contract.context).texts}
        if _gpu_present():
            on_stage("running LiteRT-LM on the GPU")
            # LiteRT-LM 0.18.1's GPU executor drafts only with an in-place cache (export --gpu; README, GPU-delegable
            # graphs): other bundles run there with MTP off
            mtp = model.contract.param_tensor
            engine = f"LiteRT-LM GPU ({'MTP' if mtp else 'no MTP'})"
            try:
                engine_texts[engine] = run_litertlm(bundle, prompt_texts, max_tokens, model.contract.context,
                                                    mtp=mtp, accelerator="gpu").texts
            except EdgeMtpError as e:
                report.checks.append(Check("greedy", engine, False, str(e)[:300], {}))
    on_stage("comparing greedy generations")
    v.generation(ids, max_tokens, torch_backend, engine_texts)
    on_stage("comparing chat renderings")
    v.chat(bundle, resolve_checkpoint(target_dir), max_tokens, use_litert_lm)
    return report


def _rendered(template: str, messages: list[dict]) -> str:
    """Our runtime's rendering, or the reason it fails (a check then fails instead of validate stopping)."""
    from .chat_template import render

    try:
        return render(template, messages)
    except EdgeMtpError as e:
        return f"(error: {e})"


def validate_chat(bundle: str | Path, target_dir: str | Path, max_tokens: int = 16,
                  use_litert_lm: bool = True) -> Report:
    """Only the chat row of validate: the bundle's template and LiteRT-LM's conversation against the checkpoint's."""
    bundle = Path(bundle)
    model = load(bundle)
    report = Report(str(bundle), Thresholds())
    _Validator(model, None, report.thresholds, report).chat(bundle, resolve_checkpoint(target_dir), max_tokens,
                                                            use_litert_lm)
    return report


def _gpu_present() -> bool:
    """A Vulkan device (a real GPU or the software one) that LiteRT-LM's GPU executor can use."""
    from .runtime.backends.litert import vulkan_devices

    devices = vulkan_devices()
    return isinstance(devices, list) and bool(devices)


def _manifest_source(bundle: Path) -> dict:
    if bundle.suffix == ".litertlm":
        from .bundle.litertlm import read_litertlm

        return read_litertlm(bundle).manifest.get("source") or {}
    manifest = bundle / "manifest.json"
    return json.loads(manifest.read_text()).get("source", {}) if manifest.is_file() else {}
