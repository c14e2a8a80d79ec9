"""Bare servicers: what Python's gRPC transport does with no storage engine behind it.

`python -m bench.bare --mode aio|sync --port N --data-dir D [--blob PATH]` serves the
blobstore contract's messages with nothing but the transport's own work:

- Set / Get keep values in a dict and answer with the same message shapes as
  blobstore (an Object with size, generation, times and checksums);
- Upload writes each message's bytes to one file and fdatasyncs it at the end;
- Download streams the bytes of --blob from memory in the same chunks and
  message shape as blobstore (first message carries the object, every message
  its CRC32C).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import google_crc32c
import grpc

from blobstore.client.memory import keep_freed_memory
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc

MAX_MESSAGE = (4 << 20) + (64 << 10)
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


class Canned:
    """The state both bare servicers share: values by key, and the blob's pieces in memory."""

    def __init__(self, data_dir: str, blob: str | None, chunk_size: int) -> None:
        self.data_dir = data_dir
        self.values: dict[str, tuple[bytes, int]] = {}
        self.generation = 0
        self.pieces: list[tuple[bytes, int]] = []
        self.blob_object = pb.Object()
        if blob:
            sha = hashlib.sha256()
            crc = 0
            with open(blob, "rb") as f:
                while piece := f.read(chunk_size):
                    self.pieces.append((piece, google_crc32c.value(piece)))
                    sha.update(piece)
                    crc = google_crc32c.extend(crc, piece)
            size = sum(len(piece) for piece, _ in self.pieces)
            self.blob_object = self.object("blob", size, crc)
            self.blob_object.checksums.sha256 = sha.digest()

    def object(self, key: str, size: int, crc: int) -> pb.Object:
        self.generation += 1
        message = pb.Object(
            key=key,
            storage_type=pb.STORAGE_TYPE_DATA,
            size=size,
            generation=self.generation,
            checksums=pb.ObjectChecksums(crc32c=crc, sha256=bytes(32)),
        )
        now = time.time_ns()
        message.create_time.FromNanoseconds(now)
        message.update_time.FromNanoseconds(now)
        return message

    def set(self, request: pb.SetRequest) -> pb.SetResponse:
        crc = request.crc32c if request.HasField("crc32c") else 0
        self.values[request.key] = (request.value, crc)
        return pb.SetResponse(object=self.object(request.key, len(request.value), crc))

    def get(self, request: pb.GetRequest) -> pb.GetResponse:
        value, crc = self.values.get(request.key, (b"", 0))
        return pb.GetResponse(object=self.object(request.key, len(value), crc), value=value)

    def limits(self) -> pb.GetLimitsResponse:
        return pb.GetLimitsResponse(
            max_unary_value_bytes=1 << 20, max_message_bytes=MAX_MESSAGE, chunk_size_bytes=1 << 20
        )

    def open_sink(self) -> int:
        path = os.path.join(self.data_dir, "upload.bin")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def download_messages(self) -> Iterator[pb.DownloadResponse]:
        """The blob as blobstore streams it: the object and range in the first message, CRC32C in each."""
        size = self.blob_object.size
        first: pb.DownloadResponse | None = pb.DownloadResponse(
            object=self.blob_object, content_range=pb.ContentRange(start=0, end=size, complete_length=size)
        )
        for data, crc in self.pieces:
            if first is not None:
                first.data, first.crc32c = data, crc
                yield first
                first = None
            else:
                yield pb.DownloadResponse(data=data, crc32c=crc)


class AioBare(pb_grpc.StorageServicer):
    def __init__(self, canned: Canned) -> None:
        self.canned = canned

    async def Set(self, request: pb.SetRequest, context: Any) -> pb.SetResponse:
        return self.canned.set(request)

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        return self.canned.get(request)

    async def GetLimits(self, request: pb.GetLimitsRequest, context: Any) -> pb.GetLimitsResponse:
        return self.canned.limits()

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadRequest], context: Any) -> pb.UploadResponse:
        fd = self.canned.open_sink()
        size = 0
        try:
            async for request in request_iterator:
                if request.data:
                    os.write(fd, request.data)
                    size += len(request.data)
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)
        finally:
            os.close(fd)
        return pb.UploadResponse(object=self.canned.object("upload", size, 0), persisted_size=size)

    async def Download(self, request: pb.DownloadRequest, context: Any) -> AsyncIterator[pb.DownloadResponse]:
        for message in self.canned.download_messages():
            yield message


class SyncBare(pb_grpc.StorageServicer):
    def __init__(self, canned: Canned) -> None:
        self.canned = canned

    def Set(self, request: pb.SetRequest, context: Any) -> pb.SetResponse:
        return self.canned.set(request)

    def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        return self.canned.get(request)

    def GetLimits(self, request: pb.GetLimitsRequest, context: Any) -> pb.GetLimitsResponse:
        return self.canned.limits()

    def Upload(self, request_iterator: Iterator[pb.UploadRequest], context: Any) -> pb.UploadResponse:
        fd = self.canned.open_sink()
        size = 0
        try:
            for request in request_iterator:
                if request.data:
                    os.write(fd, request.data)
                    size += len(request.data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return pb.UploadResponse(object=self.canned.object("upload", size, 0), persisted_size=size)

    def Download(self, request: pb.DownloadRequest, context: Any) -> Iterator[pb.DownloadResponse]:
        yield from self.canned.download_messages()


async def serve_aio(canned: Canned, port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    # The bare servicers answer only what the benchmark calls; the rest stays UNIMPLEMENTED.
    pb_grpc.add_StorageServicer_to_server(AioBare(canned), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_sync(canned: Canned, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    pb_grpc.add_StorageServicer_to_server(SyncBare(canned), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["aio", "sync"], default="aio")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--blob")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    args = parser.parse_args()
    # The allocator settings blobstore runs with: glibc's defaults made the bare servicer's
    # 4 MiB messages cost it twice the CPU (docs/benchmarks.md, item 23), which is no limit.
    keep_freed_memory()
    canned = Canned(args.data_dir, args.blob, args.chunk_size)
    if args.mode == "aio":
        asyncio.run(serve_aio(canned, args.port))
    else:
        serve_sync(canned, args.port)


if __name__ == "__main__":
    main()
