"""Native libraries (LiteRT, LiteRT-LM, XNNPACK, torchao, the converter) print INFO/WARNING lines straight to file
descriptors 1 and 2, and Python libraries (onnxruntime's quantizers, ai-edge-quantizer, transformers, torch,
huggingface_hub, absl) log through their own handlers. `native_output_captured` points those descriptors at a
temporary file for the duration of a command, and sends the libraries' log records (WARNING and above) and Python
warnings there too, while Python's own sys.stdout / sys.stderr keep writing to the terminal (or pipe): click's output,
progress bars, edge-mtp's own warnings and the final `error:` line stay visible and a `--json` stdout holds nothing
but JSON.
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
REPLAY_LINES = 40  # after an unexpected failure (a bug, not a user error), the last captured lines are shown
OURS = "edge_mtp"
# tqdm and huggingface_hub read these once, on import (mid-command): transformers' "Loading weights" bars and the like
PROGRESS_BARS_OFF = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Library warnings that describe the bundle a user gets: (logger, fragment of the message) -> one line of ours.
NOTICES = {
    ("onnxruntime.quantization.matmul_nbits_quantizer", "opset 21"):
        "edge-mtp: the int4 graphs are ONNX opset 21, which onnxruntime's 4-bit quantizer needs; the app's ONNX "
        "Runtime must be 1.18 or newer.",
}


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

    On an exception other than EdgeMtpError (a bug), the last captured lines (log records included) are written to
    stderr before the traceback, since they may explain it. With `verbose` nothing is captured.
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
        with _library_logs_captured(), _library_progress_bars_off():
            yield
    except EdgeMtpError:
        raise
    except BaseException as e:
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines()[-REPLAY_LINES:]
            if lines:
                sys.stderr.write("library output before the failure:\n" + "\n".join(lines) + "\n")
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


class _CaptureHandler(logging.Handler):
    """Writes a record to file descriptor 2, which is the capture file while a command runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(name)s [%(levelname)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(2, (self.format(record) + "\n").encode(errors="replace"))
        except Exception:  # a log line must never break the command
            pass


def _notice(record: logging.LogRecord) -> str | None:
    """Our one-line version of a library warning that the user must see, if `record` is one."""
    try:
        message = record.getMessage()
    except Exception:  # a record whose arguments do not fit its format string: not one of ours to translate
        return None
    return next((line for (name, fragment), line in NOTICES.items() if record.name == name and fragment in message),
                None)


@contextmanager
def _library_logs_captured() -> Iterator[None]:
    """Library log records of WARNING and above, and Python warnings, go to the capture file; lower levels are
    dropped; edge-mtp's own warnings are printed as plain lines.

    Libraries attach their own stderr handlers and turn propagation off when first imported, which happens
    mid-command (transformers, huggingface_hub, torch), and onnxruntime's 4-bit quantizer calls logging.basicConfig
    at INFO on import, so records are routed at the one step every logger takes, Logger.callHandlers, rather than
    by re-wiring handlers that do not exist yet when the command starts.
    """
    capture, shown = _CaptureHandler(), set()
    call_handlers = logging.Logger.callHandlers

    def route(logger: logging.Logger, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            return
        if record.name == OURS or record.name.startswith(OURS + "."):
            (logging.lastResort or capture).handle(record)  # the message alone, on the current sys.stderr
            return
        capture.handle(record)
        notice = _notice(record)
        if notice and notice not in shown:
            shown.add(notice)
            sys.stderr.write(notice + "\n")

    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.WARNING)
    root.addHandler(capture)  # a handler on the root turns the libraries' logging.basicConfig calls into no-ops
    logging.Logger.callHandlers = route
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        logging.Logger.callHandlers = call_handlers
        root.removeHandler(capture)
        root.setLevel(previous)


@contextmanager
def _library_progress_bars_off() -> Iterator[None]:
    """Libraries imported while this runs draw no progress bars (unless the environment already says otherwise)."""
    added = {name: value for name, value in PROGRESS_BARS_OFF.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


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
