"""The built-in demo pair: a small Gemma 4 target trained on Python's documentation and its distilled assistant.

Both are Hugging Face checkpoint directories, stored in bfloat16 (target/: Gemma4ForCausalLM, 5.5 M parameters,
hidden 256, 6 layers, 2048-token byte-level BPE tokenizer; assistant/: Gemma4AssistantForCausalLM, hidden 128, 4
layers, 128 token clusters). Rebuild them with scripts/make_demo_pair.py (seeded). Training text: CPython's
pydoc_data.topics and standard-library docstrings (PSF License 2.0).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent


def target_dir() -> Path:
    """Directory of the demo target checkpoint."""
    return DEMO_DIR / "target"


def assistant_dir() -> Path:
    """Directory of the demo assistant checkpoint."""
    return DEMO_DIR / "assistant"
