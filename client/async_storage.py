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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import IO, Any, TypeVar

import grpc

from blobstore.client import errors
from blobstore.client.memory import release_freed_memory, transfer_in_progress
from blobstore.client.storage import (
    DEFAULT_MAX_UNARY,
    OBJECT_TOO_LARGE_FOR_UNARY,
    DownloadState,
    Limits,
    ObjectInfo,
    PathOrFile,
    Progress,
    UploadStatus,
    Writable,
    _Client,
    _open_for_reading,
    backoff_delay,
    encode_value,
    keyed_request,
    list_request,
    next_upload_request,
    restart_stream,
    resume_stream,
    set_request,
    signed_url_request,
    transient,
    upload_spec,
    verify_value,
    writing_atomically,
)
from blobstore.client.transfer import UploadSource, remaining_size
from blobstore.client.wire import first_message_head
from blobstore.v1 import storage_pb2 as pb

T = TypeVar("T")


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
                self._max_unary = (await self.limits()).max_unary_value_bytes or DEFAULT_MAX_UNARY
            except errors.StorageError:
                self._max_unary = DEFAULT_MAX_UNARY
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
        upload_id: str | None = None,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        """Uploads a file (a path or a file object) in constant memory, reading it off the loop.

        Same behaviour as Storage.set_file: large files and streams of unknown size go
        through a resumable session that survives transient failures, small files are
        sent again from the start.
        """
        spec = upload_spec(key, storage_type, content_type, metadata, if_generation_match)
        with _open_for_reading(file) as fobj:
            source = UploadSource(fobj, window=self.resume_window, sha256=self.verify_sha256)
            with transfer_in_progress(lambda: source.offset, _release_off_the_loop):
                size = remaining_size(fobj)
                if upload_id is None and size is not None and size <= self.resumable_threshold:
                    return await self._upload_in_one_stream(spec, source, progress)
                if upload_id is not None:
                    return await self._upload_session(upload_id, source, progress)
                upload_id = await self._retrying(lambda: self._start_session(spec))
                try:
                    return await self._upload_session(upload_id, source, progress)
                except errors.StorageError as error:
                    if not transient(error):
                        try:
                            await self.cancel_upload(upload_id)
                        except errors.StorageError:
                            pass
                    raise

    async def _upload_in_one_stream(
        self, spec: pb.UploadSpec, source: UploadSource, progress: Progress | None
    ) -> ObjectInfo:
        attempts = self.retries if not spec.HasField("if_generation_match") else 0
        for attempt in range(attempts + 1):
            generation = await asyncio.to_thread(restart_stream, source)
            try:
                response = await self._upload(
                    self._upload_messages(source, generation, progress, spec=spec), metadata=self._metadata
                )
                return ObjectInfo.from_pb(response.object)
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
                if not transient(error) or attempt >= attempts:
                    raise error from None
                await asyncio.sleep(backoff_delay(attempt))
        raise AssertionError("unreachable")

    async def _upload_session(self, upload_id: str, source: UploadSource, progress: Progress | None) -> ObjectInfo:
        attempt = 0
        persisted = -1
        while True:
            try:
                status = await self.query_upload(upload_id)
                if status.object is not None:
                    return status.object
                if status.persisted_size > persisted:
                    attempt = 0  # progress since the last failure: the retry budget starts over
                persisted = status.persisted_size
                generation = await asyncio.to_thread(resume_stream, source, upload_id, persisted)
                response = await self._upload(
                    self._upload_messages(source, generation, progress, upload_id=upload_id),
                    metadata=self._metadata,
                )
                return ObjectInfo.from_pb(response.object)
            except (grpc.RpcError, errors.StorageError) as exc:
                error = errors.from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else exc
                # ABORTED: the server has not yet noticed that our previous stream died.
                retry = transient(error) or error.code == grpc.StatusCode.ABORTED
                if not retry or attempt >= self.retries:
                    raise error from None
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1

    async def _upload_messages(
        self,
        source: UploadSource,
        generation: int,
        progress: Progress | None,
        *,
        spec: pb.UploadSpec | None = None,
        upload_id: str = "",
    ) -> AsyncIterator[bytes]:
        head = first_message_head(spec, upload_id)
        while message := await asyncio.to_thread(next_upload_request, source, generation, self.chunk_size, head):
            head = b""
            yield message.wire
            if not message.data_size:
                return
            if progress is not None:
                progress(message.data_size)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except errors.StorageError as error:
                if not transient(error) or attempt >= self.retries:
                    raise
                await asyncio.sleep(backoff_delay(attempt))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ resumable sessions

    async def start_upload(
        self,
        key: str,
        storage_type: str = "data",
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_generation_match: int | None = None,
        size: int | None = None,
    ) -> str:
        """Opens a resumable upload session on the server; returns its id (see set_file's upload_id)."""
        spec = upload_spec(key, storage_type, content_type, metadata, if_generation_match, size)
        return await self._start_session(spec)

    async def _start_session(self, spec: pb.UploadSpec) -> str:
        response = await self._call(self._stub.StartUpload, pb.StartUploadRequest(spec=spec))
        upload_id: str = response.upload_id
        return upload_id

    async def query_upload(self, upload_id: str) -> UploadStatus:
        """How many bytes of a session the server holds durably, and the object once committed."""
        request = pb.QueryUploadRequest(upload_id=upload_id)
        response: pb.QueryUploadResponse = await self._retrying(lambda: self._call(self._stub.QueryUpload, request))
        committed = ObjectInfo.from_pb(response.object) if response.HasField("object") else None
        return UploadStatus(response.persisted_size, committed)

    async def cancel_upload(self, upload_id: str) -> None:
        """Abandons a session; the server frees what it stored."""
        await self._call(self._stub.CancelUpload, pb.CancelUploadRequest(upload_id=upload_id))

    async def get_file(
        self, key: str, file: PathOrFile, storage_type: str = "data", *, progress: Progress | None = None
    ) -> ObjectInfo:
        """Downloads an object into a file (a path or a binary file object) in constant memory.

        Same guarantees as Storage.get_file: a path is replaced only by a fully
        verified copy, and a dropped connection resumes on the same generation.
        """
        state = DownloadState(key, storage_type, self.retries, progress, sha256=self.verify_sha256)
        with transfer_in_progress(lambda: state.received, _release_off_the_loop):
            if isinstance(file, (str, os.PathLike)):
                with writing_atomically(file) as fobj:
                    return await self._download_into(state, fobj)
            return await self._download_into(state, file)  # type: ignore[arg-type]

    async def _download_into(self, state: DownloadState, fobj: Writable) -> ObjectInfo:
        while True:
            try:
                async for piece in self._download(state.request, metadata=self._metadata):
                    if data := state.accept(piece):
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


def _release_off_the_loop() -> None:
    # malloc_trim takes 1-3 ms after a large transfer: not on the event loop, and nobody waits for it.
    asyncio.get_running_loop().run_in_executor(None, release_freed_memory)
