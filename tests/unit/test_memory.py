"""keep_freed_memory: 1 MiB buffers are reused instead of being faulted in afresh each time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocates and frees 1 MiB buffers as a transfer does (a new bytes object per message)
# and reports the minor page faults that cost, with or without the tuning.
CHURN = """
import json, os, resource, sys
from blobstore.client.memory import keep_freed_memory
tuned = keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(100):
    # A received message's buffers: the transport's copy, the message, the bytes handed on.
    pieces = [os.urandom(1 << 20) for _ in range(3)]
    del pieces
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"tuned": tuned, "faults": after - before}))
"""


def churn(tuning: str) -> dict[str, object]:
    env = {**os.environ, "BLOBSTORE_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, check=True, capture_output=True, text=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_message_buffers_are_reused() -> None:
    tuned, untuned = churn("1"), churn("0")
    assert tuned["tuned"] is True and untuned["tuned"] is False
    # 300 MiB churned: 76,800 pages if every buffer were faulted in afresh.
    assert isinstance(tuned["faults"], int) and isinstance(untuned["faults"], int)
    assert tuned["faults"] < 5_000 and untuned["faults"] > 20_000
