"""The gRPC servicer: protobuf in, engine call, protobuf out. Nothing else lives here.

Errors are not handled per method: `map_errors` wraps every method once, mapping each
BlobstoreError through the one table in server/status.py.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import google_crc32c
import grpc

from blobstore.client.wire import encode_download_response
from blobstore.server import errors, status
from blobstore.server.auth import Metadata
from blobstore.server.convert import (
    ObjectFiller,
    fill_object,
    object_to_pb,
    optional_int,
    signed_url_method,
    storage_type,
    upload_spec,
)
from blobstore.server.engine import Engine, UploadWriter
from blobstore.server.handlers import handler_kind, rebuild
from blobstore.server.model import ANONYMOUS, BatchEntry, Caller
from blobstore.server.sessions import ResumableUpload, UploadSessions
from blobstore.server.signing import UrlSigner
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# Turns a request's metadata into its caller (reads the index; may raise Unauthenticated).
CallerResolver = Callable[[Metadata], Caller]

# Room kept in a BatchGet response for its framing, besides what batch_get counts per entry.
BATCH_RESPONSE_SLACK = 16 << 10
# Download messages carry at most this much, whatever the chunk size (4 MiB on S3): a client
# then holds a few MiB in flight, not a few chunks, and checks and writes in smaller steps.
DOWNLOAD_MESSAGE_BYTES = 1 << 20


def _anonymous(metadata: Metadata) -> Caller:
    return ANONYMOUS


class StorageServicer(pb_grpc.StorageServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        resolve_caller: CallerResolver = _anonymous,
        max_message_bytes: int,
        url_signer: UrlSigner | None = None,
        sessions: UploadSessions | None = None,
    ) -> None:
        self.engine = engine
        self._url_signer = url_signer
        self.sessions = sessions or UploadSessions(engine)
        self._resolve_caller = resolve_caller
        self._max_message_bytes = max_message_bytes
        # Set when the shutdown grace period is over: streams still running stop with UNAVAILABLE.
        self.stopping = False

    async def _caller(self, context: Context) -> Caller:
        return await self.engine.run_read(self._resolve_caller, context.invocation_metadata() or ())

    def _check_running(self) -> None:
        if self.stopping:
            raise errors.Unavailable("the server is shutting down; retry or resume against another server")

    async def Set(self, request: pb.SetRequest, context: Context) -> pb.SetResponse:
        info = await self.engine.set(
            await self._caller(context),
            storage_type(request.storage_type),
            request.key,
            request.value,
            content_type=request.content_type,
            metadata=dict(request.metadata) if request.metadata else None,
            if_generation_match=optional_int(request, "if_generation_match"),
            crc32c_expected=optional_int(request, "crc32c"),
        )
        response = pb.SetResponse()
        fill_object(response.object, info)
        return response

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        info, value = await self.engine.get(
            await self._caller(context),
            storage_type(request.storage_type),
            request.key,
            generation=optional_int(request, "generation"),
        )
        response = pb.GetResponse(value=value)
        fill_object(response.object, info)
        return response

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadRequest], context: Context) -> pb.UploadResponse:
        caller = await self._caller(context)
        writer: UploadWriter | None = None
        finish: pb.UploadRequest | None = None
        try:
            async for request in request_iterator:
                self._check_running()
                if finish is not None:
                    raise errors.InvalidArgument("message after finish_write; nothing was committed")
                if writer is None:
                    writer = await self._open_upload(caller, request)
                elif request.WhichOneof("first_message") is not None:
                    raise errors.InvalidArgument("spec and upload_id belong in the first message only")
                # Read once: every access of a bytes field copies it out of the message.
                data = request.data
                if data:
                    if request.HasField("crc32c") and google_crc32c.value(data) != request.crc32c:
                        raise errors.ChecksumMismatch(
                            f"CRC32C of the data at write_offset {request.write_offset} does not match; "
                            "nothing was committed"
                        )
                    await writer.write(
                        request.write_offset,
                        data,
                        known_crc32c=request.crc32c if request.HasField("crc32c") else None,
                    )
                elif request.write_offset != writer.size:
                    raise errors.InvalidArgument(
                        f"write_offset {request.write_offset} does not match the {writer.size} bytes received so far"
                    )
                if request.finish_write:
                    finish = request
            if writer is None:
                raise errors.InvalidArgument("empty upload stream: the first message must carry a spec")
            if finish is None:
                if isinstance(writer, ResumableUpload):
                    return pb.UploadResponse(persisted_size=await writer.suspend())
                raise errors.InvalidArgument("the stream ended without finish_write; nothing was committed")
            checksums = finish.object_checksums
            info = await writer.finish(
                crc32c_expected=checksums.crc32c if checksums.HasField("crc32c") else None,
                sha256_expected=checksums.sha256 or None,
            )
            return pb.UploadResponse(object=object_to_pb(info), persisted_size=info.size)
        finally:
            if writer is not None:
                await writer.abort()

    async def _open_upload(self, caller: Caller, request: pb.UploadRequest) -> UploadWriter:
        first = request.WhichOneof("first_message")
        if first == "spec":
            return await self.engine.run_read(self.engine.new_upload, caller, upload_spec(request.spec))
        if first == "upload_id":
            return await self.sessions.open(caller, request.upload_id)
        raise errors.InvalidArgument("the first Upload message must carry a spec or an upload_id")

    # Yields DownloadResponse messages already encoded (the method's serializer passes bytes on).
    async def Download(self, request: pb.DownloadRequest, context: Context) -> AsyncIterator[bytes]:  # type: ignore[override]
        download = await self.engine.open_download(
            await self._caller(context),
            storage_type(request.storage_type),
            request.key,
            offset=request.read_offset,
            limit=request.read_limit,
            generation=optional_int(request, "generation"),
        )
        try:
            # Messages are encoded here, not built as DownloadResponse: see encode_download_response.
            head = pb.DownloadResponse(
                object=object_to_pb(download.info),
                content_range=pb.ContentRange(
                    start=download.range.start, end=download.range.end, complete_length=download.range.complete_length
                ),
            ).SerializeToString()
            async for data, crc in download.pieces(max_bytes=DOWNLOAD_MESSAGE_BYTES):
                self._check_running()
                yield encode_download_response(data, crc, head)
                head = b""
            if head:
                yield head
        finally:
            download.close()

    async def Stat(self, request: pb.StatRequest, context: Context) -> pb.StatResponse:
        info = await self.engine.run_read(
            self.engine.stat, await self._caller(context), storage_type(request.storage_type), request.key
        )
        return pb.StatResponse(object=object_to_pb(info))

    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        await self.engine.delete(
            await self._caller(context),
            storage_type(request.storage_type),
            request.key,
            if_generation_match=optional_int(request, "if_generation_match"),
        )
        return pb.DeleteResponse()

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        page = await self.engine.run_read(
            functools.partial(
                self.engine.list,
                await self._caller(context),
                storage_type(request.storage_type),
                prefix=request.prefix,
                delimiter=request.delimiter,
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        response = pb.ListResponse(prefixes=page.prefixes, next_page_token=page.next_page_token)
        # Filled in place: building each Object and then copying it into the response cost
        # 6.4-9.1 ms per page of 1,000 against 4.7-5.2 (docs/benchmarks.md, optimisation log).
        add = response.objects.add
        for info in page.objects:
            fill_object(add(), info)
        return response

    async def StartUpload(self, request: pb.StartUploadRequest, context: Context) -> pb.StartUploadResponse:
        upload_id, expire_ns = await self.sessions.start(await self._caller(context), upload_spec(request.spec))
        response = pb.StartUploadResponse(upload_id=upload_id)
        response.expire_time.FromNanoseconds(expire_ns)
        return response

    async def QueryUpload(self, request: pb.QueryUploadRequest, context: Context) -> pb.QueryUploadResponse:
        state = await self.engine.run_read(self.sessions.query, await self._caller(context), request.upload_id)
        response = pb.QueryUploadResponse(persisted_size=state.persisted_size)
        if state.object is not None:
            response.object.CopyFrom(object_to_pb(state.object))
        return response

    async def CancelUpload(self, request: pb.CancelUploadRequest, context: Context) -> pb.CancelUploadResponse:
        await self.sessions.cancel(await self._caller(context), request.upload_id)
        return pb.CancelUploadResponse()

    # Contract methods whose implementation has not landed yet answer UNIMPLEMENTED.

    async def CreateSignedUrl(self, request: pb.CreateSignedUrlRequest, context: Context) -> pb.CreateSignedUrlResponse:
        if self._url_signer is None:
            raise errors.Unimplemented("this server hands out no signed URLs")
        caller = await self._caller(context)
        method = signed_url_method(request.method)
        kind = storage_type(request.storage_type)
        self.engine.authorize_signed_url(caller, kind, request.key, upload=method == "PUT")
        url, expires = self._url_signer.sign(method, caller.namespace, kind, request.key, request.expires_in_seconds)
        response = pb.CreateSignedUrlResponse(url=url)
        response.expire_time.FromSeconds(expires)
        return response

    async def BatchSet(self, request: pb.BatchSetRequest, context: Context) -> pb.BatchSetResponse:
        entries = [
            BatchEntry(
                entry.key,
                entry.value,
                entry.content_type,
                dict(entry.metadata) if entry.metadata else {},
                entry.if_generation_match if entry.HasField("if_generation_match") else None,
                # A CRC32C other than 0 was sent; only 0 needs asking (HasField costs a Python call).
                entry.crc32c or (0 if entry.HasField("crc32c") else None),
            )
            for entry in request.entries
        ]
        results = await self.engine.batch_set(await self._caller(context), storage_type(request.storage_type), entries)
        response = pb.BatchSetResponse()
        add = response.results.add
        fill = ObjectFiller().fill
        for result in results:
            if isinstance(result, errors.BlobstoreError):
                _fill_item_error(add().error, result)
            else:
                fill(add().object, result)
        return response

    async def BatchGet(self, request: pb.BatchGetRequest, context: Context) -> pb.BatchGetResponse:
        keys = list(request.keys)
        results = await self.engine.batch_get(
            await self._caller(context),
            storage_type(request.storage_type),
            keys,
            max_total_bytes=self._max_message_bytes - BATCH_RESPONSE_SLACK,
        )
        response = pb.BatchGetResponse()
        add = response.results.add
        for key, result in zip(keys, results, strict=True):
            item = add()
            item.key = key
            if isinstance(result, errors.BlobstoreError):
                _fill_item_error(item.error, result)
            else:
                fill_object(item.object, result[0])
                item.value = result[1]
        return response

    async def GetLimits(self, request: pb.GetLimitsRequest, context: Context) -> pb.GetLimitsResponse:
        caller = await self._caller(context)
        quota = await self.engine.run_read(self.engine.quota_status, caller.namespace)
        limits, usage = quota.limits, quota.usage
        config = self.engine.config
        return pb.GetLimitsResponse(
            namespace=caller.namespace,
            max_unary_value_bytes=config.max_unary_value,
            max_message_bytes=self._max_message_bytes,
            chunk_size_bytes=config.chunk_size,
            bytes=pb.Quota(limit=limits.max_bytes, used=usage.bytes),
            objects=pb.Quota(limit=limits.max_objects, used=usage.objects),
            open_uploads=pb.Quota(limit=limits.max_open_uploads, used=usage.open_uploads),
            requests_per_second=limits.requests_per_second,
            max_batch_entries=config.max_batch_entries,
        )


def _fill_item_error(message: pb.ItemError, exc: errors.BlobstoreError) -> None:
    message.SetInParent()
    message.code = status.grpc_code_number(exc)
    message.message = exc.message
    message.reason = exc.reason


def map_errors(service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with every BlobstoreError mapped to its status code, through the one table."""
    full_name = f"/{service}/{method}"
    kind = handler_kind(handler)
    behavior = getattr(handler, kind)
    # A streaming handler that writes through context.write (health Watch) is a coroutine, not a generator.
    wrap = _wrap_stream if inspect.isasyncgenfunction(behavior) else _wrap_unary
    return rebuild(handler, wrap(behavior, full_name), handler.request_deserializer, handler.response_serializer)


async def _abort(context: Context, method: str, exc: BaseException) -> None:
    if isinstance(exc, errors.BlobstoreError):
        code = status.grpc_code(exc)
        # The one place a failed request is logged (the telemetry interceptor adds the request id).
        reason = "" if exc.reason == code.name else f" ({exc.reason})"
        log.info(
            "%s failed: %s%s: %s",
            method,
            code.name,
            reason,
            exc.message,
            extra={"grpc_method": method, "grpc_code": code.name},
        )
        await context.abort(code, exc.message, trailing_metadata=((status.REASON_TRAILER, exc.reason),))
    log.exception(
        "%s failed: INTERNAL (unexpected %s)",
        method,
        type(exc).__name__,
        exc_info=exc,
        extra={"grpc_method": method, "grpc_code": "INTERNAL"},
    )
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: Context) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler chose its status itself (health Check of an unknown service)
        except (errors.BlobstoreError, Exception) as exc:
            await _abort(context, method, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise  # the handler chose its status itself (health Check of an unknown service)
        except (errors.BlobstoreError, Exception) as exc:
            await _abort(context, method, exc)

    return wrapper
