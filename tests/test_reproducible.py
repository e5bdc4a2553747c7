"""Exporting the same checkpoints with the same options twice gives byte-identical files."""

from __future__ import annotations

import hashlib

from edge_mtp.bundle.litertlm import read_litertlm
from edge_mtp.export.pipeline import export_litert

from conftest import BUNDLE_CONTEXT, BUNDLE_PREFILL


def test_exporting_twice_gives_identical_bytes_and_records_source_hashes(tiny_bundle, synth_pair, tmp_path):
    first = tiny_bundle[0]
    again = tmp_path / first.name  # same options and sources as the session's tiny bundle, another folder
    export_litert(synth_pair / "target", synth_pair / "assistant", again, context=BUNDLE_CONTEXT, prefill=BUNDLE_PREFILL)
    assert again.read_bytes() == first.read_bytes()
    allowlist = f"{first.stem}.allowlist.json"
    assert (tmp_path / allowlist).read_bytes() == (first.parent / allowlist).read_bytes()

    bundle = read_litertlm(again)
    assert bundle.system["uuid"] and bundle.system["creation_timestamp"]  # present, derived rather than random
    recorded = bundle.manifest["source"]["sha256"]
    for role in ("target", "assistant"):
        files = sorted(p for p in (synth_pair / role).iterdir() if p.is_file())
        assert recorded[role] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(recorded["target"])
