"""The one table from domain errors to wire status codes, for gRPC and for HTTP."""

from __future__ import annotations

import grpc

from blobstore.server import errors

GRPC_CODES: dict[type[errors.BlobstoreError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

HTTP_STATUS: dict[type[errors.BlobstoreError], int] = {
    errors.InvalidArgument: 400,
    errors.NotFound: 404,
    errors.GenerationMismatch: 412,
    errors.FailedPrecondition: 409,
    errors.ForbiddenByStorageType: 403,
    errors.OutOfRange: 416,
    errors.PermissionDenied: 403,
    errors.Unauthenticated: 401,
    errors.ResourceExhausted: 429,
    errors.DiskFull: 507,
    # No room for the body, as with a full disk: retrying helps only once something is deleted.
    errors.QuotaExceeded: 507,
    errors.Aborted: 409,
    errors.DataLoss: 500,
    errors.Unavailable: 503,
    errors.Unimplemented: 501,
}

REASON_TRAILER = "blobstore-error-reason"


def _lookup(table: dict[type[errors.BlobstoreError], object], exc: errors.BlobstoreError) -> object:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(type(exc))


def grpc_code(exc: errors.BlobstoreError) -> grpc.StatusCode:
    code = _lookup(GRPC_CODES, exc)  # type: ignore[arg-type]
    assert isinstance(code, grpc.StatusCode)
    return code


def grpc_code_number(exc: errors.BlobstoreError) -> int:
    """The numeric code, as carried by a batch call's per-item ItemError."""
    number = grpc_code(exc).value[0]
    assert isinstance(number, int)
    return number


def http_status(exc: errors.BlobstoreError) -> int:
    status = _lookup(HTTP_STATUS, exc)  # type: ignore[arg-type]
    assert isinstance(status, int)
    return status
