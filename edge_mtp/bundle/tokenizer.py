"""A bundle's tokenizer: text <-> ids with its Hugging Face tokenizer, start/stop tokens and chat template."""

from __future__ import annotations

from typing import Sequence

from ..util.errors import EdgeMtpError
from .litertlm import LitertlmFile


class Tokenizer:
    """Text <-> ids with the bundle's Hugging Face tokenizer (bos prepended as LiteRT-LM does)."""

    def __init__(self, tokenizer_json: str, bos: int, stop_tokens: Sequence[int], chat_template: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises plain Exceptions for malformed JSON or models
            raise _broken(e, "is not a valid Hugging Face tokenizer") from None
        self.bos, self.stop_tokens, self.chat_template = bos, list(stop_tokens), chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with exactly one leading bos."""
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a model that loads yet cannot encode, e.g. an unk token missing from its vocabulary
            raise _broken(e, "cannot encode text") from None
        return [self.bos] + ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (special tokens kept, so nothing is silently hidden)."""
        try:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        except Exception as e:
            raise _broken(e, "cannot decode token ids") from None

    def reply_text(self, ids: Sequence[int]) -> str:
        """Text of a generated reply: the stop token that ended it is not part of the text."""
        return self.decode(ids[:-1] if ids and ids[-1] in self.stop_tokens else ids)

    def chat(self, message: str) -> str:
        """The user message wrapped in the model's chat template (plain text when it has none)."""
        if not self.chat_template:
            return message
        from ..checkpoint.chat_template import render  # transformers' sandboxed renderer, LiteRT-LM's empty specials

        return render(self.chat_template, [{"role": "user", "content": message}])


def _broken(error: Exception, what: str) -> EdgeMtpError:
    """A tokenizers failure (it raises plain Exceptions) as one sentence naming its first line."""
    detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return EdgeMtpError(f"The bundle's tokenizer.json {what} ({detail}); re-export the bundle.")


def bundle_tokenizer(bundle: LitertlmFile) -> Tokenizer:
    """The tokenizer, start and stop tokens and chat template stored in a .litertlm bundle."""
    from google.protobuf.message import DecodeError
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    section = bundle.section("llm_metadata")
    if section is None:
        raise EdgeMtpError(f"{bundle.path} has no LLM metadata section; re-export it.")
    try:
        meta = llm_metadata_pb2.LlmMetadata.FromString(bundle.read(section))
        bos = meta.start_token.token_ids.ids[0]
    except (DecodeError, IndexError):
        raise EdgeMtpError(f"{bundle.path}: the LLM metadata section is corrupt or names no start token; re-export "
                           "the bundle.") from None
    stops = [t.token_ids.ids[0] for t in meta.stop_tokens if t.token_ids.ids]
    return Tokenizer(bundle.tokenizer_json(), bos, stops, meta.jinja_prompt_template or None)
