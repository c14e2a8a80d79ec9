"""The client's rewindable upload source: which offsets it can resume from, with the right checksums."""

from __future__ import annotations

import hashlib
import io
import os
import threading

import google_crc32c
import pytest

from blobstore.client.errors import DataLossError
from blobstore.client.storage import DownloadState, WriteBehind, next_upload_request
from blobstore.client.transfer import UploadSource, remaining_size
from blobstore.client.wire import decode_download_response
from blobstore.v1 import storage_pb2 as pb


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
    while data := source.read_with_crc32c(piece)[0]:
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


@pytest.mark.parametrize("sha256", [True, False])
def test_the_final_upload_message_carries_the_sha256_only_when_asked(sha256: bool) -> None:
    data = os.urandom(2500)
    source = UploadSource(io.BytesIO(data), sha256=sha256)
    messages: list[pb.UploadRequest] = []
    while (message := next_upload_request(source, source.generation, 1000, b"")) is not None:
        messages.append(pb.UploadRequest.FromString(message.wire))
        if messages[-1].finish_write:
            break
    final = messages[-1]
    assert b"".join(m.data for m in messages) == data
    assert final.object_checksums.crc32c == google_crc32c.value(data)
    assert final.object_checksums.sha256 == (hashlib.sha256(data).digest() if sha256 else b"")
    # A rewind after a failure rebuilds the same state either way.
    assert source.rewind(1200)
    assert source.crc == google_crc32c.value(data[:1200])
    assert source.sha.digest() == (hashlib.sha256(data[:1200]).digest() if sha256 else b"")


def _download(data: bytes, *, sha256_recorded: bytes, sha256: bool, crc_flip: int = 0) -> DownloadState:
    state = DownloadState("k", "data", retries=0, sha256=sha256)
    first = pb.DownloadResponse(data=data[:1000], crc32c=google_crc32c.value(data[:1000]))
    first.object.key = "k"
    first.object.size = len(data)
    first.object.generation = 1
    first.object.checksums.crc32c = google_crc32c.value(data) ^ crc_flip
    first.object.checksums.sha256 = sha256_recorded
    state.accept(decode_download_response(first.SerializeToString()))
    rest = pb.DownloadResponse(data=data[1000:], crc32c=google_crc32c.value(data[1000:]))
    state.accept(decode_download_response(rest.SerializeToString()))
    return state


def test_downloads_check_the_crc32c_always_and_the_sha256_when_asked() -> None:
    data = os.urandom(3000)
    good, forged = hashlib.sha256(data).digest(), hashlib.sha256(b"other").digest()
    assert _download(data, sha256_recorded=good, sha256=True).finish().size == len(data)
    with pytest.raises(DataLossError, match="SHA-256"):
        _download(data, sha256_recorded=forged, sha256=True).finish()
    assert _download(data, sha256_recorded=forged, sha256=False).finish().size == len(data)
    # The CRC32C of the whole object is checked whatever the setting.
    with pytest.raises(DataLossError, match="CRC32C"):
        _download(data, sha256_recorded=good, sha256=False, crc_flip=1).finish()
    with pytest.raises(DataLossError, match="in transit"):
        DownloadState("k", "data", retries=0).accept(
            decode_download_response(pb.DownloadResponse(data=b"abc", crc32c=1).SerializeToString())
        )


class _GatedFile(io.BytesIO):
    """A file whose writes wait until the gate opens, like a slow disk."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.gate.wait(30)
        return super().write(data)


def test_write_behind_holds_at_most_its_window_of_bytes() -> None:
    piece = 4 << 20
    sink = _GatedFile()
    with WriteBehind(sink, window=piece) as writer:
        writer.write(b"a" * piece)  # queued: the window is full, the disk has not taken it yet
        second = threading.Thread(target=writer.write, args=(b"b" * piece,))
        second.start()
        second.join(0.5)
        assert second.is_alive(), "a second piece was queued beyond the window"
        sink.gate.set()
        second.join(30)
        writer.drain()
    assert sink.getvalue() == b"a" * piece + b"b" * piece
