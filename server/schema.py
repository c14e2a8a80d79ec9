"""Every table of the metadata index and how its keys are laid out.

Tables map bytes to bytes; values are serialized records from
protos/blobstore/internal/records.proto unless noted.

  objects   namespace \\0 storage-type-number \\0 key  -> ObjectRecord
            (keys over LONG_KEY_BYTES: their first LONG_KEY_BYTES bytes + SHA-256 of the
            whole key, because LMDB keys are at most 511 bytes; the record holds the full key)
  chunks    sha256 (32 bytes)                          -> ChunkRecord
  uploads   upload id (ascii)                          -> UploadSessionRecord
  expiry    expire time ns (8 bytes BE) + objects key  -> b"" (tmp reaper)
  usage     namespace                                  -> UsageRecord
  tokens    sha256 of the bearer token (32 bytes)      -> TokenRecord
  quotas    namespace                                  -> QuotaRecord (overrides of the defaults)
  meta      name                                       -> raw bytes (counters, versions)
  chunk_leases      sha256 + replica id                -> expire time ns (8 bytes BE): a replica pins the chunk
  chunk_tombstones  sha256                             -> time ns (8 bytes BE): the chunk object is being deleted

The last two are used only when several replicas share the store (server/sharedgc.py).
"""

from __future__ import annotations

import hashlib
import struct

from blobstore.server.model import StorageType

OBJECTS = "objects"
CHUNKS = "chunks"
UPLOADS = "uploads"
EXPIRY = "expiry"
USAGE = "usage"
META = "meta"
TOKENS = "tokens"
QUOTAS = "quotas"
CHUNK_LEASES = "chunk_leases"
CHUNK_TOMBSTONES = "chunk_tombstones"

ALL_TABLES = (OBJECTS, CHUNKS, UPLOADS, EXPIRY, USAGE, META, TOKENS, QUOTAS, CHUNK_LEASES, CHUNK_TOMBSTONES)

META_GENERATION = b"generation"
META_SCHEMA_VERSION = b"schema_version"
# Shared stores: when a replica last claimed the listing of the chunk store for orphans (ns, 8 bytes BE).
META_ORPHAN_SWEEP = b"orphan_sweep"
SCHEMA_VERSION = 1

_SEP = b"\x00"

# With namespaces of at most 64 bytes, the longest index key (an expiry entry: 8 + 67 +
# 400 + 32 bytes) stays within LMDB's 511-byte limit.
LONG_KEY_BYTES = 400
MAX_NAMESPACE_BYTES = 64
_U64 = struct.Struct(">Q")


def object_prefix(namespace: str, storage_type: StorageType) -> bytes:
    return namespace.encode() + _SEP + str(storage_type.value).encode() + _SEP


def object_key(namespace: str, storage_type: StorageType, key: str) -> bytes:
    return object_prefix(namespace, storage_type) + encode_key(key.encode())


def encode_key(raw: bytes) -> bytes:
    """Order-preserving except among long keys sharing their first LONG_KEY_BYTES bytes."""
    if len(raw) <= LONG_KEY_BYTES:
        return raw
    return raw[:LONG_KEY_BYTES] + hashlib.sha256(raw).digest()


def seek_key(raw: bytes) -> bytes:
    """A position at or before every index key of an object key starting with `raw`."""
    return raw[:LONG_KEY_BYTES]


def is_long_key(encoded: bytes) -> bool:
    return len(encoded) > LONG_KEY_BYTES


def split_object_key(raw: bytes) -> tuple[str, StorageType]:
    """The namespace and storage type of an objects-table key (the key itself is in the record)."""
    namespace, type_number, _ = raw.split(_SEP, 2)
    return namespace.decode(), StorageType(int(type_number))


def expiry_key(expire_time_ns: int, objects_key: bytes) -> bytes:
    return _U64.pack(expire_time_ns) + objects_key


def split_expiry_key(raw: bytes) -> tuple[int, bytes]:
    return _U64.unpack_from(raw)[0], raw[_U64.size :]


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(raw: bytes) -> int:
    return int(_U64.unpack(raw)[0])
