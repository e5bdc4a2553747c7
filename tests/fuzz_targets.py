"""Fuzz targets: every reader of untrusted bytes, with Hypothesis strategies that mutate a valid input.

Each target writes its input into a fresh folder and runs the reader as edge-mtp does. The contract, checked by
`run_guarded`: only EdgeMtpError escapes, no input takes longer than a second, and nothing is written, created,
renamed or removed outside that folder (watched with a Python audit hook).
Used by tests/test_fuzz.py (a few thousand inputs per reader) and scripts/fuzz_readers.py (100k+).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from hypothesis import strategies as st

from edge_mtp.util.errors import EdgeMtpError

SECONDS_PER_INPUT = 1.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATING_EVENTS = {"os.remove", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.symlink",
                    "os.link", "os.truncate", "os.chmod"}


class Hang(Exception):
    """An input took longer than SECONDS_PER_INPUT."""


class _Watch:
    """Audit-hook state: while `folder` is set, writes outside it are recorded in `outside`."""

    folder: str | None = None
    outside: list[str] = []
    hung = False  # set by the timer even where the Hang exception itself is swallowed (e.g. in a gc callback)


def _audit(event: str, args: tuple) -> None:
    if _Watch.folder is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
        if not writing or isinstance(path, int):
            return
    elif event not in _MUTATING_EVENTS:
        return
    else:
        path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        full = os.path.realpath(os.fsdecode(path))
        if not full.startswith(_Watch.folder + os.sep) and full != _Watch.folder:
            _Watch.outside.append(f"{event} {full}")


sys.addaudithook(_audit)


def _on_alarm(signum, frame):
    _Watch.hung = True
    raise Hang(f"an input took longer than {SECONDS_PER_INPUT} s")


def _attempt(reader: Callable[[Path, Any], None], value: Any) -> tuple[bool, list[str]]:
    """Run `reader` once in a fresh folder; return (hung, writes outside the folder)."""
    folder = Path(tempfile.mkdtemp(prefix="edge-mtp-fuzz-")).resolve()
    previous = signal.signal(signal.SIGPROF, _on_alarm)
    _Watch.folder, _Watch.outside, _Watch.hung = str(folder), [], False
    signal.setitimer(signal.ITIMER_PROF, SECONDS_PER_INPUT)  # CPU time: a loaded machine must not fake a hang
    try:
        reader(folder, value)
    except (EdgeMtpError, Hang):
        pass
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        _Watch.folder = None
        shutil.rmtree(folder, ignore_errors=True)
    return _Watch.hung, list(_Watch.outside)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Everything alive before a fuzz run (a whole test session) is frozen out of the collector while it runs: a
    full collection over it costs seconds of CPU that belong to no input. Freezing once, not per input, so that the
    garbage inputs leave behind is still collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_guarded(reader: Callable[[Path, Any], None], value: Any) -> None:
    """Run one reader on one input; raise AssertionError if the contract is broken."""
    hung, outside = _attempt(reader, value)
    if hung:  # a real hang repeats; CPU spent by other threads of this process (ITIMER_PROF counts them) does not
        hung, outside = _attempt(reader, value)
    assert not hung, f"an input took longer than {SECONDS_PER_INPUT} s of CPU time, twice"
    assert not outside, f"wrote outside the input folder: {outside}"


# -- strategies ---------------------------------------------------------------------------------------------------

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                        st.sampled_from(["../../etc/passwd", "/etc/passwd", "tokenizer.json", "sliding", "full",
                                         "gemma4", "gemma4_text", "gemma4_assistant", "", "\x00"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts and lists."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated_json(draw, seed: Any) -> Any:
    """`seed` with a few values replaced by arbitrary JSON, or deleted (dict keys)."""
    value = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        if not path:
            value = draw(JSON_VALUES) if draw(st.integers(0, 9)) == 0 else value
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return value


@st.composite
def mutated_bytes(draw, seed: bytes, hot: int | None = None) -> bytes:
    """`seed` with a few bytes overwritten (most within the first `hot` bytes), maybe truncated or extended."""
    data = bytearray(seed)
    limit = min(len(data), hot or len(data))
    for _ in range(draw(st.integers(0, 8))):
        end = limit if draw(st.integers(0, 3)) else len(data)
        data[draw(st.integers(0, max(end - 1, 0)))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        del data[cut:]
    data += draw(st.binary(max_size=8))
    return bytes(data)


def json_text(strategy) -> st.SearchStrategy[bytes]:
    """JSON documents from `strategy`, sometimes with their text mutated too."""
    return strategy.flatmap(lambda v: st.one_of(
        st.just(json.dumps(v).encode()), mutated_bytes(json.dumps(v).encode())))


# -- readers ------------------------------------------------------------------------------------------------------

class Seeds:
    """Valid inputs every strategy starts from, made once per process in a private folder."""

    def __init__(self):
        from edge_mtp.checkpoint.hf_config import drafter_config, target_config
        from edge_mtp.checkpoint.spec import preset_pair
        from edge_mtp.checkpoint.char_tokenizer import write_char_tokenizer

        self.root = Path(tempfile.mkdtemp(prefix="edge-mtp-fuzz-seeds-"))
        target, drafter = preset_pair("tiny")
        write_char_tokenizer(self.root, target.vocab_size)
        self.tokenizer = (self.root / "tokenizer.json").read_text()
        self.target_config = target_config(target)
        self.multimodal_config = target_config(preset_pair("e2b")[0], multimodal=True)
        self.drafter_config = drafter_config(drafter)
        self.bundle = self._bundle()
        self.onnx_manifest = self._onnx_manifest(target, drafter)
        self.safetensors = self._safetensors()

    def _bundle(self) -> bytes:
        sys.path.insert(0, str(Path(__file__).parent))
        from bundle_tools import stand_in_bundle

        return stand_in_bundle(self.root / "seed.litertlm", self.root / "tokenizer.json").read_bytes()

    def _onnx_manifest(self, target, drafter) -> dict:
        from edge_mtp.model.contract import Contract
        from edge_mtp.bundle.onnx_folder import build_manifest, model_file

        folder = self.root / "onnx"
        folder.mkdir()
        models = {}
        for name in ("embedder", "per_layer_embedder", "target", "drafter"):
            (folder / model_file(name)).write_bytes(name.encode())
            models[name] = {"file": model_file(name)}
        shutil.copy(self.root / "tokenizer.json", folder / "tokenizer.json")
        tokenizer = {"file": "tokenizer.json", "bos": 2, "stop_tokens": [1], "chat_template": None}
        return build_manifest(Contract(target, drafter, 64, 3, (8,)), models, tokenizer, folder)

    def _safetensors(self) -> bytes:
        import torch
        from safetensors.torch import save

        return save({"model.norm.weight": torch.ones(4), "model.embed_tokens.weight": torch.zeros(3, 4,
                                                                                                   dtype=torch.bfloat16)})


def read_litertlm_bundle(folder: Path, data: bytes) -> None:
    """edge_mtp.bundle.open_bundle on a .litertlm file (what edge_mtp.load does before the native runtime):
    header, hashes, manifest, contract, tokenizer."""
    from edge_mtp.bundle import open_bundle

    path = folder / "model.litertlm"
    path.write_bytes(data)
    open_bundle(path).tokenizer.encode("Hello <pad> world")


def read_onnx_manifest(folder: Path, manifest: bytes) -> None:
    """edge_mtp.bundle.open_bundle on an ONNX bundle folder (what edge_mtp.load does before onnxruntime): manifest,
    file checks, contract, tokenizer."""
    from edge_mtp.bundle import open_bundle

    for name in ("embedder", "per_layer_embedder", "target", "drafter"):
        (folder / f"{name}.onnx").write_bytes(name.encode())
    shutil.copy(SEEDS.root / "tokenizer.json", folder / "tokenizer.json")
    (folder / "manifest.json").write_bytes(manifest)
    open_bundle(folder).tokenizer.encode("Hello <pad> world")


def read_checkpoint_config(folder: Path, config: bytes) -> None:
    """config.json of a target or assistant checkpoint, as export, distill and inspect read it."""
    from edge_mtp.checkpoint.spec import drafter_spec_from_config, read_config, target_spec_from_config

    (folder / "config.json").write_bytes(config)
    cfg = read_config(folder)
    if cfg.get("model_type") == "gemma4_assistant":
        drafter_spec_from_config(cfg, cfg.get("generation"), where="config.json")
    else:
        target_spec_from_config(cfg)


def read_tokenizer(folder: Path, value: tuple[bytes, str]) -> None:
    """A bundle's tokenizer.json and chat template, as the runtime uses them."""
    from edge_mtp.bundle.tokenizer import Tokenizer

    text, template = value
    try:
        decoded = text.decode()
    except UnicodeDecodeError:
        return  # both bundle formats decode the text first and report invalid UTF-8 themselves
    tokenizer = Tokenizer(decoded, 2, [1], template)
    ids = tokenizer.encode(tokenizer.chat("Hello <pad> world"))
    tokenizer.decode(ids)


def read_safetensors(folder: Path, data: bytes) -> None:
    """A checkpoint shard: the header, every tensor's shape and data."""
    from edge_mtp.checkpoint.reading import CheckpointReader

    (folder / "model.safetensors").write_bytes(data)
    reader = CheckpointReader(folder)
    for name in reader.names():
        reader.shape(name)
        reader.tensor(name)


SEEDS = Seeds()
TEMPLATE_SNIPPETS = st.sampled_from(["{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.content }}{% endfor %}",
                                     "{{ ''.__class__ }}", "{% for i in range(999999999) %}x{% endfor %}", "{{",
                                     "{% if %}", "{{ raise_exception('no') }}", "<start_of_turn>user\n"])


def targets() -> dict[str, tuple[Callable[[Path, Any], None], st.SearchStrategy]]:
    """Every reader with the strategy that feeds it."""
    return {
        "litertlm": (read_litertlm_bundle, mutated_bytes(SEEDS.bundle, hot=16384)),
        "onnx-manifest": (read_onnx_manifest, json_text(mutated_json(SEEDS.onnx_manifest))),
        "config": (read_checkpoint_config, json_text(st.one_of(
            mutated_json(SEEDS.target_config), mutated_json(SEEDS.multimodal_config),
            mutated_json(SEEDS.drafter_config), JSON_VALUES))),
        "tokenizer": (read_tokenizer, st.tuples(
            json_text(mutated_json(json.loads(SEEDS.tokenizer))),
            st.one_of(st.none(), TEMPLATE_SNIPPETS, st.text(max_size=40)))),
        "safetensors": (read_safetensors, st.one_of(mutated_bytes(SEEDS.safetensors, hot=200),
                                                    _safetensors_header())),
    }


def _safetensors_header() -> st.SearchStrategy[bytes]:
    """A well-framed safetensors file whose JSON header is mutated (offsets, dtypes, shapes)."""
    raw = SEEDS.safetensors
    size = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
    return mutated_json(header).map(lambda h: (lambda t: len(t).to_bytes(8, "little") + t + body)(
        json.dumps(h).encode()))
