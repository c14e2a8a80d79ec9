"""A full disk and a full index: writes fail RESOURCE_EXHAUSTED, reads go on, nothing is lost."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.client import ResourceExhaustedError
from blobstore.server.scrub import scrub
from tests.conftest import start_server, stop_server

# Chunk files, a small file system and server subprocesses on their own data dir: the file-lmdb pass only.
pytestmark = pytest.mark.file_store

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB file system (tmpfs); the tests run as root in CI."""
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fill(path: Path, leave: int) -> None:
    """A ballast file that leaves `leave` bytes free (as another program filling the disk would)."""
    with open(path / "ballast", "wb") as f:
        remaining = _free_bytes(path) - leave
        block = b"\0" * MiB
        while remaining > 0:
            remaining -= f.write(block[: min(len(block), remaining)])


def test_a_full_disk_refuses_writes_keeps_reads_and_recovers(small_fs: Path) -> None:
    data_dir = small_fs / "data"
    running = start_server(data_dir)
    kept: dict[str, bytes] = {}
    try:
        with running.client(retries=0) as storage:
            for number in range(4):
                kept[f"big{number}"] = os.urandom(1 * MiB + number * 100 * KiB)
                storage.set_file(f"big{number}", io.BytesIO(kept[f"big{number}"]))
            kept["small"] = b"fits in the index"
            storage.set("small", kept["small"])

            _fill(small_fs, leave=512 * KiB)
            with pytest.raises(ResourceExhaustedError):
                storage.set_file("too-big", io.BytesIO(os.urandom(9 * MiB)))  # a resumable session
            with pytest.raises(ResourceExhaustedError):
                storage.set_file("also-too-big", io.BytesIO(os.urandom(3 * MiB)))  # one stream
            # The index fills too: values that live inside it, until it cannot grow any more.
            refused = 0
            for number in range(200):
                value = os.urandom(60 * KiB)
                try:
                    storage.set(f"inline{number}", value)
                except ResourceExhaustedError:
                    refused += 1
                    if refused >= 3:
                        break
                else:
                    kept[f"inline{number}"] = value
            assert refused >= 3, "the disk never filled up"

            for key, value in kept.items():
                assert storage.get(key) == value
            assert set(storage.list()) == set(kept)

            (small_fs / "ballast").unlink()
            kept["after"] = os.urandom(9 * MiB)
            storage.set_file("after", io.BytesIO(kept["after"]))
            storage.set("after-small", b"x")
            kept["after-small"] = b"x"
    finally:
        stop_server(running)
    running = start_server(data_dir)  # the start-up sweep removes whatever the refused writes left
    try:
        with running.client() as storage:
            for key, value in kept.items():
                assert storage.get(key) == value
            assert set(storage.list()) == set(kept)
        report = scrub(running.engine.index, running.engine.chunks)
        assert report.ok and not report.unreferenced, report
        assert running.engine.usage("default").open_uploads == 0
    finally:
        stop_server(running)
