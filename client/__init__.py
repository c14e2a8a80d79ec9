"""Python client of the blobstore service.

from blobstore.client import Storage
storage = Storage()            # $BLOBSTORE_ADDRESS or 127.0.0.1:50051
storage.set("greeting", "Hello Storage")
storage.get("greeting")        # b'Hello Storage'
"""

from blobstore.client.async_storage import AsyncStorage
from blobstore.client.errors import (
    AuthenticationError,
    BatchError,
    ConflictError,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    PreconditionError,
    ResourceExhaustedError,
    StorageError,
    UnavailableError,
)
from blobstore.client.storage import STORAGE_TYPES, Limits, ObjectInfo, Quota, Storage

__all__ = [
    "STORAGE_TYPES",
    "AsyncStorage",
    "AuthenticationError",
    "BatchError",
    "ConflictError",
    "DataLossError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "Limits",
    "NotFoundError",
    "ObjectInfo",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PreconditionError",
    "Quota",
    "ResourceExhaustedError",
    "Storage",
    "StorageError",
    "UnavailableError",
]
