"""Every backend, every draft length 1..6: MTP output is token-for-token plain greedy decoding (demo pair)."""

from __future__ import annotations

import pytest

from edge_mtp.demo import assistant_dir, target_dir
from edge_mtp.model.loading import load_drafter, load_target
from edge_mtp.runtime.api import load
from edge_mtp.runtime.backends.torch import TorchBackend
from edge_mtp.runtime.speculative import generate_tokens

PROMPTS = ["The file", "A generator function", "If the value is", "Return the", "class Foo:"]
CONTEXT, PREFILL, G = 128, (16,), 6


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from edge_mtp.export.pipeline import export_onnx
    from edge_mtp.export.pipeline import export_litert

    root = tmp_path_factory.mktemp("g6")
    export_litert(target_dir(), assistant_dir(), root / "g6.litertlm", draft_len=G, context=CONTEXT, prefill=PREFILL)
    # The equality below is the check here (test_onnx holds the export's own graph checks)
    export_onnx(target_dir(), assistant_dir(), root / "g6-onnx", draft_len=G, context=CONTEXT, prefill=PREFILL,
                check=False)
    litert, onnx = load(root / "g6.litertlm"), load(root / "g6-onnx")
    models = load_target(target_dir())
    torch_backend = TorchBackend(models, load_drafter(assistant_dir(), models.spec), litert.contract)
    return {"litert": litert.backend, "onnx": onnx.backend, "torch": torch_backend}, litert.tokenizer


def test_all_backends_all_draft_lengths_equal_plain_greedy(backends):
    by_name, tokenizer = backends
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        plain, _ = generate_tokens(by_name["torch"], ids, max_tokens=24, mtp=False)
        for name in ("torch", "litert", "onnx"):
            backend = by_name[name]
            accepted = []
            for g in range(1, G + 1):
                tokens, stats = generate_tokens(backend, ids, max_tokens=24, draft_len=g)
                assert tokens == plain, (name, g, prompt)
                accepted.append((stats.accepted, stats.drafted))
            if name == "torch":
                reference = accepted
            else:
                assert accepted == reference, name  # same decisions as the PyTorch modules, round for round
