"""Per-namespace quotas (bytes, objects, open upload sessions) and request rates.

Usage lives in the index and changes only inside the transaction that changes
what it counts, through `charge()`: a commit that would take a namespace past
a limit raises inside that transaction, so nothing of it is written and the
numbers stay exact under concurrency (the index serializes writers), overwrite,
delete and dedup. Bytes are billed by logical size: a chunk shared by two
objects counts for each of them.

Limits come from the server's configuration (QuotaConfig, the same for every
namespace) with per-namespace overrides stored in the index (`blobstore quota
set`), which take effect at once and are read in the same transaction that
enforces them.

A write that does not grow a count is always allowed, so a namespace that is
over a limit (because the limit was lowered) can still delete, shrink and
overwrite in place.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from blobstore.internal import records_pb2 as rec
from blobstore.server import errors, schema
from blobstore.server.index import IndexReader, IndexWriter

UNLIMITED = 0


@dataclass
class QuotaConfig:
    """Limits every namespace gets unless overridden; 0 means unlimited."""

    max_bytes: int = 1 << 40
    max_objects: int = 10_000_000
    # Resumable upload sessions started and neither committed, cancelled nor expired.
    max_open_uploads: int = 1000
    # Sustained requests per second (token bucket); 0 means unlimited.
    requests_per_second: float = 10_000.0
    # Requests allowed at once (the bucket's size); 0 means two seconds' worth of the rate.
    burst: int = 0


@dataclass(frozen=True)
class Limits:
    """The limits in force for one namespace; 0 means unlimited."""

    max_bytes: int
    max_objects: int
    max_open_uploads: int
    requests_per_second: float
    burst: int

    @functools.cached_property
    def bucket_capacity(self) -> float:
        """Requests allowed at once: `burst`, or two seconds' worth of the rate (at least one)."""
        return float(max(self.burst or math.ceil(2 * self.requests_per_second), 1))


@dataclass(frozen=True)
class QuotaStatus:
    namespace: str
    limits: Limits
    usage: rec.UsageRecord


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


_configured_limits = operator.attrgetter(*LIMIT_NAMES)


def limits_for(reader: IndexReader, namespace: str, config: QuotaConfig) -> Limits:
    """The configured defaults with the namespace's stored overrides applied."""
    raw = reader.get(schema.QUOTAS, namespace.encode())
    return _merge(_configured_limits(config), None if raw is None else bytes(raw))


@functools.lru_cache(maxsize=1024)
def _merge(defaults: tuple[Any, ...], raw_override: bytes | None) -> Limits:
    # Cached: this runs on every request (for its rate limit) and on every commit.
    values = dict(zip(LIMIT_NAMES, defaults, strict=True))
    if raw_override is not None:
        for descriptor, value in rec.QuotaRecord.FromString(raw_override).ListFields():
            values[descriptor.name] = value
    return Limits(**values)


def read_usage(reader: IndexReader, namespace: str) -> rec.UsageRecord:
    raw = reader.get(schema.USAGE, namespace.encode())
    return rec.UsageRecord.FromString(raw) if raw else rec.UsageRecord()


def read_status(reader: IndexReader, namespace: str, config: QuotaConfig) -> QuotaStatus:
    return QuotaStatus(namespace, limits_for(reader, namespace, config), read_usage(reader, namespace))


def charge(
    txn: IndexWriter, namespace: str, config: QuotaConfig, *, size: int = 0, objects: int = 0, uploads: int = 0
) -> rec.UsageRecord:
    """Adds to a namespace's usage; raises QuotaExceeded if a count that grows passes its limit.

    Call it inside the transaction that makes the change, once with the net
    change (an overwrite charges new size minus old size and no object).
    """
    account = Account(txn, namespace, config)
    account.charge(size=size, objects=objects, uploads=uploads)
    account.save()
    return account.usage


class Account:
    """One namespace's usage, read once and written once for many changes in one transaction.

    Each charge() is judged against the usage after the charges before it, as if
    each ran in a transaction of its own, so a batch stays exact and one change
    refused leaves the others standing. Only save() writes: a batch of N values
    parses and serializes the usage record once instead of N times.
    """

    __slots__ = ("_config", "_limits", "_namespace", "_txn", "changed", "usage")

    def __init__(self, txn: IndexWriter, namespace: str, config: QuotaConfig) -> None:
        self._txn = txn
        self._namespace = namespace
        self._config = config
        self._limits: Limits | None = None
        self.usage = read_usage(txn, namespace)
        self.changed = False

    def charge(self, *, size: int = 0, objects: int = 0, uploads: int = 0) -> None:
        """Raises QuotaExceeded, changing nothing, if a count that grows would pass its limit."""
        if size > 0 or objects > 0 or uploads > 0:
            if self._limits is None:
                self._limits = limits_for(self._txn, self._namespace, self._config)
            _check(self._namespace, self._limits, self.usage, size, objects, uploads)
        usage = self.usage
        usage.bytes += size
        usage.objects += objects
        usage.open_uploads += uploads
        self.changed = True

    def save(self) -> None:
        if self.changed:
            self._txn.put(schema.USAGE, self._namespace.encode(), self.usage.SerializeToString())


def check_room(
    reader: IndexReader, namespace: str, config: QuotaConfig, *, size: int = 0, objects: int = 0, uploads: int = 0
) -> None:
    """The same test as charge() without charging: refuses early what the commit would refuse.

    Only advisory (usage may change before the commit, which decides), but it
    spares a client streaming gigabytes that can never be committed.
    """
    if size > 0 or objects > 0 or uploads > 0:
        _check(namespace, limits_for(reader, namespace, config), read_usage(reader, namespace), size, objects, uploads)


def _check(namespace: str, limits: Limits, usage: rec.UsageRecord, size: int, objects: int, uploads: int) -> None:
    if size > 0 and limits.max_bytes != UNLIMITED and usage.bytes + size > limits.max_bytes:
        raise errors.QuotaExceeded(
            f"byte quota exceeded (max_bytes): namespace {namespace!r} may store {limits.max_bytes} bytes, "
            f"uses {usage.bytes} and this write needs {size} more; nothing was stored. "
            "Delete objects or ask for a larger quota"
        )
    if objects > 0 and limits.max_objects != UNLIMITED and usage.objects + objects > limits.max_objects:
        raise errors.QuotaExceeded(
            f"object count quota exceeded (max_objects): namespace {namespace!r} may hold "
            f"{limits.max_objects} objects and holds {usage.objects}; nothing was stored. "
            "Delete objects or ask for a larger quota"
        )
    if uploads > 0 and limits.max_open_uploads != UNLIMITED and usage.open_uploads + uploads > limits.max_open_uploads:
        raise errors.QuotaExceeded(
            f"open upload session quota exceeded (max_open_uploads): namespace {namespace!r} may have "
            f"{limits.max_open_uploads} open upload sessions and has {usage.open_uploads}; "
            "finish or cancel one first"
        )


# ---------------------------------------------------------------------- overrides


def set_override(txn: IndexWriter, namespace: str, **values: int | float | None) -> rec.QuotaRecord:
    """Sets (a number) or clears (None) some of a namespace's overrides; returns what is stored."""
    unknown = set(values) - set(LIMIT_NAMES)
    if unknown:
        raise errors.InvalidArgument(f"unknown limits {sorted(unknown)}; limits are {', '.join(LIMIT_NAMES)}")
    raw = txn.get(schema.QUOTAS, namespace.encode())
    record = rec.QuotaRecord.FromString(raw) if raw else rec.QuotaRecord()
    for name, value in values.items():
        if value is None:
            record.ClearField(name)  # type: ignore[arg-type]
            continue
        if value < 0:
            raise errors.InvalidArgument(f"{name} must not be negative (0 means unlimited)")
        setattr(record, name, value)
    if record.ListFields():
        txn.put(schema.QUOTAS, namespace.encode(), record.SerializeToString())
    else:
        txn.delete(schema.QUOTAS, namespace.encode())
    return record


# ---------------------------------------------------------------------- request rate


class RateLimiter:
    """A token bucket per namespace, in this process's memory.

    Each server process keeps its own buckets, so N replicas together allow up
    to N times the rate. The clock is the engine's (nanoseconds, injectable);
    a clock stepping backwards adds nothing to a bucket.
    """

    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def acquire(self, namespace: str, limits: Limits) -> None:
        rate = limits.requests_per_second
        if rate <= 0:
            return
        capacity = limits.bucket_capacity  # computed once per Limits, which limits_for caches
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(namespace, (capacity, now))
            tokens = min(capacity, tokens + max(0, now - last) * rate / 1e9)
            if tokens < 1.0:
                self._buckets[namespace] = (tokens, now)
                retry_after = (1.0 - tokens) / rate
                raise errors.RateLimited(
                    f"rate limit exceeded (requests_per_second): namespace {namespace!r} may make {rate:g} "
                    f"requests per second with bursts of {int(capacity)}; retry in {retry_after:.2g} s"
                )
            self._buckets[namespace] = (tokens - 1.0, now)
