"""Session-wide fixtures: checkpoints written once (by transformers and by our synth writer) and shared by tests."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
# Caches (converted layer templates, the demo bundle) live for one test session: shared by its exports, never the
# user's own.
os.environ["EDGE_MTP_CACHE"] = tempfile.mkdtemp(prefix="edge-mtp-test-cache-")
atexit.register(shutil.rmtree, os.environ["EDGE_MTP_CACHE"], ignore_errors=True)

from edge_mtp.checkpoint.spec import preset_pair  # noqa: E402

GEOMETRIES = ["tiny", "tiny-mqa"]
BUNDLE_CONTEXT, BUNDLE_PREFILL = 64, (8, 16)


@pytest.fixture(scope="session")
def hf_pairs(tmp_path_factory) -> dict:
    """For each test geometry: transformers target + assistant models and the directories they were saved to."""
    from hf_models import hf_assistant, hf_target, save

    out = {}
    for name in GEOMETRIES:
        target_spec, drafter_spec = preset_pair(name)
        root = tmp_path_factory.mktemp(f"hf-{name}")
        target, assistant = hf_target(target_spec, seed=3), hf_assistant(drafter_spec, seed=4)
        out[name] = {"target": target, "assistant": assistant, "target_dir": save(target, root / "target"),
                     "assistant_dir": save(assistant, root / "assistant")}
    return out


@pytest.fixture(scope="session")
def synth_pair(tmp_path_factory) -> Path:
    """The tiny preset written by our streaming synth writer (target/ and assistant/)."""
    from edge_mtp.checkpoint.synth import write_drafter, write_target

    root = tmp_path_factory.mktemp("synth-tiny")
    target, drafter = preset_pair("tiny")
    write_target(root / "target", target, seed=0)
    write_drafter(root / "assistant", drafter, target, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_bundle(synth_pair, tmp_path_factory):
    """The synthetic tiny pair exported once to .litertlm: (path, export summary)."""
    from edge_mtp.export.pipeline import export_litert

    out = tmp_path_factory.mktemp("litert") / "tiny.litertlm"
    summary = export_litert(synth_pair / "target", synth_pair / "assistant", out, context=BUNDLE_CONTEXT,
                            prefill=BUNDLE_PREFILL)
    return out, summary


DEMO_CONTEXT, DEMO_PREFILL = 256, (32,)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The built-in demo pair exported once to .litertlm (context 256)."""
    from edge_mtp.demo import assistant_dir, target_dir
    from edge_mtp.export.pipeline import export_litert

    out = tmp_path_factory.mktemp("demo") / "demo.litertlm"
    export_litert(target_dir(), assistant_dir(), out, context=DEMO_CONTEXT, prefill=DEMO_PREFILL)
    return out


@pytest.fixture(scope="session")
def pair_dirs(synth_pair) -> dict:
    """(target, assistant) checkpoint directories of the tiny synthetic pair and of the demo pair."""
    from edge_mtp.demo import assistant_dir, target_dir

    return {"tiny": (synth_pair / "target", synth_pair / "assistant"), "demo": (target_dir(), assistant_dir())}


@pytest.fixture(scope="session")
def recipe_bundle(pair_dirs, tiny_bundle, demo_bundle, tmp_path_factory):
    """recipe_bundle(pair, recipe) -> (path, export summary): each pair exported once per recipe in the session ('tiny'
    at the tiny_bundle geometry, 'demo' at the demo_bundle one; fp32 are those bundles). The tiny pair exports through
    the CLI, whose stderr must hold its progress alone (summary: the --json dict); the demo pair through the library."""
    from click.testing import CliRunner

    from edge_mtp.cli import main
    from edge_mtp.export.pipeline import export_litert
    from helpers import assert_only_progress

    made = {("tiny", "fp32"): tiny_bundle, ("demo", "fp32"): (demo_bundle, None)}

    def get(pair: str, recipe: str):
        if (pair, recipe) not in made:
            target, assistant = pair_dirs[pair]
            out = tmp_path_factory.mktemp(f"{pair}-{recipe}") / f"{pair}-{recipe}.litertlm"
            if pair == "tiny":
                result = CliRunner().invoke(main, [
                    "export", "--target", str(target), "--assistant", str(assistant), "--out", str(out),
                    "--context", str(BUNDLE_CONTEXT), "--prefill", ",".join(map(str, BUNDLE_PREFILL)),
                    "--quant", recipe, "--json"])
                assert result.exit_code == 0, result.output[-3000:]
                assert_only_progress(result.stderr)
                made[pair, recipe] = (out, json.loads(result.stdout[result.stdout.index("{"):]))
            else:
                made[pair, recipe] = (out, export_litert(target, assistant, out, context=DEMO_CONTEXT,
                                                         prefill=DEMO_PREFILL, quant=recipe))
        return made[pair, recipe]

    return get


@pytest.fixture(scope="session")
def gpu_demo(tmp_path_factory):
    """The demo pair exported for LiteRT-LM's GPU executor too (export --gpu: in-place KV cache; fp32, so the drafter
    gathers its candidate rows)."""
    from edge_mtp.demo import assistant_dir, target_dir
    from edge_mtp.export.pipeline import export_litert

    out = tmp_path_factory.mktemp("demo-gpu") / "demo-gpu.litertlm"
    export_litert(target_dir(), assistant_dir(), out, context=DEMO_CONTEXT, prefill=DEMO_PREFILL, in_place_cache=True)
    return out


@pytest.fixture(scope="session")
def onnx_recipe_bundle(synth_pair, tmp_path_factory):
    """onnx_recipe_bundle(recipe) -> (folder, export summary, progress steps (done, total)): the synthetic tiny pair
    exported once per recipe in the session to an ONNX bundle folder (at the tiny_bundle geometry). The fp32 export
    runs every check of the export; the others leave the piece checks to that one."""
    from edge_mtp.export.pipeline import export_onnx

    made = {}

    def get(recipe: str) -> tuple[Path, object, list[tuple[int, int]]]:
        if recipe not in made:
            out = tmp_path_factory.mktemp(f"onnx-{recipe}") / f"tiny-{recipe}"
            steps = []
            summary = export_onnx(synth_pair / "target", synth_pair / "assistant", out, context=BUNDLE_CONTEXT,
                                  prefill=BUNDLE_PREFILL, quant=recipe, check=recipe == "fp32",
                                  on_progress=lambda what, done, total: steps.append((done, total)))
            made[recipe] = out, summary, steps
        return made[recipe]

    return get
