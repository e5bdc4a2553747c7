"""The default prompt set used to measure quality and speed when the user gives none, and the reader of a user's."""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeMtpError

DEFAULT_PROMPTS = ["The quick brown fox", "Once upon a time, in a small village,", "def fibonacci(n):",
                   "Speculative decoding makes phones faster because"]


def read_prompts(path: Path | None) -> list[str] | None:
    """The non-empty lines of a --prompts file (None without one)."""
    if path is None:
        return None
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeMtpError(f"--prompts {path} cannot be read as UTF-8 text ({type(e).__name__}); pass a text file "
                           "with one prompt per line.") from None
    if not lines:
        raise EdgeMtpError(f"--prompts {path} holds no prompt; write one prompt per line.")
    return lines
