"""The signed-URL HTTP endpoint: PUT, GET and HEAD of one object, authorized by the URL alone.

Thin like the gRPC servicer: it checks the URL's signature, then calls the same
engine (uploads go through UploadWriter: chunks, checksums, atomic commit,
dedup), and maps domain errors through the one table in server/status.py.

Downloads from a local chunk store go out with sendfile, but only after each
chunk file has passed its CRC32C check: the first chunk is checked before the
status line is sent, so a corrupt object starts with a 500; a later corrupt
chunk cuts the connection short instead of sending a wrong byte.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import string
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from email.utils import formatdate
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_urldispatcher import _default_expect_handler

from blobstore.server import errors, status
from blobstore.server.engine import Download, Engine
from blobstore.server.model import Caller, ObjectInfo, Role, UploadSpec
from blobstore.server.signing import URL_PATH_PREFIX, Grant, UrlSigner

log = logging.getLogger(__name__)

ROUTE = URL_PATH_PREFIX + "{storage_type}/{key:.+}"
REASON_HEADER = "x-blobstore-error"
CRC32C_HEADER = "x-checksum-crc32c"
SHA256_HEADER = "x-checksum-sha256"
GENERATION_HEADER = "x-generation"
READ_SIZE = 1 << 20
FALLBACK_CONTENT_TYPE = "application/octet-stream"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: errors.BlobstoreError, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status.http_status(exc),
        text=f"{exc.reason}: {exc.message}\n",
        headers={REASON_HEADER: exc.reason, **(headers or {})},
    )


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.BlobstoreError as exc:
        log.info("%s %s failed: %s %s", request.method, request.path, exc.reason, exc.message)
        return error_response(exc)


class AccessLogger(AbstractAccessLogger):
    """One line per request, without the query string: a signature in a log is a usable URL."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )


def _bearer(grant: Grant) -> Caller:
    # The URL is the authority: CreateSignedUrl checked that its signer may do
    # exactly this one thing (catalog-only reads included), and the signature
    # pins the method, namespace, storage type and key.
    return Caller(namespace=grant.namespace, roles=frozenset({Role.USER, Role.CATALOG}))


def _decode_checksum(name: str, value: str, size: int) -> bytes:
    """A checksum header in hex or base64 (S3's and GCS's form)."""
    value = value.strip()
    try:
        # Unambiguous: base64 of 4 or 32 bytes always ends in '=' padding, hex never does.
        hex_form = len(value) == 2 * size and all(c in string.hexdigits for c in value)
        raw = bytes.fromhex(value) if hex_form else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != size:
        raise errors.InvalidArgument(f"{name} must be {size} bytes in hex or base64, not {value!r}")
    return raw


class ExpectedChecksums:
    def __init__(self, headers: Mapping[str, str]) -> None:
        md5 = headers.get(hdrs.CONTENT_MD5)
        crc = headers.get(CRC32C_HEADER)
        sha = headers.get(SHA256_HEADER)
        # Content-MD5 is base64 by definition (RFC 1864).
        self.md5 = None
        if md5 is not None:
            try:
                self.md5 = base64.b64decode(md5.strip(), validate=True)
            except binascii.Error:
                self.md5 = b""
            if len(self.md5) != 16:
                raise errors.InvalidArgument(f"Content-MD5 must be the base64 of 16 bytes, not {md5!r}")
        self.crc32c = int.from_bytes(_decode_checksum(CRC32C_HEADER, crc, 4), "big") if crc is not None else None
        self.sha256 = _decode_checksum(SHA256_HEADER, sha, 32) if sha is not None else None


class SignedUrlHandler:
    def __init__(self, engine: Engine, signer: UrlSigner) -> None:
        self.engine = engine
        self.signer = signer

    def _grant(self, request: web.Request) -> Grant:
        return self.signer.verify(
            request.method, request.match_info["storage_type"], request.match_info["key"], request.query
        )

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """Refuses a bad URL before the client sends its body (Expect: 100-continue)."""
        try:
            self._grant(request)
        except errors.BlobstoreError as exc:
            return error_response(exc)
        await _default_expect_handler(request)
        return None

    # ------------------------------------------------------------------ PUT

    async def put(self, request: web.Request) -> web.StreamResponse:
        grant = self._grant(request)
        expected = ExpectedChecksums(request.headers)
        spec = UploadSpec(
            key=grant.key,
            storage_type=grant.storage_type,
            content_type=request.headers.get(hdrs.CONTENT_TYPE, ""),
            declared_size=request.content_length,
            # S3's conditional write: create only.
            if_generation_match=0 if request.headers.get(hdrs.IF_NONE_MATCH, "").strip() == "*" else None,
        )
        writer = await self.engine.run_read(self.engine.new_upload, _bearer(grant), spec)
        md5 = hashlib.md5(usedforsecurity=False) if expected.md5 is not None else None
        loop = asyncio.get_running_loop()
        try:
            # A body cut short raises here (aiohttp knows the length or the chunk framing),
            # so a truncated upload never reaches finish().
            async for data in request.content.iter_chunked(READ_SIZE):
                if md5 is not None:
                    await loop.run_in_executor(self.engine.executor, md5.update, data)
                await writer.write(writer.size, data)
            if md5 is not None and md5.digest() != expected.md5:
                raise errors.ChecksumMismatch("the body's MD5 differs from Content-MD5; nothing was committed")
            info = await writer.finish(crc32c_expected=expected.crc32c, sha256_expected=expected.sha256)
        finally:
            await writer.abort()
        return web.json_response(
            {
                "key": info.key,
                "storage_type": info.storage_type.label,
                "size": info.size,
                "generation": info.generation,
                "content_type": info.content_type,
                "crc32c": f"{info.crc32c:08x}",
                "sha256": info.sha256.hex(),
            },
            headers=_object_headers(info),
        )

    # ------------------------------------------------------------------ GET and HEAD

    async def get(self, request: web.Request) -> web.StreamResponse:
        grant = self._grant(request)
        download = await self.engine.open_download(_bearer(grant), grant.storage_type, grant.key)
        try:
            info = download.info
            try:
                byte_range = _requested_range(request, info.size)
            except errors.OutOfRange as exc:
                return error_response(exc, {hdrs.CONTENT_RANGE: f"bytes */{info.size}"})
            response = web.StreamResponse(status=200)
            response.headers.update(_object_headers(info))
            response.headers[hdrs.ACCEPT_RANGES] = "bytes"
            response.headers[hdrs.CONTENT_TYPE] = info.content_type or FALLBACK_CONTENT_TYPE
            response.content_length = info.size
            if byte_range is not None:
                start, end = byte_range
                download.restrict(start, end)
                response.set_status(206)
                response.content_length = end - start
                response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{info.size}"
                # They describe the whole object, not this part: a client must not check the part against them.
                del response.headers[CRC32C_HEADER], response.headers[SHA256_HEADER]
            if request.method == hdrs.METH_HEAD or response.content_length == 0:
                await response.prepare(request)
            elif download.has_local_files:
                await self._send_files(request, response, download)
            else:
                await self._send_pieces(request, response, download)
            await response.write_eof()
            return response
        finally:
            download.close()

    async def _send_files(self, request: web.Request, response: web.StreamResponse, download: Download) -> None:
        loop = asyncio.get_running_loop()
        async with aclosing(download.chunk_files()) as files:
            # The first chunk is verified before anything is sent, so corruption there is a clean 500.
            file, offset, count = await anext(files)
            await response.prepare(request)
            while True:
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the client went away")
                await loop.sendfile(transport, file, offset, count)
                try:
                    file, offset, count = await _mid_stream(anext(files), request)
                except StopAsyncIteration:
                    return

    async def _send_pieces(self, request: web.Request, response: web.StreamResponse, download: Download) -> None:
        pieces = download.pieces()
        async with aclosing(pieces):
            data, _crc = await anext(pieces)
            await response.prepare(request)
            while True:
                await response.write(data)
                try:
                    data, _crc = await _mid_stream(anext(pieces), request)
                except StopAsyncIteration:
                    return


async def _mid_stream(step: Awaitable[Any], request: web.Request) -> Any:
    """A failure after the headers went out can only cut the connection: the client sees a short body."""
    try:
        return await step
    except errors.BlobstoreError as exc:
        log.error("%s %s cut short: %s %s", request.method, request.path, exc.reason, exc.message)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError(f"response cut short: {exc.reason}") from exc


def _requested_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """[start, end) of a single-range request, None for the whole object."""
    if hdrs.RANGE not in request.headers:
        return None
    unsatisfiable = errors.OutOfRange(
        f"range {request.headers[hdrs.RANGE]!r} is not satisfiable: the object is {size} bytes"
    )
    try:
        requested = request.http_range
    except ValueError:
        raise unsatisfiable from None
    start, stop = requested.start, requested.stop
    assert start is not None
    if start < 0:  # the last -start bytes
        start, stop = max(0, size + start), size
    else:
        stop = size if stop is None else min(stop, size)
    if start >= size:
        raise unsatisfiable
    return start, stop


def _object_headers(info: ObjectInfo) -> dict[str, str]:
    return {
        hdrs.ETAG: f'"{info.sha256.hex()}"',
        hdrs.LAST_MODIFIED: formatdate(info.update_time_ns / 10**9, usegmt=True),
        CRC32C_HEADER: f"{info.crc32c:08x}",
        SHA256_HEADER: info.sha256.hex(),
        GENERATION_HEADER: str(info.generation),
    }


def create_http_app(engine: Engine, signer: UrlSigner) -> web.Application:
    """The aiohttp application; the server runs it on its own event loop beside gRPC."""
    app = web.Application(middlewares=[_errors_middleware])
    handler = SignedUrlHandler(engine, signer)
    app.router.add_get(ROUTE, handler.get)  # HEAD too
    app.router.add_put(ROUTE, handler.put, expect_handler=handler.expect)
    return app
