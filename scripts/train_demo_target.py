"""Train the built-in demo target: a small Gemma 4 (PLE, sliding + full layers, KV sharing, double-wide MLP, softcap).

Data: Python's own documentation shipped with the interpreter (pydoc_data.topics, the language reference topics)
plus the docstrings of the standard library's modules, classes and functions; both are under the PSF License
(Python Software Foundation License Version 2). A byte-level BPE tokenizer is trained on the same text. CPU, seeded.

    python scripts/train_demo_target.py --out edge_mtp/demo/target --minutes 30
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from edge_mtp.checkpoint.hf_config import generation_config, target_config
from edge_mtp.checkpoint.layout import TEXT_PREFIX, target_tensors
from edge_mtp.checkpoint.spec import FULL, SLIDING, TargetSpec
from edge_mtp.util.atomic import atomic_directory

S, F = SLIDING, FULL
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..5
VOCAB = 2048
SPEC = TargetSpec(
    hidden_size=256, intermediate_size=512, layer_types=(S, S, F, S, S, F), num_heads=4, num_kv_heads=1,
    head_dim=64, global_head_dim=128, sliding_window=64, vocab_size=VOCAB, num_kv_shared_layers=3, ple_dim=16,
    ple_vocab_size=VOCAB, double_wide_mlp=True, final_softcap=30.0, bos_token_id=2, eos_token_ids=(1, 5),
    pad_token_id=0, dtype="bfloat16")
# Gemma's turn format; content may be a string (transformers) or a list of parts (LiteRT-LM's conversation)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                 "m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
                 "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
SKIP = {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "tests"}


def corpus() -> list[str]:
    """Documents: pydoc topics, then stdlib docstrings longer than 80 characters, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.glob("**/*.py")):
        if SKIP & set(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def train_tokenizer(docs: list[str], out: Path) -> "Tokenizer":  # noqa: F821
    """Byte-level BPE with Gemma-style special ids (pad 0, eos 1, bos 2), written in the HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE}, indent=2))
    return tok


def build_model(seed: int):
    """A transformers Gemma4ForCausalLM of SPEC (the numerical reference), default init, seeded."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    cfg = {k: v for k, v in target_config(SPEC).items() if k not in ("model_type", "architectures", "dtype")}
    return Gemma4ForCausalLM(Gemma4TextConfig(**cfg))


def main() -> None:
    """Train tokenizer and target; write the HF checkpoint directory atomically."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("edge_mtp/demo/target"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--minutes", type=float, default=60.0, help="stop early after this much training time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = corpus()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs))} characters")
    with atomic_directory(args.out) as tmp:
        tok = train_tokenizer(docs, tmp)
        ids: list[int] = []
        for d in docs:
            ids += [2] + tok.encode(d, add_special_tokens=False).ids + [1]
        data = torch.tensor(ids)
        split = int(len(data) * 0.97)
        train, held = data[:split], data[split:]
        print(f"tokens: {len(train)} train, {len(held)} held out")
        model = build_model(args.seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
        gen = torch.Generator().manual_seed(args.seed)
        warmup, t0, step = 50, time.perf_counter(), 0
        for step in range(args.steps):
            frac = step / args.steps
            lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
            x = torch.stack([train[s: s + args.seq_len] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 20 == 0:
                print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.perf_counter() - t0:.0f}s", flush=True)
            if time.perf_counter() - t0 > args.minutes * 60:
                break
        model.eval()
        with torch.no_grad():
            chunks = held[: (len(held) // args.seq_len) * args.seq_len].view(-1, args.seq_len)[:64]
            held_loss = float(model(input_ids=chunks, labels=chunks).loss)
        print(f"trained {step + 1} steps in {time.perf_counter() - t0:.0f}s; held-out loss {held_loss:.3f}")
        write_checkpoint(model, tmp)
        (tmp / "TRAINING.json").write_text(json.dumps({
            "data": "CPython 3.11 pydoc_data.topics + standard-library docstrings (PSF License 2.0)",
            "steps": step + 1, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
            "held_out_loss": held_loss, "train_tokens": len(train)}, indent=2))


def write_checkpoint(model, out: Path) -> None:
    """config.json, generation_config.json and model.safetensors (exactly the layout tensors, text-only prefix)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    dtype = getattr(torch, SPEC.dtype)  # trained in float32, stored in SPEC.dtype (the loader reads either)
    tensors = {TEXT_PREFIX + e.name: state[TEXT_PREFIX + e.name].detach().to(dtype).contiguous().clone()
               for e in target_tensors(SPEC)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(target_config(SPEC), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(SPEC), indent=2))


if __name__ == "__main__":
    main()
