"""Chat templates that LiteRT-LM renders exactly as transformers does.

LiteRT-LM 0.18.1 renders a bundle's template with its own Jinja engine (minijinja), which differs from transformers'
Jinja2 in ways that change the prompt: every message's content arrives as a list of parts
([{"type": "text", "text": ...}]) instead of a string, maps have no `.get`, strings have no Python methods such as
`.strip()`, `is none` is true for undefined values, and `bos_token`/`eos_token` are empty (the runtime prepends the start token itself). `fit_template` renders
a set of conversations with transformers and with LiteRT-LM on a bundle, and if they differ tries the adaptations
below, keeping the fewest that make every rendering byte-identical. Everything LiteRT-LM does here runs in a child
process, so its native log (which carries the renderer's error messages) can be read.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..util.errors import EdgeMtpError

Message = dict[str, Any]

# The conversations a template must render identically: single turn, multi-turn with model replies, a system turn
# (skipped when transformers refuses it: the template supports no system role). All end on a user turn and are
# rendered with the generation prompt, as LiteRT-LM's conversation renders every message.
CONVERSATIONS: dict[str, list[Message]] = {
    "single turn": [{"role": "user", "content": "What does the open() function return?"}],
    "multi-turn": [{"role": "user", "content": "Name a sorting function."},
                   {"role": "assistant", "content": "sorted() returns a new list."},
                   {"role": "user", "content": "And in place?"}],
    "system": [{"role": "system", "content": "Answer in one sentence."},
               {"role": "user", "content": "What is a generator?"},
               {"role": "assistant", "content": "A function that yields values lazily."},
               {"role": "user", "content": " Give an example. "}],
}
RUNTIME_SPECIALS = {"bos_token": "", "eos_token": ""}  # what LiteRT-LM passes; its start token is prepended as an id


def render(template: str, messages: list[Message], specials: dict[str, str] | None = None,
           add_generation_prompt: bool = True) -> str:
    """transformers' own rendering of `messages` (its sandboxed Jinja2 environment); EdgeMtpError if it fails."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            **(RUNTIME_SPECIALS if specials is None else specials))
        return rendered[0]
    except Exception as e:  # syntax and security errors, and whatever the template's own expressions raise
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise EdgeMtpError(f"The chat template cannot be rendered ({reason}); fix the template and re-export.") from None


def checkpoint_specials(directory: Path) -> dict[str, str]:
    """The special-token strings transformers passes to the checkpoint's chat template (its special_tokens_map)."""
    from transformers import AutoTokenizer

    try:
        return {k: v for k, v in AutoTokenizer.from_pretrained(str(directory)).special_tokens_map.items()
                if isinstance(v, str)}
    except Exception as e:  # transformers raises many kinds of errors for unusable tokenizer files
        raise EdgeMtpError(f"transformers cannot load the tokenizer in {directory} ({type(e).__name__}), which the "
                           "chat template check needs; copy the model's tokenizer files next to its weights.") from None


# -------------------------------------------------------------------------------------------------------------
# Adaptations: each turns a construct LiteRT-LM renders differently into one it renders as Jinja2 does.

# Content parts -> text: rebuilds `messages` with string contents (text parts joined) before the template runs.
_PARTS_TO_TEXT = (
    "{%- set _em = namespace(messages=[]) %}{% for _m in messages %}{% if _m['content'] is string %}"
    "{% set _em.messages = _em.messages + [_m] %}{% else %}{% set _et = namespace(text='') %}"
    "{% for _p in _m['content'] %}{% if _p['type'] == 'text' %}{% set _et.text = _et.text + _p['text'] %}{% endif %}"
    "{% endfor %}{% set _em.messages = _em.messages + [{'role': _m['role'], 'content': _et.text}] %}{% endif %}"
    "{% endfor %}{% set messages = _em.messages %}")
_OPERAND = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\[\]]+\])*"
_GET = re.compile(rf"({_OPERAND})\.get\(\s*('[^']*'|\"[^\"]*\")\s*(?:,\s*([^(),]+?))?\s*\)")
_STRING_METHODS = re.compile(rf"({_OPERAND})\.(strip|upper|lower|capitalize)\(\)")
_FILTERS = {"strip": "trim", "upper": "upper", "lower": "lower", "capitalize": "capitalize"}  # same results


def parts_to_text(template: str, specials: dict[str, str]) -> str:
    """Messages whose content is a list of parts see it as one string, as transformers' callers pass it."""
    return _PARTS_TO_TEXT + template


def map_methods(template: str, specials: dict[str, str]) -> str:
    """`m.get('k', d)` -> `(m['k'] if 'k' in m else d)`; `s.strip()`, `.upper()`, ... -> the equivalent filter."""
    template = _GET.sub(lambda g: f"({g[1]}[{g[2]}] if {g[2]} in {g[1]} else {g[3] or 'none'})", template)
    return _STRING_METHODS.sub(lambda g: f"({g[1]} | {_FILTERS[g[2]]})", template)


def none_tests(template: str, specials: dict[str, str]) -> str:
    """`x is none` / `x is not none` -> `x == none` / `x != none` (LiteRT-LM's `none` test is true for undefined)."""
    return re.sub(r"\bis\s+none\b", "== none", re.sub(r"\bis\s+not\s+none\b", "!= none", template))


def literal_specials(template: str, specials: dict[str, str]) -> str:
    """Special-token variables other than bos_token (which LiteRT-LM empties) become their literal text."""
    for name, text in specials.items():
        if name != "bos_token" and text:
            template = re.sub(rf"\b{name}\b", json.dumps(text), template)
    return template


ADAPTATIONS: dict[str, Callable[[str, dict[str, str]], str]] = {
    "content parts to text": parts_to_text, "map and string methods": map_methods,
    "none tests": none_tests, "special tokens as literals": literal_specials}


# -------------------------------------------------------------------------------------------------------------
# LiteRT-LM's side, in a child process

_CHILD = r"""
import json, os, sys, tempfile
import litert_lm
args = json.loads(sys.stdin.read())
out = []
def native_errors(call):
    # LiteRT-LM reports a template error only on fd 2 (and returns ''): read what the call writes there
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            value = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    errors = [ln.split("Failed to apply template: ", 1)[1] for ln in text.splitlines() if "Failed to apply template: " in ln]
    return value, (errors[-1] if errors else None)
with tempfile.TemporaryDirectory() as cache:
    engine = litert_lm.Engine(args["bundle"], backend=litert_lm.Backend.CPU(), max_num_tokens=args["context"],
                              enable_speculative_decoding=args["mtp"], cache_dir=cache)
    for job in args["jobs"]:
        conv = engine.create_conversation(messages=job["history"] or None, chat_template=job["template"],
                                          max_output_tokens=job["max_tokens"] or None,
                                          enable_speculative_decoding=args["mtp"])
        text, error = native_errors(lambda: conv.render_message_to_string(job["message"]))
        result = {"text": text, "error": error}
        if job["max_tokens"] and error is None:
            reply = conv.send_message(job["message"])
            result["reply"] = "".join(p.get("text", "") for p in reply.to_json()["content"])
            result["token_count"] = conv.token_count
        out.append(result)
        conv.close()
    print("EDGE_MTP_RESULT " + json.dumps(out), flush=True)
    engine.close()
"""


@dataclass
class Rendered:
    """LiteRT-LM's rendering of one conversation (and, when asked, its greedy reply and the conversation's length)."""

    text: str
    error: str | None = None
    reply: str | None = None
    token_count: int | None = None


def litertlm_conversations(bundle: Path, context: int, jobs: list[tuple[str | None, list[Message], int]],
                           mtp: bool = False, timeout: float = 600) -> list[Rendered]:
    """For each (template or None for the bundle's own, conversation, max reply tokens): LiteRT-LM's rendering of
    the last message after the others, and with max reply tokens > 0 its reply through Conversation.send_message."""
    try:
        import litert_lm  # noqa: F401
    except ImportError:
        raise EdgeMtpError("LiteRT-LM is not installed: pip install litert-lm-api.") from None
    args = {"bundle": str(bundle), "context": context, "mtp": mtp,
            "jobs": [{"template": t, "history": conv[:-1], "message": conv[-1], "max_tokens": n} for t, conv, n in jobs]}
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(args), capture_output=True, text=True,
                          timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EDGE_MTP_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise EdgeMtpError(f"LiteRT-LM could not open {bundle} to render its chat template (exit {proc.returncode}): "
                           f"{tail[-300:]}")
    return [Rendered(**r) for r in json.loads(line.split(" ", 1)[1])]


# -------------------------------------------------------------------------------------------------------------
# Fitting a template


@dataclass
class TemplateFit:
    """The template to store in a bundle and how it was checked (recorded in the manifest)."""

    template: str | None
    status: str  # "none" (no template), "identical", "adapted" or "mismatch allowed"
    adaptations: list[str] = field(default_factory=list)
    conversations: list[str] = field(default_factory=list)  # the ones compared
    mismatch: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (the template itself is in the LLM metadata)."""
        return {"status": self.status, "adaptations": self.adaptations, "conversations": self.conversations,
                "mismatch": self.mismatch}


def references(template: str, specials: dict[str, str]) -> dict[str, str]:
    """transformers' rendering of every conversation the template supports (it must support a single turn)."""
    out = {}
    for name, conv in CONVERSATIONS.items():
        try:
            out[name] = render(template, conv, specials)
        except EdgeMtpError:
            if name == "single turn":
                raise
    return out


def difference(name: str, want: str, got: Rendered, bos: str) -> str | None:
    """Why LiteRT-LM's rendering of a conversation differs from transformers' (None when identical)."""
    if got.error is not None:
        return f"LiteRT-LM cannot render it: {got.error}"
    if not want.startswith(bos):
        return "the template does not begin with bos_token, yet LiteRT-LM always starts with the start token"
    return None if got.text == want[len(bos):] else f"the {name} conversation {first_difference(want[len(bos):], got.text)}"


def first_difference(want: str, got: str) -> str:
    """Where a rendering parts from transformers', in words."""
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"differs from character {at}: transformers has {want[at:at + 40]!r}, the runtime {got[at:at + 40]!r}"


def fit_template(template: str | None, specials: dict[str, str], host: Path, context: int,
                 allow_mismatch: bool = False) -> TemplateFit:
    """The template (as is, or with the fewest adaptations) whose LiteRT-LM rendering on the bundle `host` equals
    transformers' on every conversation and whose runtime rendering (Jinja2, empty specials) agrees too."""
    if not template:
        return TemplateFit(None, "none")
    want = references(template, specials)
    bos = specials.get("bos_token") or ""
    names = list(ADAPTATIONS)
    candidates = []
    for size in range(len(names) + 1):
        for chosen in itertools.combinations(names, size):
            adapted = template
            for name in chosen:
                adapted = ADAPTATIONS[name](adapted, specials)
            if adapted != template or not chosen:
                candidates.append((list(chosen), adapted))
    rendered = litertlm_conversations(host, context, [(t, CONVERSATIONS[n], 0) for _, t in candidates for n in want])
    first_problem = None
    for i, (chosen, adapted) in enumerate(candidates):
        got = dict(zip(want, rendered[i * len(want):(i + 1) * len(want)]))
        problems = [p for n in want if (p := difference(n, want[n], got[n], bos))]
        if not problems:
            problems = [f"edge-mtp's runtime renders the {n} conversation differently" for n in want
                        if render(adapted, CONVERSATIONS[n], RUNTIME_SPECIALS) != want[n][len(bos):]]
        if not problems:
            return TemplateFit(adapted, "adapted" if chosen else "identical", chosen, list(want))
        first_problem = first_problem or problems[0]
        last_problem = problems[0]
    if allow_mismatch:
        return TemplateFit(template, "mismatch allowed", [], list(want), first_problem)
    raise EdgeMtpError(f"The chat template does not render in LiteRT-LM as in transformers, even adapted: "
                       f"{last_problem}; change the template, or pass --allow-template-mismatch to export it anyway.")
