"""The built-in demo pair: a small Gemma 4 target trained on Python's documentation and its distilled assistant.

Both are Hugging Face checkpoint directories, stored in bfloat16 (target/: Gemma4ForCausalLM, 5.5 M parameters,
hidden 256, 6 layers, 2048-token byte-level BPE tokenizer; assistant/: Gemma4AssistantForCausalLM, hidden 128, 4
layers, 128 token clusters). Rebuild them with scripts/make_demo_pair.py (seeded). Training text: CPython's
pydoc_data.topics and standard-library docstrings (PSF License 2.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

DEMO_DIR = Path(__file__).resolve().parent


def target_dir() -> Path:
    """Directory of the demo target checkpoint."""
    return DEMO_DIR / "target"


def assistant_dir() -> Path:
    """Directory of the demo assistant checkpoint."""
    return DEMO_DIR / "assistant"


def default_pair(say: Callable[[str], None] = lambda s: None) -> tuple[Path, Path]:
    """The pair commands use without --target: the demo pair, or where it is not shipped a synthetic tiny pair
    written once to the user cache (`say` tells which)."""
    if (target_dir() / "config.json").is_file() and (assistant_dir() / "config.json").is_file():
        return target_dir(), assistant_dir()
    from ..util.cache import cache_root
    from ..checkpoint.spec import preset_pair
    from ..checkpoint.synth import write_drafter, write_target

    cache = cache_root() / "synthetic-tiny"
    target, drafter = preset_pair("tiny")
    if not (cache / "target" / "config.json").is_file():
        write_target(cache / "target", target, seed=0)
    if not (cache / "assistant" / "config.json").is_file():
        write_drafter(cache / "assistant", drafter, target, seed=1)
    say(f"no demo pair shipped: using the synthetic tiny pair in {cache}")
    return cache / "target", cache / "assistant"


def default_bundle(say: Callable[[str], None] = lambda s: None) -> Path:
    """The bundle commands use without one: the default pair's, exported once into the user cache on first use."""
    from ..util.cache import cache_root
    from ..export.options import DEFAULT_PREFILL, DEMO_CONTEXT
    from ..export.pipeline import export_litert

    target, assistant = default_pair(say)
    bundle = cache_root() / f"demo-{target.parent.name}.litertlm"
    if not bundle.is_file():
        say(f"exporting the demo pair once to {bundle} ...")
        export_litert(target, assistant, bundle, context=DEMO_CONTEXT, prefill=DEFAULT_PREFILL)
    return bundle
