"""Distillation examples from text, JSONL, Parquet, a cached Hugging Face dataset, a prompt file or random tokens.

Plain text becomes prompts (BOS + prompt_len-1 tokens) that the target continues; conversations (records with a
`messages` list) are rendered with the checkpoint's chat template and kept as they are, with only the tokens of
model turns trained. Sources are streamed: a seeded reservoir keeps `count` training examples (and `held_out`
evaluation examples from every 20th document), so memory holds the sample, never the data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..checkpoint.spec import TargetSpec
from ..util.errors import EdgeMtpError

MODEL_ROLES = ("assistant", "model")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
HELD_OUT_EVERY = 20  # every 20th document goes to the held-out split
TEXT_BLOCK = 1 << 14  # characters of a text file read as one document


@dataclass
class Example:
    """Token ids and, for a conversation, which of them the model said (None: a prompt the target continues)."""

    tokens: list[int]
    trained: list[bool] | None = None


def tokenizer(target_dir: Path):
    """The target's tokenizer.json, loaded with `tokenizers`."""
    from tokenizers import Tokenizer

    file = target_dir / "tokenizer.json"
    if not file.is_file():
        raise EdgeMtpError(f"No tokenizer.json in {target_dir}; --data and --prompts need the target's tokenizer "
                           "(or omit them to distil from random prompts).")
    return Tokenizer.from_file(str(file))


def resolve_data(item: str | Path) -> list[Path]:
    """The files behind one --data value: a file, a folder of data files, or a dataset repo in the local HF cache."""
    path = Path(item).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
        if not files:
            raise EdgeMtpError(f"Data folder {path} holds no .txt, .jsonl, .json or .parquet files.")
        return files
    text = str(item)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return resolve_data(snapshot_download(repo_id=text, repo_type="dataset", local_files_only=True))
        except EdgeMtpError:
            raise
        except Exception:
            pass
        raise EdgeMtpError(f"'{text}' is neither a data file nor a dataset in the local Hugging Face cache; download "
                           "it first (huggingface-cli download --repo-type dataset) or pass its files.")
    raise EdgeMtpError(f"Data file {path} does not exist.")


def records(path: Path) -> Iterator[Any]:
    """Documents of one file, streamed: text blocks (str) or records (dict) of JSONL/JSON/Parquet."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EdgeMtpError(f"Reading {path} needs pyarrow; pip install 'edge-mtp[test]' or pyarrow.") from None
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                yield from batch.to_pylist()
        except OSError as e:
            raise EdgeMtpError(f"{path} is not a readable Parquet file ({e}).") from None
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise EdgeMtpError(f"{path} line {number} is not JSON; give one JSON object per line.") from None
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            while block := f.read(TEXT_BLOCK):
                yield block + f.readline()


class Renderer:
    """Record -> Example: text is tokenized as a prompt source, `messages` rendered with the chat template."""

    def __init__(self, target_dir: Path, spec: TargetSpec, prompt_len: int, seq_len: int):
        self.target_dir, self.spec, self.prompt_len, self.seq_len = target_dir, spec, prompt_len, seq_len
        self.tok = tokenizer(target_dir)
        self._template: tuple[str, dict[str, str]] | None = None
        self.conversations = self.model_turns = 0

    def examples(self, record: Any, where: Path) -> Iterator[Example]:
        """The examples one document yields: prompt windows of its text, or windows of its conversation."""
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            yield from self._conversation(record["messages"], where)
            return
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            text = record["text"]
        else:
            raise EdgeMtpError(f"A record of {where} has neither a 'text' string nor a 'messages' list.")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        step = self.prompt_len - 1
        for start in range(0, max(1, len(ids) - step + 1), step):
            window = ids[start:start + step]
            if window:
                yield Example([self.spec.bos_token_id] + window)

    def _conversation(self, messages: list[dict], where: Path) -> Iterator[Example]:
        from ..checkpoint.chat_template import checkpoint_specials, render

        if self._template is None:
            from ..export.pipeline import tokenizer_and_metadata

            template = tokenizer_and_metadata(self.target_dir)[1].chat_template
            if not template:
                raise EdgeMtpError(f"{where} holds conversations but {self.target_dir} has no chat template "
                                   "(chat_template.jinja or tokenizer_config.json); add the model's template.")
            self._template = template, checkpoint_specials(self.target_dir)
        template, specials = self._template
        self.conversations += 1
        text = render(template, messages, specials, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") in MODEL_ROLES:
                start = len(render(template, messages[:i], specials, add_generation_prompt=True))
                end = len(render(template, messages[:i + 1], specials, add_generation_prompt=False))
                spans.append((start, end))
        self.model_turns += len(spans)
        encoding = self.tok.encode(text, add_special_tokens=False)
        trained = [any(a <= lo < b for a, b in spans) for lo, _ in encoding.offsets]
        for start in range(0, len(encoding.ids), self.seq_len):
            window = trained[start:start + self.seq_len]
            if any(window[1:]):
                yield Example(encoding.ids[start:start + self.seq_len], window)


class Reservoir:
    """A uniform sample of `size` items from a stream of unknown length (seeded)."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.seen, self.items = size, rng, 0, []

    def offer(self, item: Any) -> None:
        """Consider one more item."""
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.size:
                self.items[j] = item
        self.seen += 1


def load_examples(target_dir: Path, spec: TargetSpec, data: Sequence[str | Path] | None,
                  prompts: str | Path | Sequence[str] | None, count: int, held_out: int, prompt_len: int,
                  seq_len: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples), sampled from the data, the prompt lines, or random tokens."""
    rng = random.Random(seed + 17)
    bos = [spec.bos_token_id]
    if data:
        files = [f for item in data for f in resolve_data(item)]
        renderer = Renderer(target_dir, spec, prompt_len, seq_len)
        train, evals = Reservoir(count, rng), Reservoir(held_out, random.Random(seed + 18))
        document = 0
        for file in files:
            for record in records(file):
                split = evals if document % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train
                for example in renderer.examples(record, file):
                    split.offer(example)
                document += 1
        if renderer.conversations and not renderer.model_turns:
            raise EdgeMtpError(f"The conversations in {', '.join(map(str, files))} have no model turn (role "
                               "'assistant' or 'model'); distillation trains on model turns only.")
        if not train.items:
            raise EdgeMtpError(f"The data ({', '.join(map(str, files))}) yields no training examples; give more text.")
        return train.items, evals.items or train.items[:held_out]
    if prompts is not None:
        tok = tokenizer(target_dir)
        lines = Path(prompts).read_text().splitlines() if isinstance(prompts, (str, Path)) else list(prompts)
        encoded = [Example(bos + tok.encode(line, add_special_tokens=False).ids[: prompt_len - 1])
                   for line in lines if line.strip()]
        if not encoded:
            raise EdgeMtpError(f"The prompt file {prompts} has no non-empty lines.")
        evals = encoded[-held_out:] if len(encoded) > 2 * held_out else encoded[:held_out]
        train = encoded[:-held_out] if len(encoded) > 2 * held_out else encoded
        order = list(range(max(count, len(train))))
        rng.shuffle(order)
        return [train[i % len(train)] for i in order[:count]], evals
    low = 3 if spec.vocab_size > 8 else 0  # skip pad/eos/bos

    def rand(n: int) -> list[Example]:
        return [Example(bos + [rng.randrange(low, spec.vocab_size) for _ in range(prompt_len - 1)]) for _ in range(n)]

    return rand(count), rand(held_out)
