"""keep_freed_memory: 1 MiB buffers are reused instead of being faulted in afresh each time,
and threads share one arena, so what is kept stays bounded."""

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


# Eight threads allocate at once, as a server's I/O threads do, then glibc's own report
# (malloc_info) says how many arenas hold the process's heap.
THREADS = """
import ctypes, json, os, threading
from blobstore.client.memory import keep_freed_memory
tuned = keep_freed_memory()
together = threading.Barrier(8)
def churn():
    together.wait()
    for _ in range(50):
        pieces = [os.urandom(1 << 20) for _ in range(2)]
        del pieces
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(json.dumps({"tuned": tuned, "arenas": ctypes.string_at(buf, size.value).decode().count("<heap nr=")}))
"""


def run(script: str, tuning: str) -> dict[str, object]:
    env = {**os.environ, "BLOBSTORE_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_message_buffers_are_reused() -> None:
    tuned, untuned = run(CHURN, "1"), run(CHURN, "0")
    assert tuned["tuned"] is True and untuned["tuned"] is False
    # 300 MiB churned: 76,800 pages if every buffer were faulted in afresh.
    assert isinstance(tuned["faults"], int) and isinstance(untuned["faults"], int)
    assert tuned["faults"] < 5_000 and untuned["faults"] > 20_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threads_share_one_arena() -> None:
    tuned, untuned = run(THREADS, "1"), run(THREADS, "0")
    assert tuned["tuned"] is True and untuned["tuned"] is False
    assert isinstance(tuned["arenas"], int) and isinstance(untuned["arenas"], int)
    assert tuned["arenas"] == 1 < untuned["arenas"]


# 48 MiB freed, less than the 64 MiB the tuning keeps at the top of the heap: the RSS stays up
# until release_freed_memory() hands it back.
RELEASE = """
import json, os
from blobstore.client.memory import keep_freed_memory, release_freed_memory
def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
tuned = keep_freed_memory()
pieces = [os.urandom(1 << 20) for _ in range(48)]
held = rss_mib()
del pieces
kept = rss_mib()
released = release_freed_memory()
print(json.dumps({"tuned": tuned, "held": held, "kept": kept, "released": released, "after": rss_mib()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_goes_back_to_the_kernel_on_release() -> None:
    tuned, untuned = run(RELEASE, "1"), run(RELEASE, "0")
    assert tuned["tuned"] is True and untuned["tuned"] is False
    held, kept, after = (tuned[name] for name in ("held", "kept", "after"))
    assert isinstance(held, float) and isinstance(kept, float) and isinstance(after, float)
    assert kept > held - 8  # kept for the next buffers...
    assert tuned["released"] is True
    assert after < kept - 40  # ...until released
    assert untuned["released"] is False  # untuned, glibc trims by itself: nothing to do


# Transfers as the clients count them: the kept memory goes back when the last one ends, not
# while another still runs, not after a few small ones, and also when a transfer fails.
TRANSFERS = """
import json, os
from blobstore.client.memory import keep_freed_memory, transfer_in_progress
def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
def churn():
    pieces = [os.urandom(1 << 20) for _ in range(48)]
    del pieces
tuned = keep_freed_memory()
seen = {"start": rss_mib()}
with transfer_in_progress(lambda: 48 << 20):
    with transfer_in_progress(lambda: 48 << 20):
        churn()
    seen["other_running"] = rss_mib()
seen["last_ended"] = rss_mib()
with transfer_in_progress(lambda: 1 << 20):
    churn()
seen["small"] = rss_mib()
try:
    with transfer_in_progress(lambda: 32 << 20):
        churn()
        raise ValueError
except ValueError:
    seen["failed"] = rss_mib()
print(json.dumps({"tuned": tuned, **seen}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_goes_back_when_the_last_transfer_ends() -> None:
    seen = run(TRANSFERS, "1")
    assert seen["tuned"] is True
    start, other_running, last_ended, small, failed = (
        float(seen[name])  # type: ignore[arg-type]
        for name in ("start", "other_running", "last_ended", "small", "failed")
    )
    assert other_running > start + 40  # kept while another transfer may reuse it
    assert last_ended < other_running - 40
    assert small > last_ended + 40  # 1 MiB moved: not worth a malloc_trim yet
    assert failed < small - 40  # 33 MiB moved since the last release, and a failure ends a transfer too
