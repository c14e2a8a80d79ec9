"""Typed errors raised by the client, one per gRPC status the service uses."""

from __future__ import annotations

from typing import Any

import grpc

REASON_TRAILER = "blobstore-error-reason"


class StorageError(Exception):
    """Base class: `code` is the gRPC status, `reason` the server's stable reason string."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(StorageError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(StorageError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class PreconditionError(StorageError):
    """FAILED_PRECONDITION: a generation precondition failed, the object changed, or the
    storage type forbids the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(StorageError):
    code = grpc.StatusCode.OUT_OF_RANGE


class PermissionDeniedError(StorageError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AuthenticationError(StorageError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(StorageError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ConflictError(StorageError):
    """ABORTED: another writer holds the same upload session."""

    code = grpc.StatusCode.ABORTED


class DataLossError(StorageError):
    """The server found stored data corrupt, or bytes failed their checksum in transit."""

    code = grpc.StatusCode.DATA_LOSS


class UnavailableError(StorageError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(StorageError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[StorageError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        PreconditionError,
        OutOfRangeError,
        PermissionDeniedError,
        AuthenticationError,
        ResourceExhaustedError,
        ConflictError,
        DataLossError,
        UnavailableError,
        DeadlineExceededError,
    )
}


class BatchError(StorageError):
    """Some entries of a batch call failed; the others took effect.

    `errors` maps each failed key to its own typed error; `results` holds what
    the call returned for the keys that succeeded (ObjectInfo for set_many,
    bytes for get_many).
    """

    def __init__(self, errors: dict[str, StorageError], results: dict[str, Any]) -> None:
        first_key, first = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(
            f"{len(errors)} of {len(errors) + len(results)} batch entries failed; {first_key!r}: {first.message}{more}",
            code=first.code,
            reason=first.reason,
        )
        self.errors = errors
        self.results = results


def from_item_error(code: int, message: str, reason: str) -> StorageError:
    """The typed error of one entry of a batch call (an ItemError on the wire)."""
    status = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(status, StorageError)
    return cls(message or status.name, code=status, reason=reason)


_BY_NUMBER: dict[int, grpc.StatusCode] = {status.value[0]: status for status in grpc.StatusCode}


def from_rpc_error(error: grpc.RpcError) -> StorageError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    reason = ""
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for name, value in trailers or ():
        if name == REASON_TRAILER:
            reason = value if isinstance(value, str) else value.decode()
    cls = _BY_CODE.get(code, StorageError)
    return cls(details or code.name, code=code, reason=reason)
