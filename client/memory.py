"""Keeps glibc from handing message buffers (1-4 MiB) back to the kernel after every message.

Every large transfer allocates and frees one message buffer per MiB (a gRPC slice, then a
Python bytes object). With glibc's default, dynamic thresholds the freed top of the heap is
trimmed (returned to the kernel) almost every time, so the next message faults its pages
in afresh and the kernel zeroes them: measured on a 512 MiB download, the server's CPU fell
from 1.7 s to 0.8 s and the client's page faults from ~70,000 to ~13,000 once freed memory
was kept for reuse. The peak footprint does not grow: memory is kept, not added.

`keep_freed_memory()` sets two fixed thresholds once per process: allocations below 32 MiB
come from the heap instead of fresh mmaps, and up to 64 MiB of free heap top is kept.

Kept memory is kept per arena, and glibc gives threads that allocate at once arenas of their
own (up to eight per core): a server's eight I/O threads and gRPC's threads each held freed
buffers of their own, and a server's peak RSS during a 1 GiB download ranged from 92 to 156 MB
between runs. `keep_freed_memory()` therefore also puts every thread on one arena: with 4 MiB
upload messages a server's peak during a 1 GiB upload was 112-142 MB against 149-170 with two
arenas, with no CPU cost that showed (docs/benchmarks.md, items 21 and 23).
Set BLOBSTORE_MALLOC_TUNING=0 to leave the allocator alone. Elsewhere than glibc it does
nothing.

What is kept stays kept once the transfers are over: after a 1 GiB upload a server held 114
MB against 61 before it. `release_freed_memory()` (glibc's malloc_trim) hands it back; the
server calls it once it has been quiet for a few seconds (`memory_release_interval_s`). A
client process calls it when its last file transfer in progress ends (`transfer_in_progress`):
after a 64 MiB get_file a client held 63 MB against 39 before it, and 41 once released, for
0.8-2.5 ms of malloc_trim.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
ARENA_MAX = 1
# Transfers that moved less than this since the last release leave too little kept to be worth
# a malloc_trim (0.1 ms even when nothing is returned): a loop of small files trims now and then.
RELEASE_AFTER_BYTES = 16 << 20

_lock = threading.Lock()
_done = False
_transfers_lock = threading.Lock()
_transfers = 0
_moved_since_release = 0


def keep_freed_memory() -> bool:
    """Applies the thresholds (once); True when they are in effect."""
    global _done
    with _lock:
        if _done:
            return True
        if os.environ.get("BLOBSTORE_MALLOC_TUNING", "1") == "0" or not _is_glibc():
            return False
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        # mallopt answers 1 on success; setting either turns off glibc's dynamic adjustment.
        _done = (
            bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
        )
        return _done


def release_freed_memory() -> bool:
    """Returns the free memory the tuned allocator keeps to the kernel (malloc_trim); True when
    some was returned. Does nothing unless keep_freed_memory() is in effect: untuned, glibc
    trims by itself."""
    if not _done:
        return False
    return bool(ctypes.CDLL(None).malloc_trim(0))


@contextmanager
def transfer_in_progress(
    moved: Callable[[], int], release: Callable[[], object] = release_freed_memory
) -> Iterator[None]:
    """Counts a file transfer in progress in this process. When the last one ends (or fails) and
    transfers have moved RELEASE_AFTER_BYTES since the last release (`moved()`: this one's bytes
    so far), `release` hands the memory kept for their message buffers back to the kernel (an
    event loop passes one that runs it off the loop). Not while another transfer runs: it
    reuses those buffers, and would fault them in afresh."""
    _begin_transfer()
    try:
        yield
    finally:
        if _end_transfer(moved()):
            release()


def _begin_transfer() -> None:
    global _transfers
    with _transfers_lock:
        _transfers += 1


def _end_transfer(moved: int) -> bool:
    """Counts a transfer's end; True when the memory is due to be released."""
    global _transfers, _moved_since_release
    with _transfers_lock:
        _transfers -= 1
        _moved_since_release += moved
        if _transfers or _moved_since_release < RELEASE_AFTER_BYTES:
            return False
        _moved_since_release = 0
        return True


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False
