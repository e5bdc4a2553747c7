"""`edge_mtp.load(path)`: a bundle (or checkpoints) behind one streaming generate API, with statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from ..bundle import ONNX, Bundle, open_bundle
from ..bundle.tokenizer import Tokenizer
from ..model.contract import Contract
from ..util.errors import EdgeMtpError
from .backends.base import Backend
from .sampling import SamplingConfig
from .speculative import SpeculativeDecoder, Stats

BACKENDS = ("litert", "onnx", "torch")


def check_generation(max_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Refuse generation options outside their meaning (cheap; callers run it before loading any model)."""
    if max_tokens < 1:
        raise EdgeMtpError(f"Max tokens (--max-tokens) must be at least 1, not {max_tokens}.")
    if not 0.0 <= temperature < float("inf"):
        raise EdgeMtpError(f"Temperature must be 0 (greedy) or positive, not {temperature}.")
    if top_k < 0:
        raise EdgeMtpError(f"Top-k must be 0 (off) or a positive number of tokens, not {top_k}.")
    if not 0.0 < top_p <= 1.0:
        raise EdgeMtpError(f"Top-p must be in (0, 1], not {top_p}.")


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Every prompt id must be a token of the model's vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise EdgeMtpError(f"Prompt token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}); pass ids "
                           "the bundle's tokenizer produces.")


class Model:
    """A loaded bundle: `generate` streams token ids; `last_stats` holds the statistics of the last call."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer):
        self.backend, self.tokenizer = backend, tokenizer
        self.decoder = SpeculativeDecoder(backend)
        self.last_stats = Stats()

    @property
    def contract(self) -> Contract:
        return self.backend.contract

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, draft_len: int | None = None,
                 mtp: bool = True, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False) -> Iterator[int]:
        """Yield generated token ids as they are accepted (greedy by default; exact speculative sampling otherwise)."""
        check_generation(max_tokens, temperature, top_k, top_p)
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(self.tokenizer.chat(prompt) if chat else prompt)
        check_prompt_ids(prompt, self.contract.target.vocab_size)
        self.last_stats = Stats()
        yield from self.decoder.generate(list(prompt), max_tokens=max_tokens, draft_len=draft_len,
                                         mtp=mtp and self.backend.has_drafter,
                                         sampling=SamplingConfig(temperature, top_k, top_p, seed),
                                         stop_tokens=self.tokenizer.stop_tokens, stats=self.last_stats)


def _torch_backend(bundle: Bundle) -> Backend:
    """Our PyTorch modules on the checkpoints the bundle was exported from, under the bundle's contract."""
    from ..model.loading import load_drafter, load_target
    from .backends.torch import TorchBackend

    source = bundle.manifest.get("source") or {}
    if not isinstance(source.get("target"), str) or not Path(source["target"]).is_dir():
        raise EdgeMtpError(f"The checkpoints {bundle.path} was exported from are not on this machine; the torch "
                           "backend needs them (use --backend litert).")
    models = load_target(source["target"])
    drafter = load_drafter(source["assistant"], models.spec) if source.get("assistant") else None
    return TorchBackend(models, drafter, bundle.contract)


def load(path: str | Path, backend: str | None = None, accelerator: str = "cpu", verify: bool = True) -> Model:
    """Open a .litertlm bundle or ONNX bundle folder for generation.

    With `verify` (the default) every section or file is checked against the sha256 recorded at export before
    any of it reaches a native runtime; pass False to skip the hashing on bundles you trust.
    """
    if backend not in (None, *BACKENDS):
        raise EdgeMtpError(f"Unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    path = Path(path)
    if path.suffix == ".litertlm" and backend == "onnx":
        raise EdgeMtpError(f"{path} is a LiteRT bundle; run it with --backend litert (or torch).")
    if path.is_dir() and backend not in (None, "onnx"):
        raise EdgeMtpError(f"{path} is an ONNX bundle folder; run it with --backend onnx.")
    bundle = open_bundle(path, verify=verify)
    if bundle.format == ONNX:
        from .backends.ort import OnnxBackend

        return Model(OnnxBackend(path, provider=accelerator, verify=False), bundle.tokenizer)  # verified above
    if backend == "torch":
        return Model(_torch_backend(bundle), bundle.tokenizer)
    from .backends.litert import LiteRTBackend

    return Model(LiteRTBackend(path, accelerator), bundle.tokenizer)
