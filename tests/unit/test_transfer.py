"""The client's rewindable upload source: which offsets it can resume from, with the right checksums."""

from __future__ import annotations

import hashlib
import io
import os

import google_crc32c
import pytest

from blobstore.client.transfer import UploadSource, remaining_size


class Pipe(io.RawIOBase):
    """A stream that cannot seek, like a pipe or a socket."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


def _drain(source: UploadSource, piece: int = 1000) -> bytes:
    out = bytearray()
    while data := source.read(piece):
        out += data
    return bytes(out)


def _assert_checksums_at(source: UploadSource, data: bytes) -> None:
    prefix = data[: source.offset]
    assert source.crc == google_crc32c.value(prefix)
    assert source.sha.digest() == hashlib.sha256(prefix).digest()


@pytest.mark.parametrize("make", [io.BytesIO, Pipe], ids=["seekable", "pipe"])
def test_rewinding_replays_the_same_bytes_with_the_same_checksums(make: type) -> None:
    data = os.urandom(10_000)
    source = UploadSource(make(data), window=100_000)
    assert _drain(source) == data
    for position in (7_000, 2_500, 0, 10_000):
        with source.lock:
            generation = source.generation
            assert source.rewind(position)
            assert source.generation > generation
        _assert_checksums_at(source, data)
        assert _drain(source, 777) == data[position:]
        _assert_checksums_at(source, data)


def test_a_pipe_resumes_only_inside_its_window() -> None:
    data = os.urandom(10_000)
    source = UploadSource(Pipe(data), window=3_000)
    assert _drain(source) == data
    assert not source.rewind(1_000)
    assert source.rewind(8_000)
    assert _drain(source) == data[8_000:]
    assert remaining_size(Pipe(data)) is None  # unknown size: set_file uses a resumable session


def test_a_seekable_file_may_skip_ahead_to_a_session_persisted_earlier() -> None:
    data = os.urandom(10_000)
    fobj = io.BytesIO(b"header" + data)
    fobj.seek(6)
    assert remaining_size(fobj) == len(data)
    source = UploadSource(fobj)
    assert source.rewind(4_096)
    _assert_checksums_at(source, data)
    assert _drain(source) == data[4_096:]
    assert not UploadSource(io.BytesIO(data)).rewind(20_000)
