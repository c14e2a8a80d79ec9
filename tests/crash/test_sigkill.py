"""SIGKILL the server at random moments under a concurrent workload; nothing acknowledged may be lost.

`make test` runs 20 rounds; `make soak` (pytest tests/crash --soak) runs 300.
Each round: start the server (its start-up sweep runs), verify every key and
the whole store, run concurrent Sets, overwrites, deletes, reads and a
resumable upload, then SIGKILL the server at a random moment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.crash.conftest import SUMMARIES
from tests.crash.harness import CrashHarness

DEFAULT_ROUNDS = 20
SOAK_ROUNDS = 300


def test_acknowledged_writes_survive_sigkill(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rounds = request.config.getoption("--crash-rounds") or (
        SOAK_ROUNDS if request.config.getoption("--soak") else DEFAULT_ROUNDS
    )
    seed = int(os.environ.get("BLOBSTORE_CRASH_SEED", time.time_ns() % 1_000_000))
    harness = CrashHarness(tmp_path, seed=seed)
    try:
        for number in range(rounds):
            harness.run_round()
            assert not harness.problems, f"seed {seed}, round {number}: {harness.problems}"
        harness.finish()
    finally:
        harness.server.kill()
    assert not harness.problems, f"seed {seed}: {harness.problems}"
    summary = ", ".join(f"{name}: {count}" for name, count in sorted(harness.stats.items()))
    request.config.stash.setdefault(SUMMARIES, []).append(f"crash harness (seed {seed}, {rounds} rounds): {summary}")
    # A harness whose workload never got going proves nothing.
    assert harness.stats["writes acknowledged"] > rounds
    assert harness.stats["kills"] == rounds
