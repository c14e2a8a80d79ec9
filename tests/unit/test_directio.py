"""DirectWriter: a new file written with O_DIRECT through an aligned buffer holds exactly the
bytes written, whatever the piece sizes; where O_DIRECT is refused it writes through the cache."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest

from blobstore.client.directio import ALIGNMENT, DirectWriter

SIZES = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, 5 * ALIGNMENT + 3, 1 << 20, 3 << 20]


def write_in_pieces(path: Path, data: bytes, seed: int, buffer_bytes: int) -> DirectWriter:
    pieces = random.Random(seed)
    with DirectWriter(str(path), buffer_bytes=buffer_bytes) as writer:
        at = 0
        while at < len(data):
            step = pieces.choice([1, 7, ALIGNMENT, ALIGNMENT + 1, 65536, 1 << 20])
            assert writer.write(data[at : at + step]) == len(data[at : at + step])
            at += step
    return writer


@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_exactly_what_was_written(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    for seed, buffer_bytes in [(1, 4 << 20), (2, 3 * ALIGNMENT), (3, ALIGNMENT)]:
        path = tmp_path / f"out-{seed}"
        write_in_pieces(path, data, seed, buffer_bytes)
        assert path.read_bytes() == data


def test_an_existing_file_is_replaced_not_merged(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"x" * (3 * ALIGNMENT))
    write_in_pieces(path, b"short", 0, 4 << 20)
    assert path.read_bytes() == b"short"


@pytest.mark.usefixtures("file_system_without_o_direct")
def test_a_file_system_refusing_o_direct_at_open_gets_cached_writes(tmp_path: Path) -> None:
    data = os.urandom(ALIGNMENT * 3 + 11)
    writer = write_in_pieces(tmp_path / "out", data, 4, 4 << 20)
    assert not writer.direct
    assert (tmp_path / "out").read_bytes() == data


def test_a_file_system_refusing_o_direct_writes_midway_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DirectWriter(str(tmp_path / "probe")) as probe:
        pass
    if not probe.direct:
        pytest.skip("this file system refuses O_DIRECT already at open")
    real_write = os.write
    direct_writes = 0

    def refusing_the_second(fd: int, data: bytes) -> int:
        nonlocal direct_writes
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes += 1
            if direct_writes == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_the_second)
    data = os.urandom(10 * ALIGNMENT + 5)
    writer = write_in_pieces(tmp_path / "out", data, 5, 2 * ALIGNMENT)
    assert direct_writes == 2 and not writer.direct
    assert (tmp_path / "out").read_bytes() == data
