"""The Python client: `Storage`, shaped like the original Storage API client."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import IO, Any, BinaryIO, Protocol, TypeVar, Union

import google_crc32c
import grpc

from blobstore.client import errors
from blobstore.client.checksums import crc32c_combine
from blobstore.client.directio import DirectWriter
from blobstore.client.memory import keep_freed_memory, transfer_in_progress
from blobstore.client.transfer import DEFAULT_WINDOW, UploadSource, remaining_size
from blobstore.client.wire import (
    DownloadPiece,
    UploadMessage,
    download_call,
    encode_upload_data,
    first_message_head,
    upload_call,
)
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Upload message size: the server's default chunk size, so that each message is one whole chunk.
CHUNK_SIZE = 4 << 20
# The unary limit to assume of a server that does not say.
DEFAULT_MAX_UNARY = 1 << 20
MAX_MESSAGE_BYTES = (4 << 20) + (64 << 10)
OBJECT_TOO_LARGE_FOR_UNARY = "OBJECT_TOO_LARGE_FOR_UNARY"
BATCH_RESPONSE_FULL = "BATCH_RESPONSE_FULL"
DEFAULT_BATCH_ENTRIES = 1000
# Room kept in a BatchSet request for its framing, besides the entries' own sizes.
BATCH_REQUEST_SLACK = 16 << 10

STORAGE_TYPES: dict[str, pb.StorageType.ValueType] = {
    "data": pb.STORAGE_TYPE_DATA,
    "tmp": pb.STORAGE_TYPE_TMP,
    "products": pb.STORAGE_TYPE_PRODUCTS,
    "result": pb.STORAGE_TYPE_RESULT,
    "logs": pb.STORAGE_TYPE_LOGS,
}
_LABELS = {number: label for label, number in STORAGE_TYPES.items()}

# Transient failures after which a transfer resumes instead of failing.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

T = TypeVar("T")

PathOrFile = Union[str, "os.PathLike[str]", IO[Any]]


class Writable(Protocol):
    """Where a download goes: a binary file object, or the DirectWriter of a new file."""

    def write(self, data: bytes, /) -> int: ...


M = TypeVar("M", pb.GetRequest, pb.DownloadRequest, pb.StatRequest, pb.DeleteRequest)


@dataclass(frozen=True)
class ObjectInfo:
    """An object's metadata as the server reports it."""

    key: str
    storage_type: str
    size: int
    generation: int
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None
    expires: datetime | None = None
    crc32c: int | None = None
    sha256: str = ""

    @classmethod
    def from_pb(cls, message: pb.Object) -> ObjectInfo:
        # set_many makes one of these per value: no dict() of an empty map, and the instance
        # dict set in one step rather than field by field through the frozen dataclass's __init__
        # (the test suite checks that this builds what ObjectInfo(...) builds).
        checksums = message.checksums
        crc = checksums.crc32c
        info = _new_instance(cls)
        _set_attribute(
            info,
            "__dict__",
            {
                "key": message.key,
                "storage_type": _LABELS.get(message.storage_type, "data"),
                "size": message.size,
                "generation": message.generation,
                "content_type": message.content_type,
                "metadata": dict(message.metadata) if message.metadata else {},
                "created": _when(message, "create_time"),
                "updated": _when(message, "update_time"),
                "expires": _when(message, "expire_time"),
                # A CRC32C other than 0 is there; only 0 needs asking whether it was sent.
                "crc32c": crc if crc or checksums.HasField("crc32c") else None,
                "sha256": checksums.sha256.hex(),
            },
        )
        return info


_new_instance = object.__new__
_set_attribute = object.__setattr__


def _when(message: pb.Object, field_name: str) -> datetime | None:
    if not message.HasField(field_name):  # type: ignore[arg-type]
        return None
    stamp = getattr(message, field_name)
    return _datetime(stamp.seconds, stamp.nanos // 1000)


@lru_cache(maxsize=4096)
def _datetime(seconds: int, microseconds: int) -> datetime:
    """What Timestamp.ToDatetime computes, in a fifth of its time; cached, because the values of
    one set_many share their update time (and, when new, their create time)."""
    return _EPOCH + timedelta(0, seconds, microseconds)


@dataclass(frozen=True)
class Quota:
    """One quota of the caller's namespace: `limit` None means unlimited."""

    limit: int | None
    used: int

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)

    @classmethod
    def from_pb(cls, message: pb.Quota) -> Quota:
        return cls(limit=message.limit or None, used=message.used)


@dataclass(frozen=True)
class Limits:
    """The server's limits and the caller's quotas with their current use."""

    namespace: str
    max_unary_value_bytes: int
    max_message_bytes: int
    chunk_size_bytes: int
    bytes: Quota
    objects: Quota
    open_uploads: Quota
    # Sustained requests per second allowed; None means unlimited.
    requests_per_second: float | None
    max_batch_entries: int

    @classmethod
    def from_pb(cls, message: pb.GetLimitsResponse) -> Limits:
        return cls(
            namespace=message.namespace,
            max_unary_value_bytes=message.max_unary_value_bytes,
            max_message_bytes=message.max_message_bytes,
            chunk_size_bytes=message.chunk_size_bytes,
            bytes=Quota.from_pb(message.bytes),
            objects=Quota.from_pb(message.objects),
            open_uploads=Quota.from_pb(message.open_uploads),
            requests_per_second=message.requests_per_second or None,
            max_batch_entries=message.max_batch_entries,
        )


def storage_type_number(storage_type: str) -> pb.StorageType.ValueType:
    try:
        return STORAGE_TYPES[storage_type]
    except (KeyError, TypeError):
        raise errors.InvalidArgumentError(
            f"unknown storage type {storage_type!r}; valid storage types: {', '.join(STORAGE_TYPES)}",
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ) from None


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise errors.from_rpc_error(exc) from None


# Wire logic shared by Storage and AsyncStorage: they differ only in how they wait.

Progress = Callable[[int], object]
"""Called with the number of bytes each time a piece of a transfer has gone through."""


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def encode_value(value: str | bytes | bytearray | memoryview, content_type: str | None) -> tuple[bytes, str | None]:
    """The bytes of a value for set(); text is stored as UTF-8 and says so."""
    if isinstance(value, str):
        return value.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), content_type
    raise TypeError(f"value must be str, bytes or a binary file-like object, not {type(value).__name__}")


def set_request(
    key: str,
    data: bytes,
    storage_type: str,
    content_type: str | None,
    metadata: Mapping[str, str] | None,
    if_generation_match: int | None,
) -> pb.SetRequest:
    request = pb.SetRequest(
        key=key,
        storage_type=storage_type_number(storage_type),
        value=data,
        content_type=content_type or "",
        metadata=dict(metadata or {}),
        crc32c=google_crc32c.value(data),
    )
    if if_generation_match is not None:
        request.if_generation_match = if_generation_match
    return request


def upload_spec(
    key: str,
    storage_type: str,
    content_type: str | None,
    metadata: Mapping[str, str] | None,
    if_generation_match: int | None,
    size: int | None = None,
) -> pb.UploadSpec:
    spec = pb.UploadSpec(
        key=key,
        storage_type=storage_type_number(storage_type),
        content_type=content_type or "",
        metadata=dict(metadata or {}),
    )
    if if_generation_match is not None:
        spec.if_generation_match = if_generation_match
    if size is not None:
        spec.size = size
    return spec


def verify_value(key: str, response: pb.GetResponse) -> bytes:
    value: bytes = response.value
    checksums = response.object.checksums
    if checksums.HasField("crc32c") and google_crc32c.value(value) != checksums.crc32c:
        raise errors.DataLossError(f"value of {key!r} failed its CRC32C check in transit")
    return value


def list_request(prefix: str | None, storage_type: str, page_size: int, delimiter: str = "") -> pb.ListRequest:
    return pb.ListRequest(
        prefix=prefix or "",
        delimiter=delimiter,
        storage_type=storage_type_number(storage_type),
        page_size=page_size,
    )


def keyed_request(message: type[M], key: str, storage_type: str) -> M:
    """A Stat, Delete, Get or Download request for one key."""
    return message(key=key, storage_type=storage_type_number(storage_type))


def signed_url_request(key: str, storage_type: str, method: int, expires_in: int) -> pb.CreateSignedUrlRequest:
    return pb.CreateSignedUrlRequest(
        key=key,
        storage_type=storage_type_number(storage_type),
        method=method,  # type: ignore[arg-type]
        expires_in_seconds=int(expires_in),
    )


def next_upload_request(source: UploadSource, generation: int, chunk_size: int, head: bytes) -> UploadMessage | None:
    """The next Upload message from `source`, encoded (the final one carries the whole-object checksums).

    `head` is what the stream's first message carries besides (first_message_head), b"" for
    the others. None when a retry has taken the source over (its generation moved on). Reads
    the source, so the asyncio client calls it on a worker thread.
    """
    with source.lock:
        if source.generation != generation:
            return None
        offset = source.offset
        data, crc = source.read_with_crc32c(chunk_size)
        if not data:  # the end: the whole-object checksums, taken while no retry can move them
            final = pb.UploadRequest(write_offset=offset, finish_write=True)
            final.object_checksums.crc32c = source.crc
            final.object_checksums.sha256 = source.sha.digest()
            return UploadMessage(head + final.SerializeToString(), 0)
    return UploadMessage(encode_upload_data(head, offset, data, crc), len(data))


def restart_stream(source: UploadSource) -> int:
    """Takes `source` back to its start for a new stream; returns that stream's generation."""
    with source.lock:
        source.rewind(0)
        return source.generation


def resume_stream(source: UploadSource, upload_id: str, persisted: int) -> int:
    """Takes `source` to the session's persisted size for a new stream; returns that stream's generation."""
    with source.lock:
        if not source.rewind(persisted):
            raise errors.StorageError(
                f"cannot resume upload {upload_id}: the server persisted {persisted} bytes and the "
                "source cannot produce the bytes from there (a non-seekable stream keeps only its "
                f"last {source.window} bytes; a seekable one may be shorter than that)",
                reason="CANNOT_RESUME",
            )
        return source.generation


class DownloadState:
    """One download's progress: what to ask for when resuming, and the checks on what arrived."""

    def __init__(
        self, key: str, storage_type: str, retries: int, progress: Progress | None = None, *, sha256: bool = False
    ) -> None:
        self.key = key
        self.request = keyed_request(pb.DownloadRequest, key, storage_type)
        self.retries = retries
        self.progress = progress
        self.info: ObjectInfo | None = None
        self.received = 0
        self.attempt = 0
        self._crc = 0
        self._sha = hashlib.sha256() if sha256 else None

    def accept(self, piece: DownloadPiece) -> bytes:
        """Checks one message and returns its data; the next request resumes after it."""
        rest = piece.rest
        if rest is not None and self.info is None and rest.HasField("object"):
            self.info = ObjectInfo.from_pb(rest.object)
            # A resumed download reads the same generation or fails: never two versions spliced.
            self.request.generation = self.info.generation
        data = piece.data
        if google_crc32c.value(data) != piece.crc32c:
            raise errors.DataLossError(f"a piece of {self.key!r} failed its CRC32C check in transit")
        if data:
            # The whole object's CRC32C from the piece's, just checked: no second pass over the bytes.
            self._crc = crc32c_combine(self._crc, piece.crc32c, len(data))
            if self._sha is not None:
                self._sha.update(data)
            self.received += len(data)
            self.request.read_offset = self.received
            self.attempt = 0
            if self.progress is not None:
                self.progress(len(data))
        return data

    def retry_delay(self, exc: grpc.RpcError) -> float:
        """How long to wait before resuming after `exc`; raises it translated when it is final."""
        error = errors.from_rpc_error(exc)
        if not transient(error) or self.attempt >= self.retries or self.info is None:
            raise error from None
        self.attempt += 1
        return float(min(8.0, 0.2 * 2**self.attempt) * (0.5 + random.random()))

    def finish(self) -> ObjectInfo:
        info = self.info
        assert info is not None
        if self.received != info.size:
            raise errors.DataLossError(f"received {self.received} bytes of {self.key!r}, expected {info.size}")
        if info.crc32c is not None and self._crc != info.crc32c:
            raise errors.DataLossError(f"{self.key!r} failed its whole-object CRC32C check")
        if self._sha is not None and info.sha256 and self._sha.hexdigest() != info.sha256:
            raise errors.DataLossError(f"{self.key!r} failed its whole-object SHA-256 check")
        return info


class _Client:
    """What Storage and AsyncStorage share: where to connect, with which credentials, how patiently."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        root_certificates: bytes | None = None,
        secure: bool | None = None,
        timeout: float | None = 60.0,
        retries: int = 5,
        chunk_size: int = CHUNK_SIZE,
        resumable_threshold: int = 8 << 20,
        resume_window: int = DEFAULT_WINDOW,
        verify_sha256: bool = False,
    ) -> None:
        self.address = address or os.environ.get("BLOBSTORE_ADDRESS") or DEFAULT_ADDRESS
        keep_freed_memory()  # halves the CPU of large transfers; see blobstore.client.memory
        self.token = token if token is not None else os.environ.get("BLOBSTORE_TOKEN")
        self.timeout = timeout
        self.retries = retries
        self.chunk_size = chunk_size
        # set_file sends larger files, and streams of unknown size, through resumable sessions.
        self.resumable_threshold = resumable_threshold
        # How many of its last bytes a non-seekable stream keeps for resuming (see blobstore.client.transfer).
        self.resume_window = resume_window
        # Transfers are checked end to end by CRC32C (every message, and the whole object);
        # True adds the whole object's SHA-256 on this side too, at ~0.7 s of CPU per GiB.
        self.verify_sha256 = verify_sha256
        ca_file = os.environ.get("BLOBSTORE_CA_CERT")
        if root_certificates is None and ca_file:
            with open(ca_file, "rb") as fobj:
                root_certificates = fobj.read()
        # grpc and grpc.aio offer the same two channel constructors.
        channels: Any = grpc.aio if self._asynchronous else grpc
        if secure or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = channels.secure_channel(self.address, credentials, options=channel_options())
        else:
            self._channel = channels.insecure_channel(self.address, options=channel_options())
        self._stub = pb_grpc.StorageStub(self._channel)
        # Upload takes its messages encoded by hand, Download's are decoded by hand (blobstore.client.wire).
        self._upload = upload_call(self._channel)
        self._download = download_call(self._channel)
        self._metadata = auth_metadata(self.token)
        self._max_unary: int | None = None
        self._limits: Limits | None = None

    _asynchronous = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(address={self.address!r})"


class Storage(_Client):
    """Client of a blobstore server.

    `address` defaults to $BLOBSTORE_ADDRESS, then 127.0.0.1:50051; `token` to
    $BLOBSTORE_TOKEN. Pass `root_certificates` (PEM bytes), or name a PEM file in
    $BLOBSTORE_CA_CERT, to use TLS (`secure=True`: TLS with the system's CAs). A
    Storage is safe to share between threads; close() it, or use it as a
    context manager, when done.

    Transfers are verified end to end by CRC32C: every message, and the whole
    object against the server's record. `verify_sha256=True` also computes
    and checks the whole object's SHA-256 on this side (the server always
    computes and stores it), at about 0.7 s of CPU per GiB.
    """

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ small values

    def set(
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
            return self.set_file(key, value, storage_type, **options)  # type: ignore[arg-type]
        data, options["content_type"] = encode_value(value, content_type)  # type: ignore[arg-type]
        if len(data) > self._unary_limit():
            return self.set_file(key, io.BytesIO(data), storage_type, **options)
        request = set_request(key, data, storage_type, **options)
        with _translated():
            response = self._stub.Set(request, timeout=self.timeout, metadata=self._metadata)
        return ObjectInfo.from_pb(response.object)

    def get(self, key: str, storage_type: str = "data") -> bytes:
        """Returns the value stored under `key`; large values are streamed transparently."""
        request = keyed_request(pb.GetRequest, key, storage_type)
        try:
            response = self._stub.Get(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            error = errors.from_rpc_error(exc)
            if error.reason != OBJECT_TOO_LARGE_FOR_UNARY:
                raise error from None
            buffer = io.BytesIO()
            self.get_file(key, buffer, storage_type)
            return buffer.getvalue()
        return verify_value(key, response)

    # ------------------------------------------------------------------ batches

    def set_many(
        self,
        values: Mapping[str, str | bytes | bytearray | memoryview],
        storage_type: str = "data",
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_generation_match: Mapping[str, int] | None = None,
    ) -> dict[str, ObjectInfo]:
        """Stores many values in few calls: each BatchSet is one transaction and one fsync.

        Every key is judged on its own: when some fail (a bad key, a failed
        `if_generation_match[key]` precondition) the others are still stored,
        and BatchError is raised with `.errors` (key -> typed error) and
        `.results` (key -> ObjectInfo of what was stored). Values larger than
        the server's unary limit are streamed with set() one by one.
        """
        preconditions = if_generation_match or {}
        number = storage_type_number(storage_type)
        max_entries, max_bytes = self._batch_limits()
        results: dict[str, ObjectInfo] = {}
        failures: dict[str, errors.StorageError] = {}
        # Entries are filled in place in the request (building each and copying it in costs twice as much).
        request = pb.BatchSetRequest(storage_type=number)  # type: ignore[arg-type]
        keys: builtins.list[str] = []
        batch_bytes = 0
        unary_limit = self._unary_limit()
        common_metadata = dict(metadata or {})
        metadata_bytes = sum(len(k.encode()) + len(v.encode()) + 16 for k, v in common_metadata.items())

        def send() -> None:
            with _translated():
                response = self._stub.BatchSet(request, timeout=self.timeout, metadata=self._metadata)
            for key, result in zip(keys, response.results, strict=True):
                if result.HasField("error"):
                    failures[key] = errors.from_item_error(*_item(result.error))
                else:
                    results[key] = ObjectInfo.from_pb(result.object)

        for key, value in values.items():
            if type(value) is bytes:  # the common case, without a call
                data, value_type = value, None
            else:
                data, value_type = _as_bytes(value)
            if len(data) > unary_limit:
                try:
                    results[key] = self.set(
                        key,
                        data,
                        storage_type,
                        content_type=content_type or value_type,
                        metadata=metadata,
                        if_generation_match=preconditions.get(key),
                    )
                except errors.StorageError as exc:
                    failures[key] = exc
                continue
            entry_type = content_type or value_type or ""
            # An upper bound of the entry's encoded size (tags and length prefixes at their longest).
            size = len(key) * 4 + len(data) + len(entry_type) + metadata_bytes + 48
            if keys and (len(keys) >= max_entries or batch_bytes + size > max_bytes):
                send()
                del request.entries[:]
                keys, batch_bytes = [], 0
            entry = request.entries.add(key=key, value=data, crc32c=google_crc32c.value(data))
            if entry_type:
                entry.content_type = entry_type
            if common_metadata:
                entry.metadata.update(common_metadata)
            if key in preconditions:
                entry.if_generation_match = preconditions[key]
            keys.append(key)
            batch_bytes += size
        if keys:
            send()
        if failures:
            raise errors.BatchError(failures, dict(results))
        return results

    def get_many(self, keys: Iterable[str], storage_type: str = "data") -> dict[str, bytes]:
        """Reads many values in few BatchGet calls, each from one consistent snapshot.

        Keys that do not exist are left out of the result, as in a dict lookup
        with .get(): `get_many(keys).get(key)` is None for a missing key. Any
        other failure raises BatchError with `.errors` and the values read in
        `.results`. Values too large for one response are fetched with get().
        """
        wanted = builtins.list(dict.fromkeys(keys))
        number = storage_type_number(storage_type)
        max_entries, _ = self._batch_limits()
        results: dict[str, bytes] = {}
        failures: dict[str, errors.StorageError] = {}
        for start in range(0, len(wanted), max_entries):
            request = pb.BatchGetRequest(storage_type=number, keys=wanted[start : start + max_entries])  # type: ignore[arg-type]
            with _translated():
                response = self._stub.BatchGet(request, timeout=self.timeout, metadata=self._metadata)
            for result in response.results:
                key = result.key
                if result.HasField("error"):
                    error = errors.from_item_error(*_item(result.error))
                    if isinstance(error, errors.NotFoundError):
                        continue
                    if error.reason in (OBJECT_TOO_LARGE_FOR_UNARY, BATCH_RESPONSE_FULL):
                        try:
                            results[key] = self.get(key, storage_type)
                        except errors.NotFoundError:
                            pass
                        except errors.StorageError as exc:
                            failures[key] = exc
                        continue
                    failures[key] = error
                    continue
                value = result.value  # each read of the field copies the bytes out of the message
                checksums = result.object.checksums
                crc = checksums.crc32c
                # A CRC32C other than 0 is there; only 0 needs asking whether it was sent.
                if (crc or checksums.HasField("crc32c")) and google_crc32c.value(value) != crc:
                    failures[key] = errors.DataLossError(f"value of {key!r} failed its CRC32C check in transit")
                    continue
                results[key] = value
        if failures:
            raise errors.BatchError(failures, results)
        return results

    def _batch_limits(self) -> tuple[int, int]:
        """(entries, request bytes) one batch call may carry."""
        limits = self._server_limits()
        entries = (limits.max_batch_entries if limits else 0) or DEFAULT_BATCH_ENTRIES
        message = (limits.max_message_bytes if limits else 0) or MAX_MESSAGE_BYTES
        return entries, message - BATCH_REQUEST_SLACK

    def _unary_limit(self) -> int:
        if self._max_unary is None:
            limits = self._server_limits()
            self._max_unary = (limits.max_unary_value_bytes if limits else 0) or DEFAULT_MAX_UNARY
        return self._max_unary

    def _server_limits(self) -> Limits | None:
        """The server's limits, asked once; None when it will not say."""
        if self._limits is None:
            try:
                self._limits = self.limits()
            except errors.StorageError:
                return None
        return self._limits

    def limits(self) -> Limits:
        """The server's limits, and the quotas of this caller's namespace with their current use."""
        with _translated():
            response: pb.GetLimitsResponse = self._stub.GetLimits(
                pb.GetLimitsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        return Limits.from_pb(response)

    # ------------------------------------------------------------------ streaming

    def set_file(
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
        """Uploads a file (a path or a file object) in constant memory.

        Files larger than `resumable_threshold`, and streams of unknown size, go
        through a resumable session: after a transient failure (UNAVAILABLE,
        DEADLINE_EXCEEDED, a reset connection) the upload waits with backoff,
        asks the server how much it persisted and continues from there. A
        non-seekable stream can only resume from bytes it still holds in memory
        (see blobstore.client.transfer). Pass `upload_id` (from start_upload) to
        continue a session begun earlier, from the file's start. `progress`, if
        given, is called with the size of each piece sent (pieces sent again
        after a resume count again).
        """
        spec = upload_spec(key, storage_type, content_type, metadata, if_generation_match)
        with _open_for_reading(file) as fobj:
            source = UploadSource(fobj, window=self.resume_window, sha256=self.verify_sha256)
            with transfer_in_progress(lambda: source.offset):
                size = remaining_size(fobj)
                if upload_id is None and size is not None and size <= self.resumable_threshold:
                    return self._upload_in_one_stream(spec, source, progress)
                if upload_id is not None:
                    return self._upload_session(upload_id, source, progress)
                upload_id = self._retrying(lambda: self._start_session(spec))
                try:
                    return self._upload_session(upload_id, source, progress)
                except errors.StorageError as error:
                    if not transient(error):
                        # It cannot succeed (full disk, bad checksum...): free what the session holds on the server.
                        try:
                            self.cancel_upload(upload_id)
                        except errors.StorageError:
                            pass
                    raise

    def _upload_in_one_stream(self, spec: pb.UploadSpec, source: UploadSource, progress: Progress | None) -> ObjectInfo:
        # Without a precondition a repeated upload is harmless, so a small file simply starts over.
        attempts = self.retries if not spec.HasField("if_generation_match") else 0
        for attempt in range(attempts + 1):
            generation = restart_stream(source)
            try:
                response = self._upload(
                    self._upload_messages(source, generation, progress, spec=spec),
                    metadata=self._metadata,
                    timeout=None,
                )
                return ObjectInfo.from_pb(response.object)
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
                if not transient(error) or attempt >= attempts:
                    raise error from None
                backoff(attempt)
        raise AssertionError("unreachable")

    def _upload_session(self, upload_id: str, source: UploadSource, progress: Progress | None) -> ObjectInfo:
        attempt = 0
        persisted = -1
        while True:
            try:
                status = self.query_upload(upload_id)
                if status.object is not None:
                    return status.object
                if status.persisted_size > persisted:
                    attempt = 0  # progress since the last failure: the retry budget starts over
                persisted = status.persisted_size
                generation = resume_stream(source, upload_id, persisted)
                response = self._upload(
                    self._upload_messages(source, generation, progress, upload_id=upload_id),
                    metadata=self._metadata,
                    timeout=None,
                )
                return ObjectInfo.from_pb(response.object)
            except (grpc.RpcError, errors.StorageError) as exc:
                error = errors.from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else exc
                # ABORTED: the server has not yet noticed that our previous stream died.
                retry = transient(error) or error.code == grpc.StatusCode.ABORTED
                if not retry or attempt >= self.retries:
                    raise error from None
                backoff(attempt)
                attempt += 1

    def _upload_messages(
        self,
        source: UploadSource,
        generation: int,
        progress: Progress | None,
        *,
        spec: pb.UploadSpec | None = None,
        upload_id: str = "",
    ) -> Iterator[bytes]:
        head = first_message_head(spec, upload_id)
        while message := next_upload_request(source, generation, self.chunk_size, head):
            head = b""
            yield message.wire
            if not message.data_size:
                return
            if progress is not None:
                progress(message.data_size)

    def _retrying(self, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except errors.StorageError as error:
                if not transient(error) or attempt >= self.retries:
                    raise
                backoff(attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ resumable sessions

    def start_upload(
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
        return self._start_session(upload_spec(key, storage_type, content_type, metadata, if_generation_match, size))

    def _start_session(self, spec: pb.UploadSpec) -> str:
        with _translated():
            response = self._stub.StartUpload(
                pb.StartUploadRequest(spec=spec), timeout=self.timeout, metadata=self._metadata
            )
        upload_id: str = response.upload_id
        return upload_id

    def query_upload(self, upload_id: str) -> UploadStatus:
        """How many bytes of a session the server holds durably, and the object once committed."""

        def query() -> pb.QueryUploadResponse:
            with _translated():
                response: pb.QueryUploadResponse = self._stub.QueryUpload(
                    pb.QueryUploadRequest(upload_id=upload_id), timeout=self.timeout, metadata=self._metadata
                )
            return response

        response = self._retrying(query)
        committed = ObjectInfo.from_pb(response.object) if response.HasField("object") else None
        return UploadStatus(response.persisted_size, committed)

    def cancel_upload(self, upload_id: str) -> None:
        """Abandons a session; the server frees what it stored."""
        with _translated():
            self._stub.CancelUpload(
                pb.CancelUploadRequest(upload_id=upload_id), timeout=self.timeout, metadata=self._metadata
            )

    def get_file(
        self, key: str, file: PathOrFile, storage_type: str = "data", *, progress: Progress | None = None
    ) -> ObjectInfo:
        """Downloads an object into a file (a path or a binary file object) in constant memory.

        A path is written to a temporary file beside it and renamed into place
        only when every byte has passed its checksums. A dropped connection is
        resumed from the bytes already received, pinned to the same generation:
        if the object changed meanwhile, PreconditionError is raised rather
        than splicing two versions. `progress`, if given, is called with the
        size of each piece received. A path is written with O_DIRECT where its
        file system allows it, so the download does not fill the page cache
        (client/directio.py says why).
        """
        state = DownloadState(key, storage_type, self.retries, progress, sha256=self.verify_sha256)
        with transfer_in_progress(lambda: state.received):
            if isinstance(file, (str, os.PathLike)):
                with writing_atomically(file) as fobj:
                    return self._download_into(state, fobj)
            return self._download_into(state, file)  # type: ignore[arg-type]

    def _download_into(self, state: DownloadState, fobj: Writable) -> ObjectInfo:
        with WriteBehind(fobj) as writer:
            while True:
                try:
                    for piece in self._download(state.request, metadata=self._metadata, timeout=None):
                        if data := state.accept(piece):
                            writer.write(data)
                    writer.drain()
                    return state.finish()
                except grpc.RpcError as exc:
                    time.sleep(state.retry_delay(exc))

    # ------------------------------------------------------------------ signed URLs

    def get_upload_url(self, key: str, storage_type: str = "data", expires_in: int = 3600) -> str:
        """A URL that uploads `key` with a plain HTTP PUT, no token needed: `requests.put(url, data=fobj)`.

        Valid for `expires_in` seconds (at most seven days). Optional request
        headers: Content-Type (recorded), Content-MD5, x-checksum-crc32c and
        x-checksum-sha256 (hex or base64; a mismatch commits nothing).
        """
        return self._signed_url(key, storage_type, pb.CreateSignedUrlRequest.PUT, expires_in)

    def get_signed_url(self, key: str, storage_type: str = "data", expires_in: int = 3600) -> str:
        """A URL that downloads `key` with a plain HTTP GET (Range supported), no token needed."""
        return self._signed_url(key, storage_type, pb.CreateSignedUrlRequest.GET, expires_in)

    def _signed_url(self, key: str, storage_type: str, method: int, expires_in: int) -> str:
        request = signed_url_request(key, storage_type, method, expires_in)
        with _translated():
            response = self._stub.CreateSignedUrl(request, timeout=self.timeout, metadata=self._metadata)
        url: str = response.url
        return url

    # ------------------------------------------------------------------ metadata

    def stat(self, key: str, storage_type: str = "data") -> ObjectInfo:
        with _translated():
            response = self._stub.Stat(
                keyed_request(pb.StatRequest, key, storage_type), timeout=self.timeout, metadata=self._metadata
            )
        return ObjectInfo.from_pb(response.object)

    def exists(self, key: str, storage_type: str = "data") -> bool:
        try:
            self.stat(key, storage_type)
        except errors.NotFoundError:
            return False
        return True

    def delete(self, key: str, storage_type: str = "data", *, if_generation_match: int | None = None) -> None:
        """Deletes `key`; NotFoundError when it does not exist."""
        request = keyed_request(pb.DeleteRequest, key, storage_type)
        if if_generation_match is not None:
            request.if_generation_match = if_generation_match
        with _translated():
            self._stub.Delete(request, timeout=self.timeout, metadata=self._metadata)

    def list(self, prefix: str | None = None, storage_type: str = "data") -> builtins.list[str]:
        """Every key starting with `prefix`, in key order."""
        return list(self.iter_list(prefix, storage_type))

    def iter_list(
        self, prefix: str | None = None, storage_type: str = "data", *, page_size: int = 1000
    ) -> Iterator[str]:
        """Keys starting with `prefix`, fetched a page at a time as you iterate."""
        for info in self.iter_objects(prefix, storage_type, page_size=page_size):
            yield info.key

    def iter_objects(
        self, prefix: str | None = None, storage_type: str = "data", *, page_size: int = 1000
    ) -> Iterator[ObjectInfo]:
        for response in self._pages(list_request(prefix, storage_type, page_size)):
            for message in response.objects:
                yield ObjectInfo.from_pb(message)

    def list_prefixes(
        self, prefix: str | None = None, delimiter: str = "/", storage_type: str = "data"
    ) -> tuple[builtins.list[str], builtins.list[str]]:
        """One level of a key hierarchy: (keys directly under prefix, sub-prefixes)."""
        keys: builtins.list[str] = []
        prefixes: builtins.list[str] = []
        for response in self._pages(list_request(prefix, storage_type, 0, delimiter)):
            keys.extend(message.key for message in response.objects)
            prefixes.extend(response.prefixes)
        return keys, prefixes

    def _pages(self, request: pb.ListRequest) -> Iterator[pb.ListResponse]:
        while True:
            with _translated():
                response: pb.ListResponse = self._stub.List(request, timeout=self.timeout, metadata=self._metadata)
            yield response
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token


def _as_bytes(value: str | bytes | bytearray | memoryview) -> tuple[bytes, str | None]:
    """A value's bytes, and the content type a str implies."""
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    raise TypeError(f"batch values must be str or bytes, not {type(value).__name__}")


def _item(error: pb.ItemError) -> tuple[int, str, str]:
    return error.code, error.message, error.reason


@dataclass(frozen=True)
class UploadStatus:
    persisted_size: int
    # Set once the session has committed.
    object: ObjectInfo | None = None


# Status details that mean the connection broke under a call (grpc reports some as INTERNAL/UNKNOWN).
_RESET_MARKERS = ("rst_stream", "connection reset", "socket closed", "broken pipe", "stream removed")


def transient(error: errors.StorageError) -> bool:
    """Whether a transfer should wait and resume after `error` rather than fail."""
    if error.code in RETRYABLE:
        return True
    if error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        details = error.message.lower()
        return any(marker in details for marker in _RESET_MARKERS)
    return False


def backoff_delay(attempt: int) -> float:
    return float(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))


def backoff(attempt: int) -> None:
    time.sleep(backoff_delay(attempt))


class WriteBehind:
    """Writes a download's pieces on a thread of its own, at most `window` bytes behind the receiver.

    The receiving thread checks each piece's CRC32C and feeds the SHA-256 while the pieces
    before it go into the file: both release the GIL, so on two cores the checks cost the
    download little. Leaving the block waits for every write begun, so a file that is
    closed or removed afterwards is never written to; a failed write raises from the next
    write() or drain().
    """

    def __init__(self, fobj: Writable, window: int = 4 << 20) -> None:
        self._fobj = fobj
        # Bytes, not pieces: a server may send messages up to the 4 MiB message limit, and memory must stay bounded.
        self._window = window
        self._queued = 0
        self._pending: deque[tuple[Future[int], int]] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="blobstore-write")

    def write(self, data: bytes) -> None:
        while self._pending and self._queued + len(data) > self._window:
            self._wait_oldest()
        self._pending.append((self._pool.submit(self._fobj.write, data), len(data)))
        self._queued += len(data)

    def drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._queued -= size
        future.result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def writing_atomically(path: str | os.PathLike[str]) -> Iterator[Writable]:
    """A file beside `path` that replaces it when the block succeeds and vanishes when it fails.

    Written with O_DIRECT where the file system allows it (client/directio.py).
    """
    target = os.fspath(path)
    partial = f"{target}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        with DirectWriter(partial) as fobj:
            yield fobj
        os.replace(partial, target)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def _open_for_reading(file: PathOrFile) -> Iterator[BinaryIO]:
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as fobj:
            yield fobj
        return
    if isinstance(file, io.TextIOBase):
        # A text-mode file (as in the original guide's example): send its bytes untouched.
        buffer = getattr(file, "buffer", None)
        if buffer is not None:
            file.flush() if file.writable() else None
            yield buffer
            return
    yield file  # type: ignore[misc]
