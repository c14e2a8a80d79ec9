"""Domain errors of the storage engine, defined once.

The engine raises these; the gRPC servicer and the HTTP handler translate them
at their boundary through one table each (server/status.py). Each error carries
a stable upper-case `reason` that clients may match on.
"""

from __future__ import annotations


class BlobstoreError(Exception):
    """Base of every error the engine raises on purpose."""

    reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class InvalidArgument(BlobstoreError):
    reason = "INVALID_ARGUMENT"


class ChecksumMismatch(InvalidArgument):
    reason = "CHECKSUM_MISMATCH"


class NotFound(BlobstoreError):
    reason = "NOT_FOUND"


class UploadNotFound(NotFound):
    reason = "UPLOAD_NOT_FOUND"


class FailedPrecondition(BlobstoreError):
    reason = "FAILED_PRECONDITION"


class GenerationMismatch(FailedPrecondition):
    reason = "GENERATION_MISMATCH"


class ObjectTooLargeForUnary(FailedPrecondition):
    reason = "OBJECT_TOO_LARGE_FOR_UNARY"


class BatchResponseFull(FailedPrecondition):
    reason = "BATCH_RESPONSE_FULL"


class ForbiddenByStorageType(FailedPrecondition):
    reason = "FORBIDDEN_BY_STORAGE_TYPE"


class OutOfRange(BlobstoreError):
    reason = "OUT_OF_RANGE"


class PermissionDenied(BlobstoreError):
    reason = "PERMISSION_DENIED"


class UrlRejected(PermissionDenied):
    """A signed URL that does not allow the request (expired, altered, other method)."""

    reason = "URL_REJECTED"


class Unauthenticated(BlobstoreError):
    reason = "UNAUTHENTICATED"


class ResourceExhausted(BlobstoreError):
    reason = "RESOURCE_EXHAUSTED"


class DiskFull(ResourceExhausted):
    reason = "DISK_FULL"


class QuotaExceeded(ResourceExhausted):
    reason = "QUOTA_EXCEEDED"


class RateLimited(ResourceExhausted):
    reason = "RATE_LIMITED"


class Aborted(BlobstoreError):
    reason = "ABORTED"


class DataLoss(BlobstoreError):
    reason = "DATA_LOSS"


class Unavailable(BlobstoreError):
    reason = "UNAVAILABLE"


class Unimplemented(BlobstoreError):
    reason = "UNIMPLEMENTED"
