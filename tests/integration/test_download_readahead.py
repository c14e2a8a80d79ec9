"""Downloads that span more chunks than the read-ahead window holds, on either backend pair.

The s3 store reads several chunk objects ahead of the stream (backends.py raises the
read-ahead and the chunk size there), so these tests size their objects from the server's
own configuration: the window is always exceeded, whatever the backend.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import grpc
import pytest

from blobstore.client.storage import Storage, channel_options
from blobstore.server.engine import EngineConfig, open_engine
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server, stop_server


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.StorageStub]:
    with grpc.insecure_channel(server.address, options=channel_options()) as channel:
        yield pb_grpc.StorageStub(channel)


def stored_object(server: RunningServer, storage: Storage, key: str) -> tuple[bytes, int]:
    """Random bytes of two chunks more than the read-ahead window, the last one partial."""
    config = server.engine.config
    assert config.download_readahead >= 2
    data = os.urandom((config.download_readahead + 2) * config.chunk_size + 12_345)
    storage.set(key, data)
    return data, config.chunk_size


def test_ranges_across_many_chunks_return_exactly_their_bytes(
    server: RunningServer, storage: Storage, stub: pb_grpc.StorageStub
) -> None:
    data, chunk = stored_object(server, storage, "many")
    ranges = [
        (0, 0),  # everything
        (chunk - 1, 2),  # the two bytes around the first boundary
        (chunk + 5, 3 * chunk),  # from inside one chunk to inside the fourth after it
        (1, len(data) - 2),  # all but the first and last byte
        (len(data) - 7, 0),  # the tail of the partial last chunk
    ]
    for offset, limit in ranges:
        responses = list(stub.Download(pb.DownloadRequest(key="many", read_offset=offset, read_limit=limit)))
        end = len(data) if limit == 0 else offset + limit
        assert all(google_crc32c.value(r.data) == r.crc32c for r in responses)
        assert all(len(r.data) <= chunk for r in responses)
        assert b"".join(r.data for r in responses) == data[offset:end], (offset, limit)


def test_a_corrupt_chunk_inside_the_window_stops_the_stream_before_its_bytes(
    server: RunningServer, storage: Storage, stub: pb_grpc.StorageStub
) -> None:
    data, chunk = stored_object(server, storage, "bad")
    third = data[2 * chunk : 3 * chunk]
    digest = hashlib.sha256(third).digest()
    damaged = bytes([third[0] ^ 0xFF]) + third[1:]
    store = server.engine.chunks
    path = store.local_path(digest)
    if path is not None:
        Path(path).write_bytes(damaged)
    else:
        store.put(digest, damaged)  # an object store replaces the object: the same name, other bytes
    received = bytearray()
    with pytest.raises(grpc.RpcError) as failure:
        for response in stub.Download(pb.DownloadRequest(key="bad")):
            received += response.data
    assert failure.value.code() == grpc.StatusCode.DATA_LOSS
    assert bytes(received) == data[: 2 * chunk]  # read ahead, but never served


def test_a_cancelled_download_releases_its_chunks(
    server: RunningServer, storage: Storage, stub: pb_grpc.StorageStub
) -> None:
    data, chunk = stored_object(server, storage, "dropped")
    store = server.engine.chunks
    assert len(list(store.iter_digests())) == len(data) // chunk + 1
    call = stub.Download(pb.DownloadRequest(key="dropped"))
    first = next(call)
    assert first.data == data[: len(first.data)]
    call.cancel()  # the client goes away with chunks still being read ahead for it
    storage.delete("dropped")
    # A pin the abandoned stream kept would keep its chunk forever.
    deadline = time.monotonic() + 60
    while list(store.iter_digests()):
        assert time.monotonic() < deadline, "chunks of the cancelled download were never released"
        time.sleep(0.1)


@pytest.mark.file_store
def test_download_messages_stay_small_when_chunks_are_large(tmp_path: Path) -> None:
    # A chunk store with 4 MiB chunks (what the s3 backend uses) still streams 1 MiB messages,
    # each with its own CRC32C, so a client never holds more than a few MiB in flight.
    data_dir = tmp_path / "data"
    running = start_server(data_dir, engine=open_engine(str(data_dir), EngineConfig(chunk_size=4 << 20)))
    try:
        data = os.urandom(2 * (4 << 20) + 123_456)
        with running.client() as storage:
            storage.set_file("large-chunks", io.BytesIO(data))
        with grpc.insecure_channel(running.address, options=channel_options()) as channel:
            stub = pb_grpc.StorageStub(channel)
            for offset in (0, (4 << 20) - 10):
                messages = list(stub.Download(pb.DownloadRequest(key="large-chunks", read_offset=offset)))
                assert all(len(m.data) <= 1 << 20 for m in messages)
                assert all(google_crc32c.value(m.data) == m.crc32c for m in messages)
                assert b"".join(m.data for m in messages) == data[offset:]
    finally:
        stop_server(running)
