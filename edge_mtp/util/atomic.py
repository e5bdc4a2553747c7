"""Atomic writes: build next to the destination, rename into place only when complete (and let SIGTERM unwind
like Ctrl-C, so nothing half-written stays)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EdgeMtpError


def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a job scheduler) stops the process as Ctrl-C does, so temporary files and partial outputs are
    removed on the way out."""
    def interrupt(signum: int, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def writable_parent(path: Path) -> Path:
    """The folder that will hold `path`, created if needed; a clear error when it cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeMtpError(f"Cannot create output folder {parent}: {e.strerror}.") from None
    if not os.access(parent, os.W_OK):
        raise EdgeMtpError(f"Output folder {parent} is not writable; choose another --out.")
    return parent


def check_output(path: Path, folder: bool, option: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written (nothing is created here)."""
    if folder and path.exists() and not path.is_dir():
        raise EdgeMtpError(f"{option} {path} is a file; name a folder (new or empty) instead.")
    if not folder and path.is_dir():
        raise EdgeMtpError(f"{option} {path} is an existing folder; name a file inside it instead.")
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not parent.is_dir():
        raise EdgeMtpError(f"Cannot create output folder {path.parent} for {option} {path}: {parent} is a file, "
                           "not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        what = f"{option} {path} cannot be written" if parent == path.parent else \
            f"Cannot create output folder {path.parent} for {option} {path}"
        raise EdgeMtpError(f"{what}: {parent} is not writable; choose another location.")


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=writable_parent(path)))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it is renamed to `path`, on any error it is deleted."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=writable_parent(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
