"""A server that has gone quiet, and a client whose last file transfer has ended, hand the
buffers their allocator kept for transfers back to the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blobstore.client import Storage
from tests.conftest import RunningServer
from tests.procserver import ServerProcess

# The server's own process (its memory is what is measured): once, in the file-lmdb pass.
pytestmark = [
    pytest.mark.file_store,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, /proc"),
]

MiB = 1 << 20


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def _rss_after_upload(tmp_path: Path, interval: str, wait_s: float) -> tuple[float, float]:
    """(peak, lowest RSS seen within `wait_s` after the upload) of a server given the interval."""
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(96 * MiB))
    server = ServerProcess(tmp_path / f"data-{interval}", extra_args=("--set", f"memory_release_interval_s={interval}"))
    server.start()
    try:
        assert server.process is not None
        pid = server.process.pid
        with Storage(server.address) as storage:
            storage.set_file("big", str(source))
        peak = _status_mib(pid, "VmHWM")
        lowest = _status_mib(pid, "VmRSS")
        deadline = time.monotonic() + wait_s
        while lowest > peak - 20 and time.monotonic() < deadline:
            time.sleep(0.1)
            lowest = min(lowest, _status_mib(pid, "VmRSS"))
        return peak, lowest
    finally:
        server.stop()


def test_a_quiet_server_releases_the_memory_its_transfers_left_kept(tmp_path: Path) -> None:
    peak, lowest = _rss_after_upload(tmp_path, "0.3", wait_s=20)
    assert lowest < peak - 20, f"RSS stayed at {lowest:.0f} MiB after a peak of {peak:.0f}"


def test_without_the_release_the_memory_stays_kept(tmp_path: Path) -> None:
    # What the test above would see without the feature: the kept buffers stay.
    peak, lowest = _rss_after_upload(tmp_path, "0", wait_s=2)
    assert lowest > peak - 20, f"RSS fell to {lowest:.0f} MiB from a peak of {peak:.0f} without any release"


# A client process of its own (the test's process also runs the server): its RSS once
# connected, then after a 64 MiB set_file and after the get_file of it. The async client
# releases off its loop, after get_file returns: it is given a moment.
CLIENT = """
import asyncio, json, sys, time
from blobstore.client import AsyncStorage, Storage
address, source, target, kind = sys.argv[1:5]
def rss_mib(field="VmRSS"):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024
def settled():
    deadline, lowest = time.monotonic() + 3, rss_mib()
    while time.monotonic() < deadline and lowest > seen["start"] + 8:
        time.sleep(0.05)
        lowest = min(lowest, rss_mib())
    return lowest
seen = {}
if kind == "sync":
    with Storage(address) as storage:
        storage.limits()
        seen["start"] = rss_mib()
        storage.set_file("big", source)
        seen["after_set"] = rss_mib()
        storage.get_file("big", target)
        seen["after_get"] = rss_mib()
else:
    async def transfers():
        async with AsyncStorage(address) as storage:
            await storage.limits()
            seen["start"] = rss_mib()
            await storage.set_file("big", source)
            seen["after_set"] = settled()
            await storage.get_file("big", target)
            seen["after_get"] = settled()
    asyncio.run(transfers())
seen["peak"] = rss_mib("VmHWM")
print(json.dumps(seen))
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_releases_the_memory_kept_for_its_transfers_once_they_end(
    server: RunningServer, tmp_path: Path, kind: str
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(64 * MiB))
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, server.address, str(source), str(tmp_path / "copy.bin"), kind],
        check=True,
        capture_output=True,
        text=True,
    )
    seen = json.loads(out.stdout)
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    assert seen["peak"] > seen["start"] + 12, f"the transfers never held memory worth releasing: {seen}"
    # Without the release a client held 15-25 MiB more than it started with (63 against 39).
    assert seen["after_set"] < seen["start"] + 8, seen
    assert seen["after_get"] < seen["start"] + 8, seen
