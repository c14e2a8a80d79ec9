"""Every client method against a real server in process, and the status codes of the table."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest

from blobstore.client import (
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    PreconditionError,
    Storage,
)
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import RunningServer

MiB = 1 << 20


@pytest.fixture
def stub(server: RunningServer) -> pb_grpc.StorageStub:
    channel = grpc.insecure_channel(server.address)
    return pb_grpc.StorageStub(channel)


def write_random_file(path: Path, size: int) -> str:
    """Writes `size` random bytes in 8 MiB pieces; returns the SHA-256 hex."""
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            piece = os.urandom(min(remaining, 8 * MiB))
            sha.update(piece)
            f.write(piece)
            remaining -= len(piece)
    return sha.hexdigest()


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 * MiB):
            sha.update(piece)
    return sha.hexdigest()


def test_set_get_str_bytes_and_file_objects(storage: Storage, tmp_path: Path) -> None:
    info = storage.set("test", "Hello Storage")
    assert info.size == 13 and info.content_type.startswith("text/plain")
    assert storage.get("test") == b"Hello Storage"
    storage.set("bytes", b"\x00\xff" * 10)
    assert storage.get("bytes") == b"\x00\xff" * 10
    sent: list[int] = []
    storage.set_file("fileobj", io.BytesIO(b"from a file object"), progress=sent.append)
    assert sent == [18]
    assert storage.get("fileobj") == b"from a file object"
    text = tmp_path / "text.txt"
    text.write_text("héllo text mode\n", encoding="utf-8")
    with open(text) as fobj:  # the original guide opens files in text mode
        storage.set_file("textmode", fobj)
    assert storage.get("textmode") == "héllo text mode\n".encode()
    storage.set("empty", b"")
    assert storage.get("empty") == b""
    with pytest.raises(TypeError):
        storage.set("bad", 12345)  # type: ignore[arg-type]


def test_get_of_a_large_object_falls_back_to_streaming(storage: Storage) -> None:
    data = os.urandom(3 * MiB + 7)
    info = storage.set("large", data)  # over the unary limit: the client streams it
    assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.get("large") == data


def test_metadata_and_generations(storage: Storage) -> None:
    first = storage.set("k", b"1", content_type="application/x-test", metadata={"owner": "me"})
    stat = storage.stat("k")
    assert stat.metadata == {"owner": "me"} and stat.content_type == "application/x-test"
    assert stat.generation == first.generation and stat.created == stat.updated
    with pytest.raises(PreconditionError) as excinfo:
        storage.set("k", b"2", if_generation_match=0)
    assert excinfo.value.reason == "GENERATION_MISMATCH"
    second = storage.set("k", b"2", if_generation_match=first.generation)
    assert second.generation > first.generation and second.created == first.created
    with pytest.raises(PreconditionError):
        storage.delete("k", if_generation_match=first.generation)
    storage.delete("k", if_generation_match=second.generation)


def test_exists_delete_and_not_found(storage: Storage) -> None:
    assert not storage.exists("nope")
    storage.set("yes", b"1")
    assert storage.exists("yes")
    storage.delete("yes")
    assert not storage.exists("yes")
    with pytest.raises(NotFoundError):
        storage.get("yes")
    with pytest.raises(NotFoundError):
        storage.delete("yes")
    with pytest.raises(NotFoundError):
        storage.stat("yes")
    with pytest.raises(LookupError):  # NotFoundError is a LookupError too
        storage.get("yes")


def test_list_and_iter_list_page_through_everything(storage: Storage) -> None:
    keys = [f"dir/{i:04d}" for i in range(2500)] + ["other", "dir2/x"]
    for key in keys:
        storage.set(key, b"")
    assert storage.list(prefix="dir/") == sorted(k for k in keys if k.startswith("dir/"))
    assert storage.list() == sorted(keys)
    lazy = storage.iter_list(prefix="dir/", page_size=100)
    assert next(lazy) == "dir/0000"
    assert len(list(lazy)) == 2499
    assert storage.list_prefixes(delimiter="/") == (["other"], ["dir/", "dir2/"])
    assert storage.list(prefix="nothing-here") == []


def test_storage_types_are_separate(storage: Storage) -> None:
    for storage_type in ("data", "tmp", "result", "logs"):
        storage.set("k", storage_type, storage_type=storage_type)
    for storage_type in ("data", "tmp", "result", "logs"):
        assert storage.get("k", storage_type=storage_type) == storage_type.encode()
        assert storage.list(storage_type=storage_type) == ["k"]
    assert storage.stat("k", storage_type="tmp").expires is not None
    assert storage.stat("k").expires is None
    with pytest.raises(InvalidArgumentError, match="data, tmp, products, result, logs"):
        storage.get("k", storage_type="bogus")


def test_products_accept_uploads_but_reads_belong_to_the_catalog(storage: Storage) -> None:
    storage.set("raster.tif", b"pixels", storage_type="products")
    assert storage.exists("raster.tif", storage_type="products")
    assert storage.list(storage_type="products") == ["raster.tif"]
    with pytest.raises(PreconditionError, match="catalog"):
        storage.get("raster.tif", storage_type="products")
    with pytest.raises(PreconditionError, match="catalog"):
        storage.delete("raster.tif", storage_type="products")


def test_200_mib_round_trip_through_files(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    digest = write_random_file(source, 200 * MiB)
    sent: list[int] = []
    info = storage.set_file("big/file.bin", str(source), progress=sent.append)
    assert info.size == 200 * MiB and info.sha256 == digest
    assert sum(sent) == 200 * MiB and max(sent) == storage.chunk_size
    target = tmp_path / "target.bin"
    got = storage.get_file("big/file.bin", target)
    assert got.generation == info.generation
    assert sha256_of(target) == digest
    assert [p.name for p in tmp_path.iterdir() if ".part-" in p.name] == []
    with open(tmp_path / "target2.bin", "wb") as fobj:
        storage.get_file("big/file.bin", fobj)
    assert sha256_of(tmp_path / "target2.bin") == digest
    with open(source, "rb") as fobj:  # same bytes again, through a file object: dedup
        again = storage.set_file("big/copy.bin", fobj)
    assert again.sha256 == digest


def test_sha256_verified_on_the_client_when_asked(server: RunningServer, tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    source, target = tmp_path / "source.bin", tmp_path / "target.bin"
    source.write_bytes(data)
    with server.client(verify_sha256=True, resumable_threshold=1 << 20) as storage:
        info = storage.set_file("checked", source)  # the server compares the client's SHA-256 with its own
        assert storage.get_file("checked", target).sha256 == info.sha256 == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data


def test_failed_download_leaves_no_file_behind(storage: Storage, tmp_path: Path) -> None:
    folder = tmp_path / "downloads"
    folder.mkdir()
    with pytest.raises(NotFoundError):
        storage.get_file("missing", folder / "never.bin")
    assert list(folder.iterdir()) == []


def _upload(stub: pb_grpc.StorageStub, messages: list[pb.UploadRequest]) -> pb.UploadResponse:
    response: pb.UploadResponse = stub.Upload(iter(messages))
    return response


def _status(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = excinfo.value.code()
    return code


def test_chunk_with_wrong_crc32c_is_rejected_and_nothing_committed(stub: pb_grpc.StorageStub, storage: Storage) -> None:
    storage.set("victim", b"old value")
    data = os.urandom(2 * MiB)
    good = google_crc32c.value(data[:MiB])
    messages = [
        pb.UploadRequest(spec=pb.UploadSpec(key="victim"), write_offset=0, data=data[:MiB], crc32c=good),
        pb.UploadRequest(write_offset=MiB, data=data[MiB:], crc32c=good),  # wrong for this piece
        pb.UploadRequest(write_offset=2 * MiB, finish_write=True),
    ]
    assert _status(lambda: _upload(stub, messages)) == grpc.StatusCode.INVALID_ARGUMENT
    assert storage.get("victim") == b"old value"
    bad_object = [
        pb.UploadRequest(spec=pb.UploadSpec(key="victim"), write_offset=0, data=data),
        pb.UploadRequest(write_offset=len(data), finish_write=True, object_checksums=pb.ObjectChecksums(crc32c=good)),
    ]
    assert _status(lambda: _upload(stub, bad_object)) == grpc.StatusCode.INVALID_ARGUMENT
    assert storage.get("victim") == b"old value"


def test_invalid_argument_cases(stub: pb_grpc.StorageStub, storage: Storage) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _status(lambda: stub.Set(pb.SetRequest(key="", value=b"x"))) == invalid
    assert _status(lambda: stub.Set(pb.SetRequest(key="a\nb", value=b"x"))) == invalid
    assert _status(lambda: stub.Set(pb.SetRequest(key="k", value=b"x", storage_type=42))) == invalid  # type: ignore[arg-type]
    assert _status(lambda: stub.Set(pb.SetRequest(key="k", value=b"x" * (MiB + 1)))) == invalid
    assert _status(lambda: stub.Set(pb.SetRequest(key="k", value=b"x", crc32c=1))) == invalid
    spec = pb.UploadSpec(key="k")
    gap = [pb.UploadRequest(spec=spec, write_offset=0, data=b"abc"), pb.UploadRequest(write_offset=10, data=b"d")]
    assert _status(lambda: _upload(stub, gap)) == invalid
    after_finish = [
        pb.UploadRequest(spec=spec, write_offset=0, data=b"abc", finish_write=True),
        pb.UploadRequest(write_offset=3, data=b"more"),
    ]
    assert _status(lambda: _upload(stub, after_finish)) == invalid
    unfinished = [pb.UploadRequest(spec=spec, write_offset=0, data=b"abc")]
    assert _status(lambda: _upload(stub, unfinished)) == invalid
    assert _status(lambda: _upload(stub, [])) == invalid
    assert not storage.exists("k")


def test_not_found_out_of_range_and_precondition_cases(stub: pb_grpc.StorageStub, storage: Storage) -> None:
    assert _status(lambda: stub.Get(pb.GetRequest(key="missing"))) == grpc.StatusCode.NOT_FOUND
    assert _status(lambda: list(stub.Download(pb.DownloadRequest(key="missing")))) == grpc.StatusCode.NOT_FOUND
    resume = [pb.UploadRequest(upload_id="no-such-session", write_offset=0, finish_write=True)]
    assert _status(lambda: _upload(stub, resume)) == grpc.StatusCode.NOT_FOUND
    storage.set("small", b"12345")
    past_end = pb.DownloadRequest(key="small", read_offset=6)
    assert _status(lambda: list(stub.Download(past_end))) == grpc.StatusCode.OUT_OF_RANGE
    short = [
        pb.UploadRequest(spec=pb.UploadSpec(key="sized", size=10), write_offset=0, data=b"12345", finish_write=True)
    ]
    assert _status(lambda: _upload(stub, short)) == grpc.StatusCode.OUT_OF_RANGE
    storage.set("large", os.urandom(MiB + 1))
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Get(pb.GetRequest(key="large"))
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailers: list[Any] = [tuple(item) for item in excinfo.value.trailing_metadata()]  # type: ignore[arg-type]
    assert ("blobstore-error-reason", "OBJECT_TOO_LARGE_FOR_UNARY") in trailers
    stale = pb.DownloadRequest(key="small", generation=storage.stat("small").generation + 1)
    assert _status(lambda: list(stub.Download(stale))) == grpc.StatusCode.FAILED_PRECONDITION


def test_download_ranges_and_checksums(stub: pb_grpc.StorageStub, storage: Storage) -> None:
    data = os.urandom(2 * MiB + 333)
    storage.set("obj", data)
    responses = list(stub.Download(pb.DownloadRequest(key="obj", read_offset=MiB - 10, read_limit=MiB + 20)))
    first = responses[0]
    assert first.object.size == len(data) and first.object.checksums.sha256 == hashlib.sha256(data).digest()
    assert (first.content_range.start, first.content_range.end) == (MiB - 10, 2 * MiB + 10)
    assert all(google_crc32c.value(r.data) == r.crc32c for r in responses)
    assert b"".join(r.data for r in responses) == data[MiB - 10 : 2 * MiB + 10]
    assert all(not r.HasField("object") for r in responses[1:])


@pytest.mark.file_store
def test_corrupt_chunk_is_data_loss(server: RunningServer, storage: Storage) -> None:
    storage.set("obj", os.urandom(2 * MiB))
    chunk = next(p for p in (server.data_dir / "store" / "chunks").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(DataLossError):
        storage.get("obj")
