"""A server that has gone quiet hands the buffers its allocator kept for transfers back to the kernel."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from blobstore.client import Storage
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
