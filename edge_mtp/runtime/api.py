"""`edge_mtp.load(path)`: a bundle (or checkpoints) behind one streaming generate API, with statistics."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator, Sequence

from ..contract import Contract
from ..errors import EdgeMtpError
from .backends.base import Backend
from .sampling import SamplingConfig
from .speculative import SpeculativeDecoder, Stats

BACKENDS = ("litert", "onnx", "torch")


class Tokenizer:
    """Text <-> ids with the bundle's Hugging Face tokenizer (bos prepended as LiteRT-LM does)."""

    def __init__(self, tokenizer_json: str, bos: int, stop_tokens: Sequence[int], chat_template: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)
        self.bos, self.stop_tokens, self.chat_template = bos, list(stop_tokens), chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with exactly one leading bos."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos] + ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (special tokens kept, so nothing is silently hidden)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def chat(self, message: str) -> str:
        """The user message wrapped in the model's chat template (plain text when it has none)."""
        if not self.chat_template:
            return message
        import jinja2

        template = jinja2.Environment().from_string(self.chat_template)
        text = template.render(messages=[{"role": "user", "content": message}], add_generation_prompt=True,
                               bos_token="")
        return text


def _bundle_tokenizer(path: Path) -> Tokenizer:
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    from ..export.litertlm import read_litertlm

    bundle = read_litertlm(path)
    raw = next((bundle.read(s) for s in bundle.sections if s.data_type == "hf_tokenizer"), None)
    meta_raw = next((bundle.read(s) for s in bundle.sections if s.data_type == "llm_metadata"), None)
    if raw is None or meta_raw is None:
        raise EdgeMtpError(f"{path} has no Hugging Face tokenizer or LLM metadata section; re-export it.")
    meta = llm_metadata_pb2.LlmMetadata.FromString(meta_raw)
    stops = [t.token_ids.ids[0] for t in meta.stop_tokens if t.token_ids.ids]
    return Tokenizer(zlib.decompress(raw[8:]).decode(), meta.start_token.token_ids.ids[0], stops,
                     meta.jinja_prompt_template or None)


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
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(self.tokenizer.chat(prompt) if chat else prompt)
        self.last_stats = Stats()
        yield from self.decoder.generate(list(prompt), max_tokens=max_tokens, draft_len=draft_len,
                                         mtp=mtp and self.backend.has_drafter,
                                         sampling=SamplingConfig(temperature, top_k, top_p, seed),
                                         stop_tokens=self.tokenizer.stop_tokens, stats=self.last_stats)


def _torch_backend(bundle: Path) -> Backend:
    """Our PyTorch modules on the checkpoints the bundle was exported from, under the bundle's contract."""
    from ..export.litertlm import read_litertlm
    from ..model.loading import load_drafter, load_target
    from .backends.litert import contract_from_manifest
    from .backends.torch import TorchBackend

    manifest = read_litertlm(bundle).manifest
    contract = contract_from_manifest(manifest, str(bundle))
    source = manifest.get("source") or {}
    if not source.get("target") or not Path(source["target"]).is_dir():
        raise EdgeMtpError(f"The checkpoints {bundle} was exported from are not on this machine; the torch backend "
                           "needs them (use --backend litert).")
    models = load_target(source["target"])
    drafter = load_drafter(source["assistant"], models.spec) if source.get("assistant") else None
    return TorchBackend(models, drafter, contract)


def load(path: str | Path, backend: str | None = None, accelerator: str = "cpu") -> Model:
    """Open a .litertlm bundle (litert backend by default) for generation."""
    path = Path(path)
    if backend not in (None, *BACKENDS):
        raise EdgeMtpError(f"Unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    if path.suffix == ".litertlm":
        if backend == "onnx":
            raise EdgeMtpError(f"{path} is a LiteRT bundle; run it with --backend litert (or torch).")
        if backend == "torch":
            return Model(_torch_backend(path), _bundle_tokenizer(path))
        from .backends.litert import LiteRTBackend

        return Model(LiteRTBackend(path, accelerator), _bundle_tokenizer(path))
    if path.is_dir():
        if backend not in (None, "onnx"):
            raise EdgeMtpError(f"{path} is an ONNX bundle folder; run it with --backend onnx.")
        from ..export.onnx_bundle import tokenizer_info
        from .backends.onnx import OnnxBackend

        onnx_backend = OnnxBackend(path, provider=accelerator)
        return Model(onnx_backend, Tokenizer(**tokenizer_info(path, onnx_backend.manifest)))
    raise EdgeMtpError(f"{path} is not a bundle edge-mtp can run (expected a .litertlm file or an ONNX bundle folder).")
