"""A small working tokenizer in the Hugging Face layout, for synthetic checkpoints of any vocabulary size."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma (pad 0, eos 1, bos 2)
SPACE = "\u2581"  # SentencePiece's word marker: Gemma's tokenizer.json spells spaces this way
CHARS = [SPACE] + [chr(c) for c in range(33, 127)] + ["\n"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def write_char_tokenizer(directory: Path, vocab_size: int) -> None:
    """Gemma-style tokenizer.json (spaces as U+2581, byte fallback when the vocabulary has room) + its config.

    Ids: specials, the word marker and printable ASCII, then (vocab permitting) the 256 byte tokens, then unused
    filler ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    if vocab_size < len(SPECIALS) + len(CHARS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a character tokenizer")
    pieces = SPECIALS + CHARS
    byte_fallback = vocab_size >= len(pieces) + len(BYTES)
    if byte_fallback:
        pieces += BYTES
    vocab = {tok: i for i, tok in enumerate(pieces)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=byte_fallback))
    tok.add_special_tokens(SPECIALS)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "model_max_length": 131072}, indent=2))
