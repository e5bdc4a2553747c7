"""A multi-turn chat on our draft/verify loop that keeps the KV cache across turns.

Every turn renders the whole conversation with the bundle's chat template (as transformers and LiteRT-LM render
it: see edge_mtp/checkpoint/chat_template.py) and tokenizes it; the tokens the cache already holds from earlier turns (the
longest common prefix with what it was fed) are not prefilled again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..checkpoint.chat_template import Message, render
from ..util.errors import EdgeMtpError
from .api import Model
from .sampling import SamplingConfig
from .speculative import Stats


@dataclass
class TurnOptions:
    """Generation options of every reply (those of `edge-mtp run`)."""

    max_tokens: int = 256
    draft_len: int | None = None
    mtp: bool = True
    sampling: SamplingConfig = SamplingConfig()


class ChatSession:
    """One conversation: `send` streams the reply's token ids; `last_stats` describes the last reply."""

    def __init__(self, model: Model, options: TurnOptions = TurnOptions()):
        if not model.tokenizer.chat_template:
            raise EdgeMtpError("This bundle has no chat template, so a conversation cannot be formatted; re-export "
                               "it from a checkpoint whose tokenizer_config.json or chat_template.jinja has one.")
        model.decoder.check([model.tokenizer.bos], options.mtp and model.backend.has_drafter, options.draft_len)
        self.model, self.options = model, options
        self.messages: list[Message] = []
        self.cached: list[int] = []  # token ids whose keys and values the cache holds, from position 0
        self.last_stats = Stats()
        self.reused = 0  # prompt tokens of the last turn taken from the cache instead of prefilled

    def reset(self) -> None:
        """Forget the conversation (the next turn prefills from an empty cache)."""
        self.messages, self.cached, self.last_stats, self.reused = [], [], Stats(), 0

    def prompt(self, text: str) -> list[int]:
        """Token ids of the whole conversation so far plus a user message `text`, ending on the generation prompt."""
        tok = self.model.tokenizer
        return tok.encode(render(tok.chat_template, self.messages + [{"role": "user", "content": text}]))

    def send(self, text: str) -> Iterator[int]:
        """Yield the reply to the user message `text` token by token (stop token included when the model emits it)."""
        prompt = self.prompt(text)
        context = self.model.contract.context
        if len(prompt) >= context:
            raise EdgeMtpError(f"The conversation has grown to {len(prompt)} tokens, the bundle's context is "
                               f"{context}; /reset to start a new one (or export with a larger --context).")
        common = next((i for i, (a, b) in enumerate(zip(self.cached, prompt)) if a != b),
                      min(len(self.cached), len(prompt)))
        self.reused = min(common, len(prompt) - 1)  # the last prompt token is always decoded
        # the last round's verify may have written up to a draft length past what was fed
        if not self.model.contract.can_resume(len(self.cached) + self.model.contract.verify_len, self.reused):
            self.reused = 0
        self.last_stats, reply = Stats(), []
        o = self.options
        self.cached = []  # a reply cut short leaves the cache in an unknown state: the next turn starts afresh
        for token in self.model.decoder.generate(prompt, max_tokens=o.max_tokens, draft_len=o.draft_len,
                                                 mtp=o.mtp and self.model.backend.has_drafter, sampling=o.sampling,
                                                 stop_tokens=self.model.tokenizer.stop_tokens,
                                                 stats=self.last_stats, cached=self.reused):
            reply.append(token)
            yield token
        self.cached = prompt + reply[:-1]  # the last emitted token was never fed to the target
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": self.model.tokenizer.reply_text(reply)}]
