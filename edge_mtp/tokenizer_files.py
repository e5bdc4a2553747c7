"""A small working tokenizer in the Hugging Face layout, for synthetic checkpoints of any vocabulary size."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma (pad 0, eos 1, bos 2)
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def write_char_tokenizer(directory: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json: specials, printable ASCII characters, then unused filler ids."""
    from tokenizers import Tokenizer, decoders, models, processors

    if vocab_size < len(SPECIALS) + len(CHARS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a character tokenizer")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "model_max_length": 131072}, indent=2))
