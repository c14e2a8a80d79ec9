"""The file chunk store writes chunks with O_DIRECT through an aligned buffer, or through the
page cache where the file system refuses O_DIRECT; either way a chunk reads back exactly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from blobstore.server.chunkstore import DIRECT_ALIGNMENT, DIRECT_WINDOW, FileChunkStore

# Around the alignment, where padding and truncation could go wrong.
SIZES = [
    1,
    DIRECT_ALIGNMENT - 1,
    DIRECT_ALIGNMENT,
    DIRECT_ALIGNMENT + 1,
    3 * DIRECT_ALIGNMENT + 17,
    DIRECT_WINDOW,
    DIRECT_WINDOW + 5,
    3 * DIRECT_WINDOW + DIRECT_ALIGNMENT,  # a chunk size over the window: several windows, none padded
    4 << 20,
]


def put_and_check(store: FileChunkStore, sizes: list[int]) -> None:
    for size in sizes:
        data = os.urandom(size)
        digest = hashlib.sha256(data).digest()
        store.put(digest, data)
        assert os.path.getsize(store.path(digest)) == size
        assert store.read(digest) == data
        assert store.read(digest, 1, 3) == data[1:4]
    store.sync()
    assert os.listdir(store._tmp) == []


def test_chunks_of_every_size_read_back_exactly(tmp_path: Path) -> None:
    store = FileChunkStore(str(tmp_path))
    put_and_check(store, SIZES + list(reversed(SIZES)))  # the buffer grows, then is reused
    assert len(store._aligned.buffer) <= DIRECT_WINDOW  # however large the chunk
    # On the file systems CI and the benchmarks use (ext4, xfs), the direct path is the one taken.
    if os.uname().sysname == "Linux" and _supports_direct(tmp_path):
        assert store.direct_io


@pytest.mark.usefixtures("file_system_without_o_direct")
def test_a_file_system_without_o_direct_gets_buffered_writes(tmp_path: Path) -> None:
    store = FileChunkStore(str(tmp_path))
    put_and_check(store, SIZES)
    assert not store.direct_io


def _supports_direct(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True
