"""The Kotlin spec-core's test vectors must be what the Python runtime decides today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTDATA = Path(__file__).resolve().parent.parent / "android_demo" / "spec-core" / "testdata"


def test_committed_vectors_are_current():
    spec = importlib.util.spec_from_file_location("make_vectors", TESTDATA / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (TESTDATA / "vectors.json").read_text() == module.render(), \
        "vectors.json is stale: run android_demo/spec-core/testdata/make_vectors.py"


def test_vectors_cover_the_loop_edges():
    import json
    names = {c["name"] for c in json.loads((TESTDATA / "vectors.json").read_text())["cases"]}
    assert {"partial_accept", "max_tokens_inside_accepted_run", "stop_token_inside_accepted_run",
            "context_end_fallback"} <= names
