"""get_file resumes after the server dies mid-download, pinned to the generation it started on."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blobstore.client import PreconditionError, Storage
from tests.procserver import ServerProcess

# Chunk files, a small file system and server subprocesses on their own data dir: the file-lmdb pass only.
pytestmark = pytest.mark.file_store

MiB = 1 << 20


class InterruptingSink(io.BytesIO):
    """A destination file that runs `interrupt` once, after the first bytes arrived."""

    def __init__(self, interrupt: Callable[[], None]) -> None:
        super().__init__()
        self._interrupt: Callable[[], None] | None = interrupt
        self.bytes_at_interrupt = -1

    def write(self, data: bytes) -> int:  # type: ignore[override]
        written = super().write(data)
        if self._interrupt is not None:
            interrupt, self._interrupt = self._interrupt, None
            self.bytes_at_interrupt = self.tell()
            interrupt()
        return written


@pytest.fixture
def process(tmp_path: Path):
    running = ServerProcess(tmp_path / "data")
    running.start()
    yield running
    running.stop()


def test_get_file_resumes_after_a_server_restart(process: ServerProcess) -> None:
    data = os.urandom(32 * MiB)
    with Storage(process.address) as storage:
        storage.set_file("big", io.BytesIO(data))

        def crash_and_restart() -> None:
            process.kill()
            process.start()

        sink = InterruptingSink(crash_and_restart)
        info = storage.get_file("big", sink)
    assert 0 < sink.bytes_at_interrupt < len(data)
    assert process.starts == 2
    assert info.size == len(data)
    assert hashlib.sha256(sink.getvalue()).digest() == hashlib.sha256(data).digest()


def test_get_file_refuses_to_splice_two_versions(process: ServerProcess) -> None:
    # Larger than what the client may hold before the interrupt: gRPC's receive window plus the
    # pieces queued for writing, so that the first version cannot have arrived whole.
    size = 128 * MiB
    with Storage(process.address) as storage:
        storage.set_file("big", io.BytesIO(os.urandom(size)))

        def crash_restart_and_overwrite() -> None:
            process.kill()
            process.start()
            with Storage(process.address) as other:
                other.set_file("big", io.BytesIO(os.urandom(size)))

        sink = InterruptingSink(crash_restart_and_overwrite)
        with pytest.raises(PreconditionError, match="changed"):
            storage.get_file("big", sink)
