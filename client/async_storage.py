"""`AsyncStorage`: the Storage client for asyncio services, on grpc.aio.

Same methods, same arguments and same errors as `Storage`; the wire logic
(requests, checksums, resuming) is shared with it, and file reads and writes
run in worker threads so that the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import os
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any, BinaryIO

import grpc

from blobstore.client import errors
from blobstore.client.storage import (
    CHUNK_SIZE,
    OBJECT_TOO_LARGE_FOR_UNARY,
    DownloadState,
    Limits,
    ObjectInfo,
    PathOrFile,
    Progress,
    UploadEncoder,
    _Client,
    _open_for_reading,
    encode_value,
    keyed_request,
    list_request,
    set_request,
    signed_url_request,
    upload_spec,
    verify_value,
    writing_atomically,
)
from blobstore.v1 import storage_pb2 as pb


class AsyncStorage(_Client):
    """Asyncio client of a blobstore server.

    Create it inside a running event loop (its channel belongs to that loop);
    `async with AsyncStorage() as storage:` closes it at the end. Any number
    of tasks may share one AsyncStorage.
    """

    _asynchronous = True

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None

    # ------------------------------------------------------------------ small values

    async def set(
        self,
        key: str,
        value: str | bytes | bytearray | memoryview | IO[Any],
        storage_type: str = "data",
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_generation_match: int | None = None,
    ) -> ObjectInfo:
        """Stores `value` under `key`: a str (stored as UTF-8), bytes, or a file-like object."""
        options: dict[str, Any] = dict(
            content_type=content_type, metadata=metadata, if_generation_match=if_generation_match
        )
        if hasattr(value, "read"):
            return await self.set_file(key, value, storage_type, **options)  # type: ignore[arg-type]
        data, options["content_type"] = encode_value(value, content_type)  # type: ignore[arg-type]
        if len(data) > await self._unary_limit():
            return await self.set_file(key, io.BytesIO(data), storage_type, **options)
        response = await self._call(self._stub.Set, set_request(key, data, storage_type, **options))
        return ObjectInfo.from_pb(response.object)

    async def get(self, key: str, storage_type: str = "data") -> bytes:
        """Returns the value stored under `key`; large values are streamed transparently."""
        try:
            response = await self._call(self._stub.Get, keyed_request(pb.GetRequest, key, storage_type))
        except errors.StorageError as error:
            if error.reason != OBJECT_TOO_LARGE_FOR_UNARY:
                raise
            buffer = io.BytesIO()
            await self.get_file(key, buffer, storage_type)
            return buffer.getvalue()
        return verify_value(key, response)

    async def _unary_limit(self) -> int:
        if self._max_unary is None:
            try:
                self._max_unary = (await self.limits()).max_unary_value_bytes or CHUNK_SIZE
            except errors.StorageError:
                self._max_unary = CHUNK_SIZE
        return self._max_unary

    async def limits(self) -> Limits:
        """The server's limits, and the quotas of this caller's namespace with their current use."""
        response: pb.GetLimitsResponse = await self._call(self._stub.GetLimits, pb.GetLimitsRequest())
        return Limits.from_pb(response)

    # ------------------------------------------------------------------ streaming

    async def set_file(
        self,
        key: str,
        file: PathOrFile,
        storage_type: str = "data",
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_generation_match: int | None = None,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        """Uploads a file (a path or a file object) in constant memory, reading it off the loop."""
        encoder = UploadEncoder(upload_spec(key, storage_type, content_type, metadata, if_generation_match), progress)
        with _open_for_reading(file) as fobj:
            try:
                response = await self._stub.Upload(self._upload_messages(encoder, fobj), metadata=self._metadata)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc) from None
        return ObjectInfo.from_pb(response.object)

    async def _upload_messages(self, encoder: UploadEncoder, fobj: BinaryIO) -> AsyncIterator[pb.UploadRequest]:
        while data := await asyncio.to_thread(fobj.read, self.chunk_size):
            yield encoder.piece(data)
        yield encoder.finish()

    async def get_file(
        self, key: str, file: PathOrFile, storage_type: str = "data", *, progress: Progress | None = None
    ) -> ObjectInfo:
        """Downloads an object into a file (a path or a binary file object) in constant memory.

        Same guarantees as Storage.get_file: a path is replaced only by a fully
        verified copy, and a dropped connection resumes on the same generation.
        """
        state = DownloadState(key, storage_type, self.retries, progress)
        if isinstance(file, (str, os.PathLike)):
            with writing_atomically(file) as fobj:
                return await self._download_into(state, fobj)
        return await self._download_into(state, file)  # type: ignore[arg-type]

    async def _download_into(self, state: DownloadState, fobj: BinaryIO) -> ObjectInfo:
        while True:
            try:
                async for response in self._stub.Download(state.request, metadata=self._metadata):
                    if data := state.accept(response):
                        await asyncio.to_thread(fobj.write, data)
                return state.finish()
            except grpc.RpcError as exc:
                await asyncio.sleep(state.retry_delay(exc))

    # ------------------------------------------------------------------ signed URLs

    async def get_upload_url(self, key: str, storage_type: str = "data", expires_in: int = 3600) -> str:
        """A URL that uploads `key` with a plain HTTP PUT, no token needed (see Storage.get_upload_url)."""
        return await self._signed_url(key, storage_type, pb.CreateSignedUrlRequest.PUT, expires_in)

    async def get_signed_url(self, key: str, storage_type: str = "data", expires_in: int = 3600) -> str:
        """A URL that downloads `key` with a plain HTTP GET (Range supported), no token needed."""
        return await self._signed_url(key, storage_type, pb.CreateSignedUrlRequest.GET, expires_in)

    async def _signed_url(self, key: str, storage_type: str, method: int, expires_in: int) -> str:
        request = signed_url_request(key, storage_type, method, expires_in)
        response = await self._call(self._stub.CreateSignedUrl, request)
        url: str = response.url
        return url

    # ------------------------------------------------------------------ metadata

    async def stat(self, key: str, storage_type: str = "data") -> ObjectInfo:
        response = await self._call(self._stub.Stat, keyed_request(pb.StatRequest, key, storage_type))
        return ObjectInfo.from_pb(response.object)

    async def exists(self, key: str, storage_type: str = "data") -> bool:
        try:
            await self.stat(key, storage_type)
        except errors.NotFoundError:
            return False
        return True

    async def delete(self, key: str, storage_type: str = "data", *, if_generation_match: int | None = None) -> None:
        """Deletes `key`; NotFoundError when it does not exist."""
        request = keyed_request(pb.DeleteRequest, key, storage_type)
        if if_generation_match is not None:
            request.if_generation_match = if_generation_match
        await self._call(self._stub.Delete, request)

    async def list(self, prefix: str | None = None, storage_type: str = "data") -> builtins.list[str]:
        """Every key starting with `prefix`, in key order."""
        return [key async for key in self.iter_list(prefix, storage_type)]

    async def iter_list(
        self, prefix: str | None = None, storage_type: str = "data", *, page_size: int = 1000
    ) -> AsyncIterator[str]:
        """Keys starting with `prefix`, fetched a page at a time as you iterate."""
        async for info in self.iter_objects(prefix, storage_type, page_size=page_size):
            yield info.key

    async def iter_objects(
        self, prefix: str | None = None, storage_type: str = "data", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        async for response in self._pages(list_request(prefix, storage_type, page_size)):
            for message in response.objects:
                yield ObjectInfo.from_pb(message)

    async def list_prefixes(
        self, prefix: str | None = None, delimiter: str = "/", storage_type: str = "data"
    ) -> tuple[builtins.list[str], builtins.list[str]]:
        """One level of a key hierarchy: (keys directly under prefix, sub-prefixes)."""
        keys: builtins.list[str] = []
        prefixes: builtins.list[str] = []
        async for response in self._pages(list_request(prefix, storage_type, 0, delimiter)):
            keys.extend(message.key for message in response.objects)
            prefixes.extend(response.prefixes)
        return keys, prefixes

    async def _pages(self, request: pb.ListRequest) -> AsyncIterator[pb.ListResponse]:
        while True:
            response: pb.ListResponse = await self._call(self._stub.List, request)
            yield response
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token
