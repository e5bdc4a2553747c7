"""Every reader of untrusted bytes, fuzzed with Hypothesis: only EdgeMtpError escapes, no input hangs for a
second, nothing is written outside the input's folder. A short run here; scripts/fuzz_readers.py runs 100k+."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import frozen_heap, run_guarded, targets

EXAMPLES = int(os.environ.get("EDGE_MTP_FUZZ_EXAMPLES", "2000"))
TARGETS = targets()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_reader_survives_fuzzing(name):
    reader, strategy = TARGETS[name]
    calls = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(value):
        calls.append(1)
        run_guarded(reader, value)

    with frozen_heap():
        fuzz()
    assert len(calls) >= EXAMPLES * 0.9  # the strategy really produced the inputs asked for
