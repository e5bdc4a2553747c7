"""`edge-mtp validate`: prove a bundle against the original checkpoints, whatever its quantization recipe.

Four kinds of evidence, each row saying which reference it used and why it passed:
1. weights: every weight, norm, table and RoPE frequency of the checkpoints, rounded as the bundle's recipe rounds
   them, found byte for byte in the piece that computes with it, in the tensor named after it (checks/weights.py for
   .litertlm, checks/onnx_weights.py for ONNX folders). This is exact at every recipe, so it is what tells a
   faithful quantized bundle from one of another checkpoint;
2. graphs: every model and signature vs transformers on a prompt set, within float rounding for an fp32 bundle and
   within COST_MARGIN times the error its recipe cost at export (recorded in the manifest) for a quantized one; the
   drafter is judged by what it decides (drafted token, clusters scored), not by its masked logits;
3. greedy generation token for token: transformers (plain and assisted), our runtime on the bundle (MTP on and
   off), our PyTorch modules, and LiteRT-LM for .litertlm bundles; a divergence from transformers where the top-2
   gap lies within the bundle's own measured logit noise is a quantization tie, anything else a real difference;
4. the exported drafter's acceptance vs the PyTorch drafter's on the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint.locate import resolve_checkpoint
from ..model.contract import DECODE, VERIFY, drafter_mask
from ..runtime.api import Model, load
from ..runtime.speculative import SpeculativeDecoder
from ..util.errors import EdgeMtpError
from .reference import TransformersPair, error_metrics

from ..util.prompts import DEFAULT_PROMPTS

TRANSFORMERS = "transformers fp32"
ROUNDED_CHECKPOINT = "the checkpoint rounded by the bundle's recipe"
OWN_PLAIN = "the bundle's own plain decoding"
STRICT_MTP = "identical tokens (fp32: verify rows give decode bits, so no divergence is a tie)"
# A quantized bundle's graphs may differ from transformers by up to this many times what its recipe cost at export
# (the export's own measurement against the fp32 reference, on its report prompts); the weights are proven exactly.
COST_MARGIN = 3.0
# A quantized bundle's drafter must draft the reference's token at least this share as often as it did at export.
DRAFTER_AGREEMENT_SHARE = 0.5
NOISE_MARGIN = 2.0  # a divergence is a quantization tie when its top-2 gap is within this times the logit noise


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for an fp32 bundle (CLI flags of the same names override them; quantized bundles get
    limits from their recorded recipe cost, see Limits)."""

    max_relative_error: float = 1e-3  # max |bundle - transformers| / max |transformers|, per output
    min_top1_agreement: float = 0.99  # fraction of rows whose argmax agrees
    min_acceptance_ratio: float = 0.8  # exported drafter acceptance / PyTorch drafter acceptance
    min_meaningful_acceptance: float = 0.05  # below this the PyTorch drafter itself is too weak to compare
    tie_tolerance: float = 1e-3  # a divergence where the top-2 logit gap is below this (relative) is a tie


@dataclass(frozen=True)
class Limits:
    """The limits one graph row is held to, and why."""

    max_relative_error: float
    min_top1_agreement: float
    why: str


@dataclass
class Check:
    """One line of the report: what was compared with which reference, the verdict, and the criterion applied."""

    kind: str
    subject: str
    passed: bool
    detail: str
    metrics: dict = field(default_factory=dict)
    reference: str = TRANSFORMERS
    criterion: str = ""


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
                 "| check | subject | result | detail | reference | criterion |", "|---|---|---|---|---|---|"]
        lines += [f"| {c.kind} | {c.subject} | {'pass' if c.passed else '**FAIL**'} | {c.detail} | {c.reference} | "
                  f"{c.criterion} |" for c in self.checks]
        lines += ["", "Thresholds: " + ", ".join(f"{k} = {v}" for k, v in asdict(self.thresholds).items())]
        return "\n".join(lines) + "\n"


class _Validator:
    def __init__(self, model: Model, ref: TransformersPair, thresholds: Thresholds, report: Report,
                 costs: dict | None = None):
        self.model, self.ref, self.t, self.report = model, ref, thresholds, report
        self.backend = model.backend
        self.decoder = SpeculativeDecoder(model.backend)
        self.contract = model.contract
        self.costs = costs or {}
        self.logit_noise = 0.0  # max |bundle - reference| over the teacher-forced logits, set by graphs()

    def add(self, kind: str, subject: str, metrics: dict, passed: bool, detail: str, reference: str = TRANSFORMERS,
            criterion: str = "") -> None:
        self.report.checks.append(Check(kind, subject, bool(passed), detail, metrics, reference, criterion))

    # -- limits -----------------------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        """Whether the bundle's weights or its KV cache are quantized (held to the recorded cost, not to fp32)."""
        return self.costs.get("recipe", "fp32") != "fp32" or self.costs.get("kv_dtype", "float32") == "int8"

    def limits(self, component: str) -> Limits:
        """fp32: float rounding. Quantized: COST_MARGIN times what the recipe cost this component at export."""
        t = self.t
        if not self.quantized:
            return Limits(t.max_relative_error, t.min_top1_agreement, "fp32 bundle: float rounding")
        recipe = self.costs["recipe"] + (" + int8 KV" if self.costs.get("kv_dtype") == "int8" else "")
        cost = self.costs.get("components", {}).get(component)
        if component in ("target", "drafter") or cost is None:
            cost = self.costs.get("logit_relative_error")
        if cost is None:
            return Limits(t.max_relative_error, t.min_top1_agreement,
                          f"{recipe} bundle with no recorded cost: fp32 limits (re-export to record it)")
        # top-1 over a few prompts says little about a quantized graph whose weights are proven exactly (row 1); the
        # drafter's decisions are held to a share of the agreement measured at export
        top1 = DRAFTER_AGREEMENT_SHARE * (self.costs.get("drafter_top1_agreement") or 0.0) \
            if component == "drafter" else 0.0
        return Limits(max(t.max_relative_error, COST_MARGIN * cost), top1,
                      f"{COST_MARGIN:g} x the {recipe} cost measured at export ({cost:.2e})")

    # -- weights ----------------------------------------------------------------------------------------------

    def weights(self, bundle: Path, target_dir: Path, assistant_dir: str | Path | None) -> None:
        """Every checkpoint tensor, rounded as the bundle's recipe rounds it, found in the bundle (checks.weights for
        .litertlm, checks.onnx_weights for ONNX folders)."""
        from .weights import WeightReport
        from ..model.loading import TargetCheckpoint

        source = TargetCheckpoint(target_dir)
        recipes = self.costs.get("recipes", {})
        if bundle.suffix == ".litertlm":
            from .weights import check_drafter, check_tables, check_target

            tables = lambda r: check_tables(bundle, source, r)  # noqa: E731
            drafter_recipe = recipes.get("drafter", "fp32")
        else:
            from .onnx_weights import check_drafter, check_tables, check_target

            recipes = {"target": self.costs.get("recipe", "fp32")} | recipes
            tables = lambda r: check_tables(bundle, source, recipes, r)  # noqa: E731
            drafter_recipe = recipes.get("drafter", self.costs.get("recipe", "fp32"))
        parts = [("target", lambda r: check_target(bundle, source, recipes, r)), ("embedding tables", tables)]
        if assistant_dir is not None and self.backend.has_drafter:
            from ..model.loading import load_drafter

            drafter = load_drafter(assistant_dir, source.spec)
            parts.append(("drafter", lambda r: check_drafter(bundle, drafter, drafter_recipe, r)))
        for name, run in parts:
            found = WeightReport()
            run(found)
            encodings = ", ".join(f"{k} {v}" for k, v in sorted(found.compared.items()))
            detail = (f"{found.tensors} tensors byte-identical ({encodings})" if not found.problems else
                      f"{len(found.problems)} of {found.tensors + len(found.problems)} tensors differ: "
                      + "; ".join(found.problems[:3]) + (" ..." if len(found.problems) > 3 else ""))
            self.add("weights", name, {"tensors": found.compared, "problems": found.problems}, not found.problems,
                     detail, ROUNDED_CHECKPOINT, "every tensor found, with its scales, in the tensor named after it")

    # -- graphs -----------------------------------------------------------------------------------------------

    def graphs(self, prompts: list[list[int]]) -> None:
        emb, ple, dec, pre, ver, decisions, projected = ([] for _ in range(7))
        for ids in prompts:
            want = self.ref.forward(ids)
            emb.append((np.concatenate([self.backend.embed(t)[0][0] for t in ids]), self.ref.embedding(ids)))
            if self.contract.target.ple_dim:
                ple.append((np.concatenate([self.backend.embed(t)[1][0] for t in ids]), self.ref.per_layer_embedding(ids)))
            self.backend.reset()
            rows = [self.decoder.step(DECODE, [t], j) for j, t in enumerate(ids)]
            logits = np.concatenate([r["logits"][0] for r in rows])
            self.logit_noise = max(self.logit_noise, float(np.abs(logits - want["logits"]).max()))
            dec.append((logits, want["logits"]))
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
                for got, ref in self._drafter_rows(ids, want):
                    decisions.append(_decision(got["logits"], ref["logits"]))
                    projected.append((got["projected_activations"], ref["projected_activations"]))
        self._compare("embedder", "embeddings", emb, "embedder")
        if ple:
            self._compare("per_layer_embedder", "per_layer_embeddings", ple, "per_layer_embedder")
        self._compare("target", "decode logits + activations, every position", dec, "target")
        self._compare("target", "prefill_* then decode, last logits", pre, "target")
        if ver:
            self._compare("target", f"verify (G={self.contract.draft_len}) logits", ver, "target")
        if decisions:
            self._drafter_decisions(decisions, projected)

    def _drafter_rows(self, ids: list[int], want: dict) -> list[tuple[dict, dict]]:
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
            rows.append(({"logits": got["logits"].reshape(-1),
                          "projected_activations": got["projected_activations"].reshape(1, -1)},
                         {"logits": ref["logits"], "projected_activations": ref["projected_activations"][None]}))
            token, carry = int(np.argmax(ref["logits"])), ref["projected_activations"]
        return rows

    def _drafter_decisions(self, decisions: list[tuple[bool, float]], projected: list) -> None:
        """The drafter judged by what it decides: the token it drafts and the candidates (clusters) it scores."""
        limits = self.limits("drafter")
        same_token = float(np.mean([d[0] for d in decisions]))
        same_candidates = float(np.mean([d[1] for d in decisions]))
        error = max(error_metrics(g, w)["relative_error"] for g, w in projected)
        need = limits.min_top1_agreement
        if self.quantized:  # the recorded agreement, less two standard errors of a sample this small
            need = max(0.0, need - 2 * float(np.sqrt(need * (1 - need) / len(decisions))))
        passed = same_token >= need and same_candidates >= need and error <= limits.max_relative_error
        self.add("graph", "drafter: mtp_drafter decisions (drafted token, scored candidates) + projected activations",
                 {"drafted_token_agreement": same_token, "candidate_agreement": same_candidates,
                  "projected_relative_error": error, "steps": len(decisions)}, passed,
                 f"same drafted token {same_token:.3f}, same candidates {same_candidates:.3f} over {len(decisions)} "
                 f"steps, projected activations rel. error {error:.2e}",
                 TRANSFORMERS + " assistant, identical inputs",
                 f"agreements >= {need:.2f}, error <= {limits.max_relative_error:.2e} ({limits.why})")

    def _compare(self, model: str, what: str, pairs: list, component: str) -> None:
        metrics = [error_metrics(got, want) for got, want in pairs]
        worst = {"max_abs_error": max(m["max_abs_error"] for m in metrics),
                 "relative_error": max(m["relative_error"] for m in metrics),
                 "cosine": min(m["cosine"] for m in metrics),
                 "top1_agreement": float(np.mean([m["top1_agreement"] for m in metrics]))}
        limits = self.limits(component)
        top1_applies = not self.quantized
        passed = (worst["relative_error"] <= limits.max_relative_error
                  and (not top1_applies or worst["top1_agreement"] >= limits.min_top1_agreement))
        detail = (f"rel. error {worst['relative_error']:.2e}, cosine {worst['cosine']:.6f}, "
                  f"top-1 {worst['top1_agreement']:.3f}")
        criterion = f"rel. error <= {limits.max_relative_error:.2e}" + (
            f", top-1 >= {limits.min_top1_agreement:.2f}" if top1_applies else "") + f" ({limits.why})"
        self.add("graph", f"{model}: {what}", worst, passed, detail, TRANSFORMERS, criterion)

    # -- generation -------------------------------------------------------------------------------------------

    def generation(self, prompts: list[list[int]], max_tokens: int, torch_backend, engine_texts) -> None:
        stops = self.model.tokenizer.stop_tokens
        totals = {"bundle": [0, 0], "pytorch": [0, 0]}
        for i, ids in enumerate(prompts):
            truth = self.ref.greedy(ids, max_tokens, stops)
            plain = list(self.model.generate(ids, max_tokens=max_tokens, mtp=False))
            candidates = {"bundle (no MTP)": plain}
            if self.backend.has_drafter:
                candidates["bundle (MTP)"] = list(self.model.generate(ids, max_tokens=max_tokens))
                stats = self.model.last_stats
                totals["bundle"][0] += stats.accepted
                totals["bundle"][1] += stats.drafted
            if self.ref.assistant is not None:
                candidates["transformers assisted"] = self.ref.greedy(ids, max_tokens, stops, assisted=True)
            if torch_backend is not None:
                from ..runtime.speculative import generate_tokens

                tokens, stats = generate_tokens(torch_backend, ids, max_tokens=max_tokens, stop_tokens=stops,
                                                mtp=torch_backend.has_drafter)
                candidates["PyTorch modules (MTP)"] = tokens
                totals["pytorch"][0] += stats.accepted
                totals["pytorch"][1] += stats.drafted
            for name, tokens in candidates.items():
                bundle_run = name.startswith("bundle")
                self._compare_tokens(f"prompt {i + 1}: {name}", ids, tokens, truth, bundle_run)
            if self.backend.has_drafter:
                self._mtp_vs_plain(f"prompt {i + 1}: bundle MTP vs no MTP", ids, candidates["bundle (MTP)"], plain)
            self._engine_rows(i, plain, engine_texts)
        self._acceptance(totals)

    def _engine_rows(self, i: int, plain: list[int], engine_texts: dict | None) -> None:
        """Another runtime on the same graphs must print our plain text (without the stop token; LiteRT-LM's MTP loop
        may overshoot max tokens by a few)."""
        stops = self.model.tokenizer.stop_tokens
        want = self.model.tokenizer.decode([t for t in plain if t not in stops])
        for engine, texts in (engine_texts or {}).items():
            got = texts[i]
            ok = got.startswith(want)
            self.add("greedy", f"prompt {i + 1}: {engine}", {}, ok,
                     ("identical text" if got == want else "identical text, then the runtime's overshoot")
                     if ok else f"differs: {got[:40]!r} vs {want[:40]!r}", OWN_PLAIN, "the same text")

    def engine_rows(self, prompts: list[list[int]], max_tokens: int, engine_texts: dict) -> None:
        """Engine rows against the bundle's own plain decoding of each prompt."""
        for i, ids in enumerate(prompts):
            self._engine_rows(i, list(self.model.generate(ids, max_tokens=max_tokens, mtp=False)), engine_texts)

    def streamed(self, prompts: list[list[int]], max_tokens: int, target_dir: Path, assistant_dir,
                 on_stage: Callable[[str], None]) -> None:
        """A checkpoint too large for transformers in fp32: the graphs against the streamed PyTorch reference (our
        modules, compared with transformers on every preset in the tests), one layer in memory at a time, along the
        bundle's own greedy continuations; and MTP against plain on the bundle."""
        from ..export.bundle_check import bundle_report
        from ..model.loading import TargetCheckpoint, load_drafter

        source = TargetCheckpoint(target_dir)
        drafter = load_drafter(assistant_dir, source.spec) if assistant_dir and self.backend.has_drafter else None
        got = bundle_report(lambda: self.backend, source, drafter, self.contract, prompts, max_tokens, on_stage)
        reference = "streamed PyTorch fp32 (our modules; the checkpoint is too large for transformers in memory)"
        limits = self.limits("target")
        passed = got["logit_relative_error"] <= limits.max_relative_error and (
            self.quantized or got["top1_agreement"] >= limits.min_top1_agreement)
        self.add("graph", "target: teacher-forced logits along the bundle's greedy continuations",
                 {k: got[k] for k in ("logit_relative_error", "top1_agreement")}, passed,
                 f"rel. error {got['logit_relative_error']:.2e}, top-1 {got['top1_agreement']:.3f}", reference,
                 f"rel. error <= {limits.max_relative_error:.2e} ({limits.why})")
        if "drafter_top1_agreement" in got:
            limits = self.limits("drafter")
            agreement = got["drafter_top1_agreement"]
            self.add("graph", "drafter: first drafted token on identical inputs", {"drafted_token_agreement": agreement},
                     agreement >= limits.min_top1_agreement, f"same drafted token {agreement:.3f}", reference,
                     f"agreement >= {limits.min_top1_agreement:.2f} ({limits.why})")
        on_stage("comparing MTP with plain decoding")
        for i, ids in enumerate(prompts):
            plain = list(self.model.generate(ids, max_tokens=max_tokens, mtp=False))
            if self.backend.has_drafter:
                mtp = list(self.model.generate(ids, max_tokens=max_tokens))
                self._mtp_vs_plain(f"prompt {i + 1}: bundle MTP vs no MTP", ids, mtp, plain)

    def _tie_limit(self, scale: float, quantization: bool = True) -> tuple[float, str]:
        """The top-2 gap under which a divergence is a tie: the bundle's measured logit noise where its quantization
        can explain it, else float rounding of the largest logit (`scale`)."""
        if quantization and self.quantized:
            return NOISE_MARGIN * self.logit_noise, (f"top-2 gap <= {NOISE_MARGIN:g} x the bundle's measured logit "
                                                     f"noise ({self.logit_noise:.2e})")
        return self.t.tie_tolerance * scale, f"top-2 gap <= {self.t.tie_tolerance:g} x the largest logit"

    def _compare_tokens(self, subject: str, prompt: list[int], got: list[int], truth: list[int],
                        bundle_run: bool) -> None:
        n = min(len(got), len(truth))
        pos = next((j for j in range(n) if got[j] != truth[j]), None)
        if pos is None and len(got) == len(truth):
            self.add("greedy", subject, {"tokens": len(got)}, True, f"{len(got)} tokens identical to transformers",
                     TRANSFORMERS, "identical tokens")
            return
        pos = n if pos is None else pos
        gap = self.ref.top2_gap(prompt + truth[:pos])
        scale = float(np.abs(self.ref.forward(prompt + truth[:pos])["logits"][-1]).max()) or 1.0
        limit, why = self._tie_limit(scale, quantization=bundle_run)
        tie = gap <= limit
        kind = ("a quantization tie" if self.quantized and bundle_run else "a near-tie, not a bug") if tie \
            else "a real difference"
        self.add("greedy", subject, {"diverges_at": pos, "top2_gap": gap, "tie_limit": limit}, tie,
                 f"diverges at token {pos} where the top-2 gap is {gap:.2e}: {kind}", TRANSFORMERS,
                 f"identical tokens, or a divergence with {why}")

    def _mtp_vs_plain(self, subject: str, prompt: list[int], mtp: list[int], plain: list[int]) -> None:
        """MTP must not change the bundle's own greedy tokens; every divergence is reported with the plain run's top-2
        gap there (runtime.divergence). An fp32 bundle's verify rows give the bits of a decode at their position, so
        it may not diverge at all; a quantized one passes a divergence only as a quantization tie."""
        from ..runtime.divergence import divergences

        if mtp == plain:
            self.add("greedy", subject, {"tokens": len(plain)}, True, f"{len(plain)} tokens identical", OWN_PLAIN,
                     "identical tokens" if self.quantized else STRICT_MTP)
            return
        found = divergences(self.backend, prompt, len(plain), stop_tokens=self.model.tokenizer.stop_tokens)
        limit, why = self._tie_limit(1.0) if self.quantized else (0.0, "")
        self.add("greedy", subject, {"divergences": [d.to_dict() for d in found], "tie_limit": limit},
                 self.quantized and bool(found) and all(d.top2_gap <= limit for d in found),
                 "MTP diverges at " + ", ".join(f"token {d.token} (top-2 gap {d.top2_gap:.2e})" for d in found)
                 if found else f"MTP gives {len(mtp)} tokens where plain decoding gives {len(plain)}",
                 OWN_PLAIN, f"identical tokens, or divergences with {why}" if self.quantized else STRICT_MTP)

    # -- chat -------------------------------------------------------------------------------------------------

    def chat(self, bundle: Path, target_dir: Path, max_tokens: int, use_litert_lm: bool) -> None:
        """The bundle's chat template vs the checkpoint's in transformers, byte for byte on every conversation; then
        one conversation through LiteRT-LM's Conversation API, MTP on and off, vs our loop on the same prompt."""
        from ..checkpoint.chat_template import CONVERSATIONS, checkpoint_specials, litertlm_conversations, references
        from ..export.pipeline import tokenizer_and_metadata

        stored = self.model.tokenizer.chat_template
        original = tokenizer_and_metadata(target_dir)[1].chat_template if (target_dir / "tokenizer.json").is_file() else None
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
                     reference=OWN_PLAIN, criterion="the same text from the same prompt", detail=
                     f"same text ({len(tokens)} tokens) from the same {len(ids)}-token prompt" if ok else
                     f"differs: {(reply.reply or reply.error or '')[:40]!r} vs {text[:40]!r}, conversation length "
                     f"{reply.token_count} for a {len(ids)}-token prompt")

    def _same_renderings(self, who: str, got: dict[str, str], want: dict[str, str]) -> None:
        """One check: `who` renders every conversation exactly as transformers does."""
        from ..checkpoint.chat_template import first_difference

        bad = next((n for n in want if got[n] != want[n]), None)
        self.add("chat", f"template: {who} vs transformers", {"conversations": len(want)}, bad is None,
                 reference="transformers' rendering of the checkpoint's template", criterion="byte-identical",
                 detail=
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
                 reference="our PyTorch modules of the checkpoints (MTP)",
                 criterion=f"acceptance >= {self.t.min_acceptance_ratio:g} x the PyTorch drafter's",
                 detail=
                 f"{bundle:.3f} vs {pytorch:.3f} accepted/drafted"
                 + ("" if meaningful else " (PyTorch drafter too weak to compare)")
                 + ("" if ok else ": the exported drafter lost its acceptance (wrong KV wiring or quantization)"))


def validate(bundle: str | Path, target_dir: str | Path | None = None, assistant_dir: str | Path | None = None,
             prompts: list[str] | None = None, max_tokens: int = 24, thresholds: Thresholds = Thresholds(),
             use_litert_lm: bool = True, on_stage: Callable[[str], None] = lambda s: None,
             weights_only: bool = False) -> Report:
    """Validate a bundle; raises EdgeMtpError for unusable input, returns a Report with a verdict otherwise.

    `weights_only`: only the byte-for-byte weights rows: seconds where the rest takes minutes, and exact
    at every recipe, but blind to what the graphs compute with those weights."""
    bundle = Path(bundle)
    on_stage("loading the bundle")
    model = load(bundle)
    manifest = _manifest(bundle)
    manifest_source = manifest.get("source") or {}
    target_dir = target_dir or manifest_source.get("target")
    assistant_dir = assistant_dir or manifest_source.get("assistant")
    if target_dir is None:
        raise EdgeMtpError("Pass --target (and --assistant): the original checkpoints to validate against.")
    streamed = weights_only or not _transformers_fit(resolve_checkpoint(target_dir))
    ref = None
    if not streamed:
        on_stage("loading the originals with transformers")
        ref = TransformersPair(target_dir, assistant_dir if model.backend.has_drafter else None)
    report = Report(str(bundle), thresholds)
    v = _Validator(model, ref, thresholds, report, recorded_costs(manifest))
    ids = [model.tokenizer.encode(p) for p in (prompts or DEFAULT_PROMPTS)]
    if not weights_only and any(len(i) + max_tokens >= model.contract.context for i in ids):
        raise EdgeMtpError(f"A prompt plus {max_tokens} tokens exceeds the bundle's context {model.contract.context}.")
    on_stage("comparing every weight with the checkpoint")
    v.weights(bundle, resolve_checkpoint(target_dir), assistant_dir)
    if weights_only:
        return report
    if streamed:
        v.streamed(ids, max_tokens, resolve_checkpoint(target_dir), assistant_dir, on_stage)
        if use_litert_lm and bundle.suffix == ".litertlm" and model.backend.has_drafter:
            on_stage("running LiteRT-LM")
            from ..runtime.litertlm_engine import run_litertlm

            texts = run_litertlm(bundle, prompts or DEFAULT_PROMPTS, max_tokens, model.contract.context).texts
            v.engine_rows(ids, max_tokens, {"LiteRT-LM (MTP)": texts})
        return report
    on_stage("comparing every graph with transformers")
    v.graphs(ids)
    torch_backend = None
    if assistant_dir is not None and model.backend.has_drafter:
        from ..model.loading import load_drafter, load_target
        from ..runtime.backends.torch import TorchBackend

        models = load_target(target_dir)
        torch_backend = TorchBackend(models, load_drafter(assistant_dir, models.spec), model.contract)
    engine_texts = None
    if use_litert_lm and bundle.suffix == ".litertlm" and model.backend.has_drafter:
        on_stage("running LiteRT-LM")
        from ..runtime.litertlm_engine import run_litertlm

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
    from ..checkpoint.chat_template import render

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
    from ..runtime.backends.litert import vulkan_devices

    devices = vulkan_devices()
    return isinstance(devices, list) and bool(devices)


def _transformers_fit(target_dir: Path) -> bool:
    """Whether transformers can hold the target in fp32 (twice, for its forward pass) in the memory available now."""
    from ..checkpoint.layout import parameter_count, target_tensors
    from ..util.memory import available_bytes
    from ..checkpoint.spec import read_config, target_spec_from_config

    spec = target_spec_from_config(read_config(target_dir), where=str(target_dir / "config.json"))
    return 2 * 4 * parameter_count(target_tensors(spec)) < available_bytes()


def _manifest(bundle: Path) -> dict:
    if bundle.suffix == ".litertlm":
        from ..bundle.litertlm import read_litertlm

        return read_litertlm(bundle).manifest
    manifest = bundle / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def recorded_costs(manifest: dict) -> dict:
    """What the bundle's recipe cost at export, from its manifest: the recipe, each component's recipe and
    quantization error, and the logit error and top-1 agreement against the fp32 reference."""
    report = manifest.get("quantization_report") or {}
    components = report.get("components") or {}

    def error(record: dict) -> float | None:
        errors = [record.get("quantization_error")] + [p.get("quantization_error")
                                                       for p in (record.get("pieces") or {}).values()]
        errors = [e for e in errors if e is not None]
        return max(errors) if errors else None

    recipes = {name: record.get("recipe", "fp32") for name, record in components.items()}
    recipes |= {piece: part["recipe"] for record in components.values()  # the pieces of an ONNX model
                for piece, part in (record.get("pieces") or {}).items() if "recipe" in part}
    recipe = manifest.get("quantization", "fp32")
    if recipe == "fp32" and any(r != "fp32" for r in recipes.values()):
        recipe = "mixed"
    return {"recipe": recipe, "recipes": recipes,
            "components": {name: e for name, record in components.items() if (e := error(record)) is not None},
            "logit_relative_error": report.get("logit_relative_error"), "top1_agreement": report.get("top1_agreement"),
            "drafter_top1_agreement": report.get("drafter_top1_agreement"),
            "kv_dtype": manifest.get("kv_dtype", "float32")}


def _decision(got: np.ndarray, want: np.ndarray) -> tuple[bool, float]:
    """(same drafted token, overlap of the scored candidates) of one draft step; a centroid head gives every token
    outside its chosen clusters the same fill value below all scores, so the candidates are the tokens above it."""
    def candidates(logits: np.ndarray) -> set[int]:
        low = logits.min()
        scored = np.flatnonzero(logits > low)
        return set(scored.tolist()) if 0 < len(scored) < len(logits) - 1 else set()

    mine, theirs = candidates(got), candidates(want)
    overlap = len(mine & theirs) / len(mine | theirs) if mine | theirs else 1.0
    return int(np.argmax(got)) == int(np.argmax(want)), overlap
