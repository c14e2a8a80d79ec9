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


class Interrupter:
    """A progress callback that runs `interrupt` once, after the first bytes arrived.

    Progress is reported on the thread that receives the stream, so the download waits
    for the interrupt (a crash, a restart, an overwrite) before it reads on.
    """

    def __init__(self, interrupt: Callable[[], None]) -> None:
        self._interrupt: Callable[[], None] | None = interrupt
        self.received = 0
        self.bytes_at_interrupt = -1

    def __call__(self, nbytes: int) -> None:
        self.received += nbytes
        if self._interrupt is not None:
            interrupt, self._interrupt = self._interrupt, None
            self.bytes_at_interrupt = self.received
            interrupt()


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

        sink, interrupter = io.BytesIO(), Interrupter(crash_and_restart)
        info = storage.get_file("big", sink, progress=interrupter)
    assert 0 < interrupter.bytes_at_interrupt < len(data)
    assert process.starts == 2
    assert info.size == len(data)
    assert hashlib.sha256(sink.getvalue()).digest() == hashlib.sha256(data).digest()


def test_get_file_refuses_to_splice_two_versions(process: ServerProcess) -> None:
    # Larger than gRPC's receive window, so that the first version cannot have arrived whole.
    size = 32 * MiB
    with Storage(process.address) as storage:
        storage.set_file("big", io.BytesIO(os.urandom(size)))

        def crash_restart_and_overwrite() -> None:
            process.kill()
            process.start()
            with Storage(process.address) as other:
                other.set_file("big", io.BytesIO(os.urandom(size)))

        with pytest.raises(PreconditionError, match="changed"):
            storage.get_file("big", io.BytesIO(), progress=Interrupter(crash_restart_and_overwrite))
