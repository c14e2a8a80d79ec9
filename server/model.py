"""Domain types shared by the engine and its front ends (no gRPC, no HTTP)."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, field

from blobstore.server import errors

MAX_KEY_BYTES = 1024
DEFAULT_NAMESPACE = "default"


class StorageType(enum.Enum):
    """Storage types; values match the wire enum's numbers."""

    DATA = 1
    TMP = 2
    PRODUCTS = 3
    RESULT = 4
    LOGS = 5

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def valid_labels(cls) -> str:
        return ", ".join(t.label for t in cls)

    @classmethod
    def from_number(cls, number: int) -> StorageType:
        if number == 0:
            return cls.DATA
        try:
            return cls(number)
        except ValueError:
            raise errors.InvalidArgument(
                f"unknown storage type {number}; valid storage types: {cls.valid_labels()}"
            ) from None

    @classmethod
    def from_label(cls, label: str) -> StorageType:
        if label == "":
            return cls.DATA
        try:
            return cls[label.upper()]
        except KeyError:
            raise errors.InvalidArgument(
                f"unknown storage type {label!r}; valid storage types: {cls.valid_labels()}"
            ) from None


class Role(enum.Enum):
    USER = "user"
    CATALOG = "catalog"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """Who is asking: the namespace their keys live in, and their roles."""

    namespace: str = DEFAULT_NAMESPACE
    roles: frozenset[Role] = frozenset({Role.USER})

    def has(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles


ANONYMOUS = Caller()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    storage_type: StorageType
    size: int
    generation: int
    content_type: str
    metadata: dict[str, str]
    create_time_ns: int
    update_time_ns: int
    crc32c: int
    sha256: bytes
    expire_time_ns: int = 0

    @classmethod
    def of(
        cls,
        key: str,
        storage_type: StorageType,
        size: int,
        generation: int,
        content_type: str,
        metadata: dict[str, str],
        create_time_ns: int,
        update_time_ns: int,
        crc32c: int,
        sha256: bytes,
        expire_time_ns: int = 0,
    ) -> ObjectInfo:
        """The same as ObjectInfo(...) in about half the time: a frozen dataclass's __init__ sets
        each field through object.__setattr__, and batches make one of these per value."""
        info = _new_instance(cls)
        _set_attribute(
            info,
            "__dict__",
            {
                "key": key,
                "storage_type": storage_type,
                "size": size,
                "generation": generation,
                "content_type": content_type,
                "metadata": metadata,
                "create_time_ns": create_time_ns,
                "update_time_ns": update_time_ns,
                "crc32c": crc32c,
                "sha256": sha256,
                "expire_time_ns": expire_time_ns,
            },
        )
        return info


_new_instance = object.__new__
_set_attribute = object.__setattr__


@dataclass(frozen=True)
class ListPage:
    objects: list[ObjectInfo]
    prefixes: list[str]
    next_page_token: str


@dataclass(frozen=True)
class ByteRange:
    """[start, end) of an object of `complete_length` bytes."""

    start: int
    end: int
    complete_length: int


@dataclass
class UploadSpec:
    key: str
    storage_type: StorageType = StorageType.DATA
    content_type: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    declared_size: int | None = None
    if_generation_match: int | None = None


@dataclass(slots=True)
class BatchEntry:
    """One value of a BatchSet: the same fields as a Set, judged on their own."""

    key: str
    value: bytes
    content_type: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    if_generation_match: int | None = None
    crc32c_expected: int | None = None


def validate_key(key: str) -> None:
    """Keys are UTF-8, 1 to 1024 bytes, with no control characters."""
    if not isinstance(key, str):
        raise errors.InvalidArgument(f"key must be a string, not {type(key).__name__}")
    if not key:
        raise errors.InvalidArgument("key is empty; keys are 1 to 1024 bytes of UTF-8")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument("key is not valid UTF-8 (it contains a lone surrogate)") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise errors.InvalidArgument(f"key is {len(encoded)} bytes of UTF-8; at most {MAX_KEY_BYTES} are allowed")
    if key.isascii() and key.isprintable():
        return  # the common case; in ASCII only control characters are unprintable
    for position, char in enumerate(key):
        if unicodedata.category(char) == "Cc":
            raise errors.InvalidArgument(f"key contains control character U+{ord(char):04X} at position {position}")


def validate_metadata(metadata: dict[str, str]) -> None:
    total = 0
    for name, value in metadata.items():
        if not name:
            raise errors.InvalidArgument("metadata names must not be empty")
        total += len(name.encode()) + len(value.encode())
    if total > 8192:
        raise errors.InvalidArgument(f"metadata is {total} bytes; at most 8192 are allowed")
