"""The numerical truth: the original checkpoints run by transformers itself (not by our re-implementation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.locate import resolve_checkpoint
from ..checkpoint.reading import open_checkpoint
from ..model.contract import MASK_HIDDEN


class TransformersPair:
    """A target (and optionally its assistant) loaded with transformers in fp32, eager attention."""

    def __init__(self, target_dir: str | Path, assistant_dir: str | Path | None = None):
        import transformers

        reader = open_checkpoint(resolve_checkpoint(target_dir))
        config = json.loads((reader.directory / "config.json").read_text())
        cls = (transformers.Gemma4ForConditionalGeneration if config.get("model_type") == "gemma4"
               else transformers.Gemma4ForCausalLM)
        self.target = cls.from_pretrained(reader.directory, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            for name in getattr(reader, "pairs", ()):  # the weights a LoRA adapter changes, read through it
                self.target.get_parameter(name).copy_(reader.tensor(name))
        self.text = self.target.model.language_model if hasattr(self.target.model, "language_model") else self.target.model
        self.assistant = None
        if assistant_dir is not None:
            self.assistant = transformers.Gemma4AssistantForCausalLM.from_pretrained(
                resolve_checkpoint(assistant_dir), dtype=torch.float32, attn_implementation="eager").eval()

    @torch.no_grad()
    def forward(self, ids: list[int]) -> dict:
        """Logits, last hidden state and the store layers' K/V for a whole sequence."""
        t, mask = _batch(ids)
        out = self.text(t, attention_mask=mask, output_hidden_states=True, return_shared_kv_states=True,
                        use_cache=False)
        logits = self.target(input_ids=t, attention_mask=mask).logits[0].numpy()
        return {"logits": logits, "activations": out.hidden_states[-1][0].numpy(),
                "shared_kv": out.shared_kv_states}

    @torch.no_grad()
    def embedding(self, ids: list[int]) -> np.ndarray:
        """Scaled input embeddings [T, H] as the target computes them."""
        return self.text.embed_tokens(torch.tensor([ids]))[0].float().numpy()

    @torch.no_grad()
    def per_layer_embedding(self, ids: list[int]) -> np.ndarray:
        """The token part of the per-layer embeddings [T, NL, P]."""
        return self.text.get_per_layer_inputs(torch.tensor([ids]))[0].float().numpy()

    @torch.no_grad()
    def draft_step(self, activations: np.ndarray, shared_kv: dict, position: int, window: int) -> dict:
        """One assistant step at `position` over keys [0, position-1], sliding layers seeing the last `window`
        keys: the visibility LiteRT-LM gives the drafter, passed to transformers as explicit masks."""
        a = self.assistant
        keys = position
        full = torch.zeros(1, 1, 1, keys)
        sliding = torch.where(torch.arange(keys) >= keys - window, 0.0, MASK_HIDDEN).reshape(1, 1, 1, keys)
        kv = {k: (v[0][:, :, :keys], v[1][:, :, :keys]) for k, v in shared_kv.items()}
        x = a.pre_projection(torch.from_numpy(activations).float())
        out = a.model(inputs_embeds=x, attention_mask={"full_attention": full, "sliding_attention": sliding},
                      position_ids=torch.tensor([[position]]), shared_kv_states=kv, use_cache=False)
        y = out.last_hidden_state
        logits = a.masked_embedding(y, a.lm_head.weight) if a.config.use_ordered_embeddings else a.lm_head(y)
        return {"logits": logits[0, -1].numpy(), "projected_activations": a.post_projection(y)[0, -1].numpy()}

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_tokens: int, stop_tokens: list[int], assisted: bool = False) -> list[int]:
        """transformers' greedy generate (optionally with the assistant), new tokens only."""
        kwargs = {"assistant_model": self.assistant} if assisted else {}
        ids, mask = _batch(prompt)
        out = self.target.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                   eos_token_id=stop_tokens or None, pad_token_id=0, **kwargs)
        return out[0, len(prompt):].tolist()

    @torch.no_grad()
    def top2_gap(self, ids: list[int]) -> float:
        """Logit gap between the best and second-best next token after `ids` (small = a near-tie)."""
        t, mask = _batch(ids)
        row = self.target(input_ids=t, attention_mask=mask).logits[0, -1]
        top = torch.topk(row, 2).values
        return float(top[0] - top[1])


def _batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-row batch and its all-ones attention mask: every prompt token is attended to, as on the device, even
    one equal to the pad id (left to itself, generate() would infer a mask hiding those)."""
    t = torch.tensor([ids])
    return t, torch.ones_like(t)


def error_metrics(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """max abs and relative error, cosine similarity, and top-1 agreement over the rows (last axis = vocab)."""
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    want = want.astype(np.float64)
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max()) or 1.0
    cos = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want) or 1.0))
    rows_got, rows_want = got.reshape(-1, want.shape[-1]), want.reshape(-1, want.shape[-1])
    top1 = float(np.mean(rows_got.argmax(-1) == rows_want.argmax(-1)))
    return {"max_abs_error": err, "relative_error": err / scale, "cosine": cos if not math.isnan(cos) else 0.0,
            "top1_agreement": top1}
