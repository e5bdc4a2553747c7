"""Native libraries (LiteRT, LiteRT-LM, XNNPACK, torchao, the converter) print INFO/WARNING lines straight to file
descriptors 1 and 2. `native_output_captured` points those descriptors at a temporary file for the duration of a
command while Python's own sys.stdout / sys.stderr keep writing to the terminal (or pipe), so click's output,
progress bars and the final `error:` line stay visible and a `--json` stdout holds nothing but JSON.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from typing import Iterator

VERBOSE_ENV = "EDGE_MTP_VERBOSE"
REPLAY_LINES = 40  # after an unexpected failure (a bug, not a user error), the last native lines are shown


def verbose_requested() -> bool:
    """Whether the environment asks for native-library output (EDGE_MTP_VERBOSE set to anything but 0/empty)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _own_stream(stream, fd: int, saved: int):
    """A text stream on the saved descriptor standing in for `stream`, if `stream` writes to `fd`; else None."""
    try:
        if stream.fileno() != fd:
            return None
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None  # not backed by the descriptor (e.g. click's test runner): leave it alone
    return io.TextIOWrapper(os.fdopen(saved, "wb", buffering=0, closefd=False), encoding=stream.encoding,
                            errors=getattr(stream, "errors", "strict"), line_buffering=True, write_through=True)


@contextmanager
def native_output_captured(verbose: bool = False) -> Iterator[None]:
    """Send what native code writes to fds 1 and 2 to a temporary file; Python's own output still gets through.

    On an exception other than EdgeMtpError (a bug), the last captured lines are written to stderr before the
    traceback, since they may explain it. With `verbose` nothing is captured.
    """
    if verbose:
        yield
        return
    from .errors import EdgeMtpError

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    swapped = {name: _own_stream(getattr(sys, name), fd, saved[fd]) for name, fd in (("stdout", 1), ("stderr", 2))}
    originals = {name: getattr(sys, name) for name in swapped}
    sink = tempfile.TemporaryFile()
    for fd in (1, 2):
        os.dup2(sink.fileno(), fd)
    for name, stream in swapped.items():
        if stream is not None:
            setattr(sys, name, stream)
    if any(swapped.values()):  # a real process: native destructors also print at interpreter exit
        atexit.register(_silence_native_exit)
    try:
        with warnings.catch_warnings(), _python_loggers_quiet():
            warnings.simplefilter("ignore")
            yield
    except EdgeMtpError:
        raise
    except BaseException as e:
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines()[-REPLAY_LINES:]
            if lines:
                sys.stderr.write("native library output before the failure:\n" + "\n".join(lines) + "\n")
        raise
    finally:
        for name, stream in swapped.items():
            if stream is not None:
                stream.flush()
                setattr(sys, name, originals[name])
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        sink.close()


def _silence_native_exit() -> None:
    """At exit, after Python's last output is flushed, point fds 1 and 2 at /dev/null (C++ teardown chatter)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


@contextmanager
def _python_loggers_quiet() -> Iterator[None]:
    """Library loggers (absl, the converter, transformers) below ERROR are dropped; edge-mtp's own stay."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    ours = logging.getLogger("edge_mtp")
    ours_previous = ours.level
    ours.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(previous)
        ours.setLevel(ours_previous)


@contextmanager
def converter_output_quiet() -> Iterator[None]:
    """Converters and quantizers (litert_torch, the ONNX dynamo exporter, ai-edge-quantizer) print progress trees,
    bars, warnings and logs from Python for every stage: all of it is dropped while they run."""
    loggers = [logging.root, logging.getLogger("torch.onnx"), logging.getLogger("onnxscript")]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, previous):
                lg.setLevel(level)
