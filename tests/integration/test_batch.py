"""set_many / get_many through a real server: BatchSet and BatchGet, each key judged on its own."""

from __future__ import annotations

import os

import grpc
import pytest

from blobstore.client import BatchError, InvalidArgumentError, NotFoundError, PreconditionError, Storage
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import RunningServer


def test_set_many_then_get_many_round_trips(storage: Storage) -> None:
    values = {f"batch/{i:03d}": os.urandom(i * 10) for i in range(120)}
    infos = storage.set_many(values)
    assert set(infos) == set(values)
    assert all(infos[key].size == len(value) for key, value in values.items())
    assert storage.get_many(list(values)) == values


def test_one_bad_key_fails_that_key_not_the_batch(storage: Storage) -> None:
    with pytest.raises(BatchError) as caught:
        storage.set_many({"fine-1": b"1", "bad\x00key": b"2", "fine-2": "three"})
    failure = caught.value
    assert set(failure.errors) == {"bad\x00key"}
    assert isinstance(failure.errors["bad\x00key"], InvalidArgumentError)
    assert failure.errors["bad\x00key"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.results) == {"fine-1", "fine-2"}
    assert storage.get("fine-2") == b"three"
    assert storage.stat("fine-2").content_type.startswith("text/plain")


def test_preconditions_per_entry(storage: Storage) -> None:
    first = storage.set("guarded", b"old")
    with pytest.raises(BatchError) as caught:
        storage.set_many(
            {"guarded": b"new", "created": b"new", "stale": b"new"},
            if_generation_match={"guarded": first.generation, "created": 0, "stale": first.generation + 1000},
        )
    assert set(caught.value.errors) == {"stale"}
    error = caught.value.errors["stale"]
    assert isinstance(error, PreconditionError) and error.reason == "GENERATION_MISMATCH"
    assert storage.get_many(["guarded", "created", "stale"]) == {"guarded": b"new", "created": b"new"}


def test_mixed_sizes_including_values_too_large_for_one_call(storage: Storage) -> None:
    values = {
        "tiny": b"t",
        "empty": b"",
        "chunked": os.urandom(200 << 10),
        "unary-max": os.urandom(1 << 20),
        "streamed": os.urandom((1 << 20) + 1),
    }
    # Five values near 1 MiB do not fit one 4 MiB message: set_many splits the calls.
    values.update({f"filler-{i}": os.urandom(900 << 10) for i in range(5)})
    storage.set_many(values)
    assert storage.get_many(values) == values


def test_get_many_leaves_missing_keys_out(storage: Storage) -> None:
    storage.set("present", b"p")
    result = storage.get_many(["present", "absent"])
    assert result == {"present": b"p"}
    with pytest.raises(NotFoundError):
        storage.get("absent")


def test_get_many_reports_bad_keys(storage: Storage) -> None:
    storage.set("ok", b"v")
    with pytest.raises(BatchError) as caught:
        storage.get_many(["ok", "\x07"])
    assert isinstance(caught.value.errors["\x07"], InvalidArgumentError)
    assert caught.value.results == {"ok": b"v"}


def test_more_keys_than_one_call_takes(server: RunningServer) -> None:
    server.engine.config.max_batch_entries = 7
    with server.client() as storage:
        values = {f"many-{i}": str(i).encode() for i in range(30)}
        storage.set_many(values)
        assert storage.get_many(values) == values


def test_oversized_batch_is_refused_whole(server: RunningServer) -> None:
    server.engine.config.max_batch_entries = 3
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.StorageStub(channel)
        entries = [pb.BatchSetEntry(key=f"k{i}", value=b"v") for i in range(4)]
        with pytest.raises(grpc.RpcError) as caught:
            stub.BatchSet(pb.BatchSetRequest(entries=entries))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        response = stub.BatchSet(pb.BatchSetRequest(entries=entries[:3]))
        assert [result.HasField("object") for result in response.results] == [True, True, True]


def test_item_error_carries_code_message_and_reason(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.StorageStub(channel)
        response = stub.BatchSet(pb.BatchSetRequest(entries=[pb.BatchSetEntry(key="crc", value=b"v", crc32c=12345)]))
        error = response.results[0].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error.reason == "CHECKSUM_MISMATCH"
        assert "CRC32C" in error.message
        got = stub.BatchGet(pb.BatchGetRequest(keys=["crc"]))
        assert got.results[0].key == "crc"
        assert got.results[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
