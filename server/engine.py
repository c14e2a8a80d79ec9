"""The storage engine: validation, chunking, checksums, atomic commits, garbage collection.

No gRPC or HTTP in here: the gRPC servicer and the signed-URL handler both call
this. Commit order for a chunked value: every chunk durable in the chunk store,
then one index transaction that makes the new version visible and moves the
reference counts. A crash anywhere before that transaction leaves the old
version and some unreferenced chunk files, which the start-up sweep removes.

Chunks in use by an upload or a download that has not finished are pinned in
memory, so that garbage collection never deletes a chunk an in-flight
transfer is about to reference or read. When the index is shared by several
replicas, pins are leases in the index instead (server/sharedgc.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import google_crc32c

from blobstore.client.checksums import crc32c_combine
from blobstore.internal import records_pb2 as rec
from blobstore.server import errors, quotas, schema
from blobstore.server.chunkstore import ChunkStore
from blobstore.server.handback import Handback
from blobstore.server.index import Index, IndexReader, IndexWriter, LmdbIndex
from blobstore.server.model import (
    BatchEntry,
    ByteRange,
    Caller,
    ListPage,
    ObjectInfo,
    Role,
    StorageType,
    UploadSpec,
    validate_key,
    validate_metadata,
)
from blobstore.server.quotas import QuotaConfig
from blobstore.server.sharedgc import ChunkLeases

log = logging.getLogger(__name__)
T = TypeVar("T")

NS_PER_DAY = 86_400 * 10**9


@dataclass
class EngineConfig:
    # Per chunk and per message the server pays fixed costs (a file, a job, gRPC's own) that
    # 4 MiB chunks, sent as 4 MiB messages, pay a quarter as often as 1 MiB ones: a fifth to a
    # quarter less server CPU per uploaded GiB (docs/benchmarks.md, item 23).
    chunk_size: int = 4 << 20
    # Values up to this size live inside the index record: no file I/O at all.
    inline_threshold: int = 64 << 10
    # Largest value for the unary Set/Get calls; larger ones stream.
    max_unary_value: int = 1 << 20
    tmp_ttl_ns: int = 7 * NS_PER_DAY
    upload_session_ttl_ns: int = 7 * NS_PER_DAY
    # A resumable session makes its progress durable every this many chunks (and when its stream ends).
    # 16 MiB of 4 MiB chunks: a non-seekable stream resumes within the client's 32 MiB window.
    session_checkpoint_chunks: int = 4
    # Address space of the LMDB index (None: the backend's default); writes past it fail RESOURCE_EXHAUSTED.
    index_map_size: int | None = None
    # LMDB index: how long (us) a group commit may wait for more writes to share its fsyncs,
    # only while writes overlap (a lone write never waits); 0: never wait.
    index_commit_gather_us: int = round(LmdbIndex.GATHER_S * 1e6)
    default_page_size: int = 1000
    max_page_size: int = 10_000
    max_batch_entries: int = 1000
    # Chunks of one upload hashed and written concurrently.
    upload_pipeline_depth: int = 3
    # Chunks of one download read ahead.
    download_readahead: int = 2
    # Worker threads for chunk I/O and hashing (a remote chunk store wants more: see backends.py).
    io_threads: int = 8
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    # Shared stores only: how long a chunk lease of a replica that died keeps its chunk.
    chunk_lease_ttl_ns: int = NS_PER_DAY
    # Shared stores only: at most one replica lists the chunk store for orphans (objects no
    # table knows of) per this interval; 0: never by itself, only on demand (sweep_orphans).
    orphan_sweep_interval_ns: int = NS_PER_DAY


@dataclass
class StoreStats:
    objects: int = 0
    # Sum of object sizes: what users stored.
    logical_bytes: int = 0
    open_uploads: int = 0
    chunks: int = 0
    # Bytes in the chunk store, each distinct chunk counted once.
    chunk_bytes: int = 0
    # Bytes the chunk references of objects and sessions add up to: chunk_bytes before deduplication.
    referenced_chunk_bytes: int = 0


def crc32c(data: bytes | memoryview) -> int:
    return int(google_crc32c.value(data))


class _Generations:
    """Hands out generations inside one write transaction, reading and writing the counter once.

    A shared index may hand out generations from a sequence instead of one hot counter row.
    """

    __slots__ = ("_last", "_sequence", "_txn")

    def __init__(self, txn: IndexWriter) -> None:
        self._txn = txn
        self._sequence: Callable[[], int] | None = getattr(txn, "next_generation", None)
        self._last: int | None = None

    def next(self) -> int:
        if self._sequence is not None:
            return int(self._sequence())
        if self._last is None:
            raw = self._txn.get(schema.META, schema.META_GENERATION)
            self._last = schema.unpack_u64(raw) if raw else 0
        self._last += 1
        return self._last

    def save(self) -> None:
        if self._last is not None:
            self._txn.put(schema.META, schema.META_GENERATION, schema.pack_u64(self._last))


class Engine:
    def __init__(
        self,
        index: Index,
        chunks: ChunkStore,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        executor: Executor | None = None,
    ) -> None:
        self.index = index
        self.chunks = chunks
        self.config = config or EngineConfig()
        self.clock = clock
        self._own_executor = executor is None
        self.executor: Executor = executor or ThreadPoolExecutor(
            max_workers=self.config.io_threads, thread_name_prefix="blobstore-io"
        )
        self._pins: Counter[bytes] = Counter()
        self._pin_lock = threading.Lock()
        # Several replicas on one index: pins must be visible to the others' collectors.
        self._leases: ChunkLeases | None = None
        if getattr(index, "shared", False):
            self._leases = ChunkLeases(index, chunks, clock, lease_ttl_ns=self.config.chunk_lease_ttl_ns)
        # LMDB answers a read from memory in microseconds; a shared index (PostgreSQL) takes
        # network round trips, during which the event loop must go on serving everyone else.
        self.reads_wait_on_network = bool(getattr(index, "shared", False))
        self._handback: Handback | None = None
        # Set once close() starts: a long listing of the chunk store stops at its next page.
        self._closing = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closing.set()
        # Background collection finishes first: it still needs the index.
        if self._own_executor:
            self.executor.shutdown(wait=True)
        self.index.close()
        close_chunks = getattr(self.chunks, "close", None)
        if close_chunks is not None:
            close_chunks()

    def startup_sweep(self) -> dict[str, int]:
        """Removes what a crash can leave behind: temp files and chunk files no record references.

        Runs before the server accepts requests, so nothing is pinned yet. A shared store
        is not listed here: the chunks of replicas that died are collected when their leases
        expire (sweep_leases), and the chunk objects no table knows of by sweep_orphans,
        which other replicas may go on uploading through and which costs requests to list.
        """
        if self._leases is not None:
            return {"unreferenced_chunks": self._leases.sweep()["deleted"], "temp_files": 0}
        removed_tmp = 0
        clear_tmp = getattr(self.chunks, "clear_tmp", None)
        if clear_tmp is not None:
            removed_tmp = clear_tmp()
        removed = 0
        with self.index.reader() as r:
            for digest in self.chunks.iter_digests():
                if r.get(schema.CHUNKS, digest) is None:
                    self.chunks.delete(digest)
                    removed += 1
        if removed or removed_tmp:
            log.info("start-up sweep removed %d unreferenced chunks and %d temp files", removed, removed_tmp)
        return {"unreferenced_chunks": removed, "temp_files": removed_tmp}

    # ------------------------------------------------------------------ helpers

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn`, a synchronous read of the index, for a coroutine: inline when the index is
        local, on a worker thread when its reads wait on the network."""
        if self.reads_wait_on_network:
            return await self._run(fn, *args)
        return fn(*args)

    def _submit_releasing(self, op: Callable[[IndexWriter], tuple[T, list[bytes]]]) -> Future[tuple[T, list[bytes]]]:
        """Submits an op that returns (result, chunks it released). The released chunks are
        collected once the commit is durable, even if the caller is cancelled meanwhile:
        a cancelled caller does not cancel a commit already queued."""
        future = self.index.submit(op)

        def collect(done: Future[tuple[T, list[bytes]]]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._collect_later(done.result()[1])

        future.add_done_callback(collect)
        return future

    async def _commit(self, op: Callable[[IndexWriter], tuple[T, list[bytes]]]) -> T:
        result, _ = await self._wait(self._submit_releasing(op))
        return result

    def _wait(self, future: Future[T]) -> Awaitable[T]:
        """Awaits work finished on another thread (the index writer's commits, say): the
        futures a group commit finishes together wake the event loop once."""
        loop = asyncio.get_running_loop()
        handback = self._handback
        if handback is None or handback.loop is not loop:
            handback = self._handback = Handback(loop)
        return handback.wait(future)

    def _check_readable(self, caller: Caller, storage_type: StorageType) -> None:
        if storage_type is StorageType.PRODUCTS and not caller.has(Role.CATALOG):
            raise errors.ForbiddenByStorageType(
                "objects of storage type products are read and removed through the catalog; "
                "users may only upload, stat and list them"
            )

    _check_deletable = _check_readable

    def _live(self, record: rec.ObjectRecord | None, now: int | None = None) -> rec.ObjectRecord | None:
        if record is None:
            return None
        if record.expire_time_ns and record.expire_time_ns <= (self.clock() if now is None else now):
            return None
        return record

    def _read_record(self, r: IndexReader, okey: bytes) -> rec.ObjectRecord | None:
        raw = r.get(schema.OBJECTS, okey)
        if raw is None:
            return None
        return self._live(rec.ObjectRecord.FromString(raw))

    def _info(self, key: str, storage_type: StorageType, record: rec.ObjectRecord) -> ObjectInfo:
        # No dict() of an empty map (which alone costs as much as the rest): this runs once
        # per value of every batch.
        return ObjectInfo.of(
            key,
            storage_type,
            record.size,
            record.generation,
            record.content_type,
            dict(record.metadata) if record.metadata else {},
            record.create_time_ns,
            record.update_time_ns,
            record.crc32c,
            record.sha256,
            record.expire_time_ns,
        )

    def _not_found(self, key: str, storage_type: StorageType) -> errors.NotFound:
        return errors.NotFound(f"no object {key!r} in storage type {storage_type.label}")

    # ------------------------------------------------------------------ pins and garbage

    def sweep_leases(self) -> dict[str, int]:
        """Shared stores: collects the chunks that replicas which died had pinned."""
        return self._leases.sweep() if self._leases is not None else {}

    def sweep_orphans_if_due(self) -> dict[str, int]:
        """Shared stores: sweep_orphans, when no replica of the store has in the last
        `orphan_sweep_interval_ns` (the server asks every reap interval: a read, nothing more)."""
        interval = self.config.orphan_sweep_interval_ns
        if self._leases is None or interval <= 0 or not self._leases.claim_orphan_sweep(interval):
            return {}
        return self.sweep_orphans()

    def sweep_orphans(self, min_age_ns: int | None = None) -> dict[str, int]:
        """Shared stores: deletes the chunk objects that no record references, no replica holds
        and no collector is deleting, once older than `min_age_ns` (a lease TTL); safe while
        other replicas run (server/sharedgc.py). A local store's start-up sweep does this."""
        if self._leases is None:
            return {}
        if min_age_ns is None:
            min_age_ns = self.config.chunk_lease_ttl_ns
        return self._leases.sweep_orphans(min_age_ns, stop=self._closing.is_set)

    def _pin(self, digests: Iterable[bytes]) -> None:
        if self._leases is not None:
            self._leases.pin(digests)
            return
        with self._pin_lock:
            self._pins.update(digests)

    def _unpin_and_collect(self, digests: Iterable[bytes]) -> None:
        if self._leases is not None:
            # Deleting from a remote store takes round trips: not on the caller's (event loop)
            # thread, unless the executor is shutting down. Then here and now: the lease is gone,
            # and no sweep of a shared store would ever find a chunk that has neither lease nor
            # tombstone (as the start-up sweep finds a local store's).
            freed = self._leases.unpin(digests)
            if freed and not self._in_background("collecting released chunks", self._collect, freed):
                self._collect(freed)
            return
        freed = []
        with self._pin_lock:
            for digest in digests:
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]
                    freed.append(digest)
        if freed:
            self._collect(freed)

    def _unpin_after_read(self, digests: list[bytes]) -> None:
        """Releases a read's pins from the event loop."""
        if self._leases is not None:
            self._unpin_soon(digests)  # dropping leases commits to the shared index: round trips
        else:
            self._unpin_and_collect(digests)

    def _collect(self, digests: Iterable[bytes]) -> None:
        """Deletes the chunk files that nothing references and nothing in flight holds."""
        if self._leases is not None:
            self._leases.collect(digests)
            return
        # The pin lock is held across the check and the unlink: an upload pins a
        # chunk before it looks for it, so it either sees the file gone and writes
        # it again, or its pin keeps the file here.
        with self._pin_lock, self.index.reader() as r:
            for digest in digests:
                if digest in self._pins or r.get(schema.CHUNKS, digest) is not None:
                    continue
                self.chunks.delete(digest)

    def _collect_later(self, digests: list[bytes]) -> None:
        # Not taken when the executor is shutting down: the next start-up sweep removes them.
        if digests:
            self._in_background("collecting released chunks", self._collect, digests)

    def _in_background(self, what: str, work: Callable[..., object], *args: Any) -> bool:
        """Runs `work` on a worker thread that nobody awaits, so that a failure is logged rather
        than lost; False when the executor is shutting down and did not take it."""
        try:
            job = self.executor.submit(work, *args)
        except RuntimeError:
            return False
        job.add_done_callback(functools.partial(_log_background_failure, what))
        return True

    # ------------------------------------------------------------------ index transactions

    @staticmethod
    def _next_generation(txn: IndexWriter) -> int:
        generations = _Generations(txn)
        generation = generations.next()
        generations.save()
        return generation

    def _add_usage(
        self, txn: IndexWriter, namespace: str, *, size: int = 0, objects: int = 0, uploads: int = 0
    ) -> None:
        """Moves a namespace's usage, or raises QuotaExceeded if a count that grows would pass its
        limit (the transaction then writes nothing). Charge a net change in one call."""
        quotas.charge(txn, namespace, self.config.quotas, size=size, objects=objects, uploads=uploads)

    @staticmethod
    def _incref(txn: IndexWriter, refs: Iterable[rec.ChunkRef]) -> None:
        for ref in refs:
            raw = txn.get(schema.CHUNKS, ref.sha256)
            chunk = rec.ChunkRecord.FromString(raw) if raw else rec.ChunkRecord(size=ref.size, crc32c=ref.crc32c)
            chunk.refcount += 1
            txn.put(schema.CHUNKS, ref.sha256, chunk.SerializeToString())

    @staticmethod
    def _decref(txn: IndexWriter, refs: Iterable[rec.ChunkRef]) -> list[bytes]:
        released = []
        for ref in refs:
            raw = txn.get(schema.CHUNKS, ref.sha256)
            if raw is None:
                continue
            chunk = rec.ChunkRecord.FromString(raw)
            chunk.refcount -= 1
            if chunk.refcount <= 0:
                txn.delete(schema.CHUNKS, ref.sha256)
                released.append(bytes(ref.sha256))
            else:
                txn.put(schema.CHUNKS, ref.sha256, chunk.SerializeToString())
        return released

    def _remove_record(
        self, txn: IndexWriter, namespace: str, okey: bytes, record: rec.ObjectRecord, *, account: bool = True
    ) -> list[bytes]:
        txn.delete(schema.OBJECTS, okey)
        if record.expire_time_ns:
            txn.delete(schema.EXPIRY, schema.expiry_key(record.expire_time_ns, okey))
        if account:
            self._add_usage(txn, namespace, size=-record.size, objects=-1)
        return self._decref(txn, record.chunks)

    def _commit_op(
        self,
        namespace: str,
        storage_type: StorageType,
        key: str,
        draft: rec.ObjectRecord,
        if_generation_match: int | None,
    ) -> Callable[[IndexWriter], tuple[rec.ObjectRecord, list[bytes]]]:
        """The transaction that makes `draft` the current version of a key."""
        okey = schema.object_key(namespace, storage_type, key)

        def op(txn: IndexWriter) -> tuple[rec.ObjectRecord, list[bytes]]:
            now = self.clock()
            raw = txn.get(schema.OBJECTS, okey)
            stored = rec.ObjectRecord.FromString(raw) if raw else None
            current = self._live(stored, now)
            self._check_precondition(key, current, if_generation_match)
            # One net charge, so that replacing an object by one no larger is never refused.
            self._add_usage(
                txn, namespace, size=draft.size - (stored.size if stored else 0), objects=0 if stored else 1
            )
            # The draft is the caller's own: filled in place (idempotently, should the op run again).
            draft.key = key
            released = self._install(txn, storage_type, okey, draft, stored, current, self._next_generation(txn), now)
            return draft, released

        return op

    def _batch_commit_op(
        self, namespace: str, storage_type: StorageType, items: list[tuple[bytes, rec.ObjectRecord, int | None]]
    ) -> Callable[[IndexWriter], tuple[list[rec.ObjectRecord | errors.BlobstoreError], list[bytes]]]:
        """One transaction for many (objects key, draft with its key, precondition): each entry's
        precondition and quota are judged on their own, in order, before it writes anything,
        so a refused entry needs no nested transaction to undo it. The generation counter and
        the namespace's usage are read and written once for the whole batch."""

        def op(txn: IndexWriter) -> tuple[list[rec.ObjectRecord | errors.BlobstoreError], list[bytes]]:
            now = self.clock()
            account = quotas.Account(txn, namespace, self.config.quotas)
            generations = _Generations(txn)
            outcomes: list[rec.ObjectRecord | errors.BlobstoreError] = []
            released: list[bytes] = []
            for okey, draft, if_generation_match in items:
                raw = txn.get(schema.OBJECTS, okey)
                stored: rec.ObjectRecord | None
                current: rec.ObjectRecord | None
                if raw:
                    stored = rec.ObjectRecord.FromString(raw)
                    expires = stored.expire_time_ns  # what _live() checks, inline: this runs per value
                    current = stored if not expires or expires > now else None
                else:
                    stored = current = None
                try:
                    if if_generation_match is not None:
                        self._check_precondition(draft.key, current, if_generation_match)
                    account.charge(size=draft.size - (stored.size if stored else 0), objects=0 if stored else 1)
                except errors.BlobstoreError as refused:
                    outcomes.append(refused)
                    continue
                # The draft is this batch's own: filled in place (idempotently, should the op run again).
                released += self._install(txn, storage_type, okey, draft, stored, current, generations.next(), now)
                outcomes.append(draft)
            generations.save()
            account.save()
            return outcomes, released

        return op

    @staticmethod
    def _check_precondition(key: str, current: rec.ObjectRecord | None, if_generation_match: int | None) -> None:
        if if_generation_match is None:
            return
        current_generation = current.generation if current else 0
        if current_generation != if_generation_match:
            raise errors.GenerationMismatch(
                f"object {key!r} is at generation {current_generation}, "
                f"not {if_generation_match} as the write required"
                + (" (0: must not exist)" if if_generation_match == 0 else "")
            )

    def _install(
        self,
        txn: IndexWriter,
        storage_type: StorageType,
        okey: bytes,
        record: rec.ObjectRecord,
        stored: rec.ObjectRecord | None,
        current: rec.ObjectRecord | None,
        generation: int,
        now: int,
    ) -> list[bytes]:
        """Writes `record` over whatever `stored` was (usage is the caller's); returns the chunks released."""
        record.generation = generation
        record.create_time_ns = current.create_time_ns if current else now
        record.update_time_ns = now
        # New references first, so a chunk shared by both versions never drops to zero.
        if record.chunks:
            self._incref(txn, record.chunks)
        released: list[bytes] = []
        if stored is not None:
            # The objects row itself is overwritten below, not deleted first.
            if stored.expire_time_ns:
                txn.delete(schema.EXPIRY, schema.expiry_key(stored.expire_time_ns, okey))
            if stored.chunks:
                released = self._decref(txn, stored.chunks)
        if storage_type is StorageType.TMP:
            record.expire_time_ns = now + self.config.tmp_ttl_ns
            txn.put(schema.EXPIRY, schema.expiry_key(record.expire_time_ns, okey), b"")
        txn.put(schema.OBJECTS, okey, record.SerializeToString())
        return released

    # ------------------------------------------------------------------ writes

    @staticmethod
    def _validate_target(key: str, metadata: dict[str, str], if_generation_match: int | None) -> None:
        """What every write checks of its key, metadata and precondition."""
        validate_key(key)
        if metadata:  # batches run this once per value: skip the call for the common empty map
            validate_metadata(metadata)
        if if_generation_match is not None and if_generation_match < 0:
            raise errors.InvalidArgument("if_generation_match must be 0 (must not exist) or a generation")

    def _validate_write(self, caller: Caller, spec: UploadSpec) -> None:
        self._validate_target(spec.key, spec.metadata, spec.if_generation_match)
        if spec.declared_size is not None and spec.declared_size < 0:
            raise errors.InvalidArgument("size must not be negative")

    async def set(
        self,
        caller: Caller,
        storage_type: StorageType,
        key: str,
        value: bytes,
        *,
        content_type: str = "",
        metadata: dict[str, str] | None = None,
        if_generation_match: int | None = None,
        crc32c_expected: int | None = None,
    ) -> ObjectInfo:
        metadata = dict(metadata) if metadata else {}
        self._validate_target(key, metadata, if_generation_match)
        if len(value) > self.config.max_unary_value:
            raise errors.InvalidArgument(
                f"value is {len(value)} bytes; Set takes at most {self.config.max_unary_value}: "
                "stream larger values with Upload"
            )
        value_crc = crc32c(value)
        if crc32c_expected is not None and crc32c_expected != value_crc:
            raise errors.ChecksumMismatch(
                f"value CRC32C is {value_crc:#010x}, the request said {crc32c_expected:#010x}; nothing was stored"
            )
        if len(value) <= self.config.inline_threshold:
            # The whole value is here and lives in the record: no upload machinery needed.
            draft = self._draft(key, value, value_crc, content_type, metadata)
            record = await self._commit(
                self._commit_op(caller.namespace, storage_type, key, draft, if_generation_match)
            )
            return self._info(key, storage_type, record)
        spec = UploadSpec(key, storage_type, content_type, metadata, None, if_generation_match)
        upload = self.new_upload(caller, spec)
        try:
            await upload.write(0, value, known_crc32c=value_crc)
            return await upload.finish()
        finally:
            await upload.abort()

    async def batch_set(
        self, caller: Caller, storage_type: StorageType, entries: list[BatchEntry]
    ) -> list[ObjectInfo | errors.BlobstoreError]:
        """Stores many values with one index transaction and one fsync.

        Each entry is validated, checked against its precondition and its quota
        and committed on its own: one bad entry fails with its error in its
        place in the result, the others still commit.
        """
        self._check_batch_size(len(entries))
        results: list[ObjectInfo | errors.BlobstoreError | None] = [None] * len(entries)
        drafts: dict[int, rec.ObjectRecord] = {}
        chunked: list[int] = []
        inline_threshold = self.config.inline_threshold
        for position, entry in enumerate(entries):
            try:
                drafts[position] = self._batch_draft(entry)
            except errors.BlobstoreError as exc:
                results[position] = exc
            else:
                if len(entry.value) > inline_threshold:
                    chunked.append(position)
        pinned: list[bytes] = []
        # Whatever happens to this coroutine, the pins hold until the chunk writes and the
        # commit have settled: garbage collection must not take chunks a commit references.
        settles: Future[Any] | None = None
        try:
            if chunked:
                # Chunks are durable before the transaction that references them, as for Upload.
                def store_chunks() -> None:
                    for position in chunked:
                        drafts[position].chunks.extend(self._put_value_chunks(entries[position].value, pinned))
                    self.chunks.sync()

                settles = self.executor.submit(store_chunks)
                await asyncio.wrap_future(settles)
            positions = list(drafts)
            if not positions:
                return [result for result in results if result is not None]
            prefix = schema.object_prefix(caller.namespace, storage_type)
            items = [
                (prefix + schema.encode_key(entries[p].key.encode()), drafts[p], entries[p].if_generation_match)
                for p in positions
            ]
            settles = self._submit_releasing(self._batch_commit_op(caller.namespace, storage_type, items))
            try:
                outcomes, _ = await asyncio.wrap_future(settles)
            except Exception:
                # Something other than a precondition or a quota failed part-way (the index is
                # full, say): each entry again in a transaction of its own, for its own outcome.
                settles = self._submit_each(caller.namespace, storage_type, entries, drafts, positions)
                outcomes = await asyncio.wrap_future(settles)
            for position, outcome in zip(positions, outcomes, strict=True):
                if isinstance(outcome, errors.BlobstoreError):
                    results[position] = outcome
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    entry = entries[position]
                    # What _info() makes of the record, but from the values at hand: each field read
                    # back from a protobuf message costs as much as a Python call, and this runs per value.
                    results[position] = ObjectInfo.of(
                        entry.key,
                        storage_type,
                        len(entry.value),
                        outcome.generation,
                        entry.content_type,
                        dict(entry.metadata) if entry.metadata else {},
                        outcome.create_time_ns,
                        outcome.update_time_ns,
                        outcome.crc32c,
                        outcome.sha256,
                        outcome.expire_time_ns,
                    )
        finally:
            if settles is None:
                self._unpin_and_collect(pinned)
            else:
                settles.add_done_callback(lambda _: self._unpin_soon(pinned))
        done = [result for result in results if result is not None]
        assert len(done) == len(entries), "every batch entry gets a result"
        return done

    def _submit_each(
        self,
        namespace: str,
        storage_type: StorageType,
        entries: list[BatchEntry],
        drafts: dict[int, rec.ObjectRecord],
        positions: list[int],
    ) -> Future[list[Any]]:
        """The batch's entries in one transaction, each in a nested one: its outcome is the record
        stored or the exception that undid that entry alone."""
        ops = [
            self._commit_op(namespace, storage_type, entries[p].key, drafts[p], entries[p].if_generation_match)
            for p in positions
        ]

        def records_only(done: Future[list[Any]]) -> list[Any]:
            return [outcome[0] if isinstance(outcome, tuple) else outcome for outcome in done.result()]

        committed = self.index.submit_batch(ops)
        committed.add_done_callback(self._collect_batch_releases)
        records: Future[list[Any]] = Future()

        def settle(done: Future[list[Any]]) -> None:
            try:
                records.set_result(records_only(done))
            except BaseException as exc:
                records.set_exception(exc)

        committed.add_done_callback(settle)
        return records

    def _collect_batch_releases(self, done: Future[list[Any]]) -> None:
        """Once a batch commit is durable: collect the chunks its entries released."""
        if done.cancelled() or done.exception() is not None:
            return
        released = [digest for outcome in done.result() if isinstance(outcome, tuple) for digest in outcome[1]]
        self._collect_later(released)

    def _unpin_soon(self, digests: list[bytes]) -> None:
        """Called on whichever thread settled the work: the garbage check goes to a worker."""
        if digests and not self._in_background("releasing pins", self._unpin_and_collect, digests):
            self._unpin_and_collect(digests)  # the executor is shutting down

    def _check_batch_size(self, count: int) -> None:
        if count > self.config.max_batch_entries:
            raise errors.InvalidArgument(
                f"the batch has {count} entries; at most {self.config.max_batch_entries} are allowed per call"
            )

    def _batch_draft(self, entry: BatchEntry) -> rec.ObjectRecord:
        """Validates one batch entry and builds its record (with its key), without chunks yet."""
        self._validate_target(entry.key, entry.metadata, entry.if_generation_match)
        value = entry.value
        if len(value) > self.config.max_unary_value:
            raise errors.InvalidArgument(
                f"value of {entry.key!r} is {len(value)} bytes; a batch entry takes at most "
                f"{self.config.max_unary_value}: stream larger values with Upload"
            )
        value_crc: int = google_crc32c.value(value)
        if entry.crc32c_expected is not None and entry.crc32c_expected != value_crc:
            raise errors.ChecksumMismatch(
                f"value CRC32C of {entry.key!r} is {value_crc:#010x}, the request said "
                f"{entry.crc32c_expected:#010x}; that entry was not stored"
            )
        return self._draft(entry.key, value, value_crc, entry.content_type, entry.metadata)

    def _draft(
        self, key: str, value: bytes, value_crc: int, content_type: str, metadata: dict[str, str]
    ) -> rec.ObjectRecord:
        """The record of a value given whole (inline when small), before its commit fills it in."""
        draft = rec.ObjectRecord(key=key, size=len(value), crc32c=value_crc, sha256=hashlib.sha256(value).digest())
        if content_type:  # each keyword argument costs as much as a field set
            draft.content_type = content_type
        if metadata:
            draft.metadata.update(metadata)
        if len(value) <= self.config.inline_threshold:
            draft.inline_data = value
        return draft

    def _put_value_chunks(self, value: bytes, pinned: list[bytes]) -> list[rec.ChunkRef]:
        """Stores a value's chunks (pinned until the caller unpins `pinned`); runs on a worker thread."""
        refs = []
        size = self.config.chunk_size
        for start in range(0, len(value), size):
            chunk = value[start : start + size]  # the value itself when it fits one chunk: no copy
            digest = hashlib.sha256(chunk).digest()
            self._pin([digest])
            pinned.append(digest)
            with self.index.reader() as r:
                durable = r.get(schema.CHUNKS, digest) is not None
            if not durable:
                self.chunks.put(digest, chunk)
            refs.append(rec.ChunkRef(sha256=digest, size=len(chunk), crc32c=crc32c(chunk)))
        return refs

    def new_upload(self, caller: Caller, spec: UploadSpec) -> UploadWriter:
        self._validate_write(caller, spec)
        if spec.declared_size is not None:
            self._check_room(caller.namespace, spec, spec.declared_size)
        return UploadWriter(self, caller, spec)

    def _check_room(self, namespace: str, spec: UploadSpec, size: int) -> None:
        """Refuses early a write of `size` bytes to spec.key that its commit would refuse."""
        with self.index.reader() as r:
            current = self._read_record(r, schema.object_key(namespace, spec.storage_type, spec.key))
            quotas.check_room(
                r,
                namespace,
                self.config.quotas,
                size=size - (current.size if current else 0),
                objects=0 if current else 1,
            )

    async def delete(
        self, caller: Caller, storage_type: StorageType, key: str, *, if_generation_match: int | None = None
    ) -> None:
        validate_key(key)
        self._check_deletable(caller, storage_type)
        okey = schema.object_key(caller.namespace, storage_type, key)

        def op(txn: IndexWriter) -> tuple[None, list[bytes]]:
            raw = txn.get(schema.OBJECTS, okey)
            stored = rec.ObjectRecord.FromString(raw) if raw else None
            current = self._live(stored)
            if current is None:
                raise self._not_found(key, storage_type)
            if if_generation_match is not None and current.generation != if_generation_match:
                raise errors.GenerationMismatch(
                    f"object {key!r} is at generation {current.generation}, not {if_generation_match}"
                )
            assert stored is not None
            return None, self._remove_record(txn, caller.namespace, okey, stored)

        await self._commit(op)

    def authorize_signed_url(self, caller: Caller, storage_type: StorageType, key: str, *, upload: bool) -> None:
        """Raises unless `caller` may do itself what a signed URL would let anyone do."""
        validate_key(key)
        if not upload:
            self._check_readable(caller, storage_type)

    # ------------------------------------------------------------------ reads

    def stat(self, caller: Caller, storage_type: StorageType, key: str) -> ObjectInfo:
        validate_key(key)
        with self.index.reader() as r:
            record = self._read_record(r, schema.object_key(caller.namespace, storage_type, key))
        if record is None:
            raise self._not_found(key, storage_type)
        return self._info(key, storage_type, record)

    def exists(self, caller: Caller, storage_type: StorageType, key: str) -> bool:
        try:
            self.stat(caller, storage_type, key)
        except errors.NotFound:
            return False
        return True

    async def get(
        self, caller: Caller, storage_type: StorageType, key: str, *, generation: int | None = None
    ) -> tuple[ObjectInfo, bytes]:
        validate_key(key)
        self._check_readable(caller, storage_type)

        def fits_a_unary_call(record: rec.ObjectRecord) -> None:
            if record.size > self.config.max_unary_value:
                raise errors.ObjectTooLargeForUnary(
                    f"object {key!r} is {record.size} bytes; Get returns at most "
                    f"{self.config.max_unary_value}: use Download"
                )

        okey = schema.object_key(caller.namespace, storage_type, key)
        record = await self.run_read(self._pinned_record, okey, key, storage_type, generation, fits_a_unary_call)
        if not record.chunks:
            return self._info(key, storage_type, record), bytes(record.inline_data)
        try:
            parts = [await self._run(self._read_chunk, ref) for ref in record.chunks]
        finally:
            self._unpin_after_read([bytes(ref.sha256) for ref in record.chunks])
        return self._info(key, storage_type, record), b"".join(parts)

    def _read_batch(
        self, prefix: bytes, storage_type: StorageType, keys: list[str], max_total_bytes: int | None
    ) -> tuple[list[tuple[ObjectInfo, bytes] | errors.BlobstoreError], list[int]]:
        """BatchGet's reads from one snapshot: each key's value or error, and the positions of
        values kept in chunks (read afterwards, each on its own)."""
        results: list[tuple[ObjectInfo, bytes] | errors.BlobstoreError] = []
        chunked: list[int] = []
        total = 0
        now = self.clock()
        with self.index.reader() as r:
            for key in keys:
                try:
                    validate_key(key)
                    raw = r.get(schema.OBJECTS, prefix + schema.encode_key(key.encode()))
                    if raw is None:
                        raise self._not_found(key, storage_type)
                    # Each field read costs about a Python call, and this runs per key: every field
                    # is read once, and what _live() checks is checked inline.
                    record = rec.ObjectRecord.FromString(raw)
                    expires = record.expire_time_ns
                    if expires and expires <= now:
                        raise self._not_found(key, storage_type)
                    size = record.size
                    if size > self.config.max_unary_value:
                        raise errors.ObjectTooLargeForUnary(
                            f"object {key!r} is {size} bytes; BatchGet returns at most "
                            f"{self.config.max_unary_value} per value: use Download"
                        )
                    has_chunks = len(record.chunks) > 0
                    # What the entry costs on the wire: value, metadata, key twice, field framing.
                    cost = len(raw) + (size if has_chunks else 0) + 2 * len(key) + 64
                    if max_total_bytes is not None and total + cost > max_total_bytes:
                        raise errors.BatchResponseFull(
                            f"no room left in this response for {key!r} ({size} bytes): Get it on its own"
                        )
                except errors.BlobstoreError as exc:
                    results.append(exc)
                    continue
                total += cost
                if has_chunks:
                    chunked.append(len(results))
                results.append((self._info(key, storage_type, record), record.inline_data))
        return results, chunked

    async def batch_get(
        self, caller: Caller, storage_type: StorageType, keys: list[str], *, max_total_bytes: int | None = None
    ) -> list[tuple[ObjectInfo, bytes] | errors.BlobstoreError]:
        """Reads many values from one snapshot; each key succeeds or fails on its own.

        Values past `max_total_bytes` (what one response message can carry)
        fail with BatchResponseFull, for the caller to Get them on their own.
        """
        self._check_batch_size(len(keys))
        self._check_readable(caller, storage_type)
        results, chunked = await self.run_read(
            self._read_batch, schema.object_prefix(caller.namespace, storage_type), storage_type, keys, max_total_bytes
        )
        for position in chunked:
            info, _ = results[position]  # type: ignore[misc]
            try:
                results[position] = await self.get(caller, storage_type, info.key, generation=info.generation)
            except errors.BlobstoreError as exc:  # replaced or deleted since the snapshot
                results[position] = exc
        return results

    @staticmethod
    def _check_generation(key: str, record: rec.ObjectRecord, generation: int | None) -> None:
        if generation is not None and record.generation != generation:
            raise errors.GenerationMismatch(
                f"object {key!r} is now at generation {record.generation}, not {generation}: it changed"
            )

    def _pinned_record(
        self,
        okey: bytes,
        key: str,
        storage_type: StorageType,
        generation: int | None,
        check: Callable[[rec.ObjectRecord], None],
    ) -> rec.ObjectRecord:
        """The record to read `key` from, its chunks pinned (the caller unpins them); `check` may refuse it.

        Reads racing an overwrite go on with the new version, unless `generation` pins the old one.
        """
        while True:
            with self.index.reader() as r:
                record = self._read_record(r, okey)
            if record is None:
                raise self._not_found(key, storage_type)
            self._check_generation(key, record, generation)
            check(record)
            if not record.chunks:
                return record
            pinned = self._pin_unless_replaced(okey, key, storage_type, record, generation)
            if pinned is not None:
                return pinned

    def _pin_unless_replaced(
        self, okey: bytes, key: str, storage_type: StorageType, record: rec.ObjectRecord, wanted: int | None
    ) -> rec.ObjectRecord | None:
        """Pins `record`; None if a newer version replaced it first and the caller wants whatever is current."""
        try:
            return self._pin_record(okey, key, storage_type, record.generation)
        except errors.GenerationMismatch:
            if wanted is not None:
                raise
            return None

    def _pin_record(self, okey: bytes, key: str, storage_type: StorageType, generation: int) -> rec.ObjectRecord:
        """Pins the chunks of generation `generation` of a key, or raises if it is gone."""
        with self.index.reader() as r:
            record = self._read_record(r, okey)
        if record is None:
            raise self._not_found(key, storage_type)
        self._check_generation(key, record, generation)
        digests = [bytes(ref.sha256) for ref in record.chunks]
        self._pin(digests)
        # The record may have been replaced (and its chunks freed) before the pin took hold.
        with self.index.reader() as r:
            again = self._read_record(r, okey)
        if again is None or again.generation != record.generation:
            self._unpin_and_collect(digests)
            if again is None:
                raise self._not_found(key, storage_type)
            self._check_generation(key, again, generation)
        return record

    def _read_chunk(self, ref: rec.ChunkRef) -> bytes:
        try:
            data = self.chunks.read(ref.sha256)
        except FileNotFoundError:
            raise _chunk_missing(ref) from None
        if len(data) != ref.size or crc32c(data) != ref.crc32c:
            raise _chunk_corrupt(ref)
        return data

    def _read_chunk_pieces(self, ref: rec.ChunkRef, lo: int, hi: int, max_bytes: int | None) -> list[tuple[bytes, int]]:
        """chunk[lo:hi] in pieces of at most `max_bytes` (None: one), each with its CRC32C, once the whole
        chunk has passed its CRC32C check; from the chunk's file when it has one.

        Each piece is read into bytes of its own and hashed once: the chunk's CRC32C is checked
        by combining the pieces' (and those of any bytes around the range). Reading the whole
        chunk and cutting it would copy every byte once more and hash it twice.
        """
        path = self.chunks.local_path(ref.sha256)
        if path is None:  # a remote store: one request for the chunk, not one per piece
            return list(_cut(self._read_chunk(ref), lo, hi, ref.crc32c, max_bytes))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _chunk_missing(ref) from None
        try:
            step = max_bytes or max(1, hi - lo)
            spans = [(0, lo)] if lo else []
            spans += [(start, min(hi, start + step)) for start in range(lo, hi, step)]
            if hi < ref.size:
                spans.append((hi, ref.size))
            pieces: list[tuple[bytes, int]] = []
            whole = read = 0
            for start, end in spans:
                data = os.pread(fd, end - start, start)
                crc = crc32c(data)
                whole = crc32c_combine(whole, crc, len(data)) if start else crc
                read += len(data)
                if lo <= start < hi:
                    pieces.append((data, crc))
            # One byte past the end: a grown file fails the check as a short one does.
            intact = read == ref.size and not os.pread(fd, 1, ref.size)
        finally:
            os.close(fd)
        if not intact or whole != ref.crc32c:
            raise _chunk_corrupt(ref)
        return pieces

    def _open_verified_chunk(self, ref: rec.ChunkRef) -> BinaryIO:
        path = self.chunks.local_path(ref.sha256)
        if path is None:
            raise errors.Unavailable("the chunk store keeps no local files: read chunks instead")
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - handed to the caller open
        except FileNotFoundError:
            raise _chunk_missing(ref) from None
        try:
            # One more byte than expected, so a grown file fails the length check too.
            data = os.pread(file.fileno(), ref.size + 1, 0)
            if len(data) != ref.size or crc32c(data) != ref.crc32c:
                raise _chunk_corrupt(ref)
        except BaseException:
            file.close()
            raise
        return file

    async def open_download(
        self,
        caller: Caller,
        storage_type: StorageType,
        key: str,
        *,
        offset: int = 0,
        limit: int = 0,
        generation: int | None = None,
    ) -> Download:
        validate_key(key)
        self._check_readable(caller, storage_type)
        if offset < 0 or limit < 0:
            raise errors.InvalidArgument("read_offset and read_limit must not be negative")

        def starts_inside(record: rec.ObjectRecord) -> None:
            if offset > record.size:
                raise errors.OutOfRange(f"read_offset {offset} is past the end of {key!r} ({record.size} bytes)")

        okey = schema.object_key(caller.namespace, storage_type, key)
        record = await self.run_read(self._pinned_record, okey, key, storage_type, generation, starts_inside)
        end = record.size if limit == 0 else min(record.size, offset + limit)
        return Download(self, self._info(key, storage_type, record), record, ByteRange(offset, end, record.size))

    # ------------------------------------------------------------------ listing

    def list(
        self,
        caller: Caller,
        storage_type: StorageType,
        *,
        prefix: str = "",
        delimiter: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> ListPage:
        if page_size < 0:
            raise errors.InvalidArgument("page_size must not be negative")
        if page_size > self.config.max_page_size:
            raise errors.InvalidArgument(f"page_size is at most {self.config.max_page_size}")
        page_size = page_size or self.config.default_page_size
        if prefix:
            validate_key(prefix)
        if len(delimiter) > 1 or (delimiter and ord(delimiter) < 32):
            raise errors.InvalidArgument("delimiter must be one printable character")
        base = schema.object_prefix(caller.namespace, storage_type)
        after, skip_prefix = self._decode_page_token(page_token, prefix) if page_token else (None, None)
        resume_from = after if skip_prefix is None else skip_prefix
        start = base + schema.seek_key((resume_from or prefix).encode())
        stop = base + schema.seek_key(prefix.encode()) + b"\xff"  # UTF-8 never contains 0xff
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        last: bytes | None = None
        now = self.clock()
        more = False
        with self.index.reader() as r:
            while True:
                restart = None
                for key, record in self._entries_in_key_order(r, base, start, stop):
                    if (after is not None and key <= after) or not key.startswith(prefix):
                        continue
                    if skip_prefix is not None and key.startswith(skip_prefix):
                        continue
                    if record.expire_time_ns and record.expire_time_ns <= now:
                        continue
                    if len(objects) + len(prefixes) >= page_size:
                        more = True
                        break
                    if delimiter:
                        cut = key.find(delimiter, len(prefix))
                        if cut >= 0:
                            common = key[: cut + 1]
                            prefixes.append(common)
                            last = b"p" + common.encode()
                            after = skip_prefix = common
                            restart = base + schema.seek_key(common.encode() + b"\xff")
                            break
                    objects.append(self._info(key, storage_type, record))
                    last = b"k" + key.encode()
                    after = key
                if restart is None:
                    break
                start = restart
        token = ""
        if more and last is not None:
            token = base64.urlsafe_b64encode(last).decode()
        return ListPage(objects, prefixes, token)

    @staticmethod
    def _entries_in_key_order(
        r: IndexReader, base: bytes, start: bytes, stop: bytes
    ) -> Iterator[tuple[str, rec.ObjectRecord]]:
        """(key, record) in key order. Long keys sharing their truncated index key sit together
        in hash order, so each such group is sorted before it is yielded."""
        group: list[tuple[str, rec.ObjectRecord]] = []
        group_head = b""
        for raw_key, raw_value in r.scan(schema.OBJECTS, start, stop):
            encoded = raw_key[len(base) :]
            record = rec.ObjectRecord.FromString(raw_value)
            if schema.is_long_key(encoded):
                head = encoded[: schema.LONG_KEY_BYTES]
                if group and head != group_head:
                    yield from sorted(group, key=lambda entry: entry[0])
                    group = []
                group_head = head
                group.append((record.key, record))
                continue
            if group:
                yield from sorted(group, key=lambda entry: entry[0])
                group = []
            yield record.key or encoded.decode(), record
        yield from sorted(group, key=lambda entry: entry[0])

    @staticmethod
    def _decode_page_token(token: str, prefix: str) -> tuple[str | None, str | None]:
        """(list after this key, or None; skip keys with this common prefix, or None)."""
        try:
            raw = base64.urlsafe_b64decode(token.encode())
            kind, position = raw[:1], raw[1:].decode()
        except (ValueError, UnicodeDecodeError):
            raise errors.InvalidArgument("page_token is not one this server issued") from None
        if kind not in (b"k", b"p") or not position.startswith(prefix):
            raise errors.InvalidArgument("page_token does not belong to this listing")
        return (position, None) if kind == b"k" else (position, position)

    # ------------------------------------------------------------------ expiry

    async def reap_expired(self, limit: int = 1000) -> int:
        """Deletes tmp objects whose time has come; returns how many."""
        due = await self.run_read(_due_to_expire, self.index, self.clock(), limit)
        if not due:
            return 0

        def op(txn: IndexWriter) -> tuple[int, list[bytes]]:
            reaped, released = 0, []
            for expiry in due:
                expire_ns, okey = schema.split_expiry_key(expiry)
                txn.delete(schema.EXPIRY, expiry)
                raw = txn.get(schema.OBJECTS, okey)
                if raw is None:
                    continue
                record = rec.ObjectRecord.FromString(raw)
                if record.expire_time_ns != expire_ns or expire_ns > self.clock():
                    continue
                namespace, _ = schema.split_object_key(okey)
                released += self._remove_record(txn, namespace, okey, record)
                reaped += 1
            return reaped, released

        reaped: int = await self._commit(op)
        return reaped

    # ------------------------------------------------------------------ usage

    def usage(self, namespace: str) -> rec.UsageRecord:
        with self.index.reader() as r:
            return quotas.read_usage(r, namespace)

    def quota_status(self, namespace: str) -> quotas.QuotaStatus:
        """A namespace's limits and usage, from one snapshot."""
        with self.index.reader() as r:
            return quotas.read_status(r, namespace, self.config.quotas)

    def store_stats(self) -> StoreStats:
        """Totals over every namespace, and what the chunk store holds (one pass over the chunk table)."""
        stats = StoreStats()
        with self.index.reader() as r:
            for _, raw in r.scan(schema.USAGE, b""):
                usage = rec.UsageRecord.FromString(raw)
                stats.objects += usage.objects
                stats.logical_bytes += usage.bytes
                stats.open_uploads += usage.open_uploads
            for _, raw in r.scan(schema.CHUNKS, b""):
                chunk = rec.ChunkRecord.FromString(raw)
                stats.chunks += 1
                stats.chunk_bytes += chunk.size
                stats.referenced_chunk_bytes += chunk.size * chunk.refcount
        return stats


class UploadWriter:
    """Receives one object's bytes in order, chunks and stores them, then commits.

    Chunks are hashed and written on worker threads while the caller receives
    the next message. Each chunk is one job: its digest, its write, then its turn
    at the whole-object SHA-256, which the jobs take strictly in object order
    (each waits for its predecessor's _HashTurn).
    Nothing is visible until finish() commits; abort() (or a failure) frees
    whatever was stored.
    """

    def __init__(self, engine: Engine, caller: Caller, spec: UploadSpec) -> None:
        self.engine = engine
        self.caller = caller
        self.spec = spec
        self.size = 0
        self._crc = 0
        self._sha = hashlib.sha256()
        self._buffer = bytearray()
        self._refs: list[rec.ChunkRef] = []
        # Chunk jobs in flight, in object order; each ends after its turn at the whole-object hash.
        self._pending: list[asyncio.Future[rec.ChunkRef]] = []
        self._last_turn: _HashTurn | None = None
        self._pinned: list[bytes] = []
        # Guards _pinned against chunk jobs still running on worker threads after an abort.
        self._pin_guard = threading.Lock()
        self._pins_released = False
        self._commit_future: Future[Any] | None = None
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    async def write(self, offset: int, data: bytes, *, known_crc32c: int | None = None) -> None:
        """Takes the next `data` at `offset`. `known_crc32c`, when given, is data's CRC32C as the
        caller has already checked it: it stands in for computing it again."""
        if self._done:
            raise errors.InvalidArgument("data after finish_write: the upload is already finished")
        if offset != self.size:
            raise errors.InvalidArgument(f"write_offset {offset} does not match the {self.size} bytes received so far")
        if not data:
            return
        declared = self.spec.declared_size
        if declared is not None and self.size + len(data) > declared:
            raise errors.OutOfRange(
                f"upload exceeds its declared size of {declared} bytes (received {self.size + len(data)})"
            )
        if known_crc32c is None:
            known_crc32c = crc32c(data)
        # Combined from the message's CRC32C: one pass over the bytes, which the caller has made.
        self._crc = crc32c_combine(self._crc, known_crc32c, len(data))
        self.size += len(data)
        chunk_size = self.engine.config.chunk_size
        view = memoryview(data)
        if self._buffer:
            take = min(len(view), chunk_size - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == chunk_size:
                chunk, self._buffer = bytes(self._buffer), bytearray()
                await self._store(chunk)
        while len(view) >= chunk_size:
            # Whole chunks go straight from the message: no copy (and no second CRC32C pass, the
            # message's being checked already) when data is exactly one chunk.
            if len(view) == len(data) == chunk_size:
                piece, piece_crc = data, known_crc32c
            else:
                piece, piece_crc = bytes(view[:chunk_size]), None
            view = view[chunk_size:]
            await self._store(piece, piece_crc)
        if view:
            self._buffer += view
        await self._after_write()

    async def _after_write(self) -> None:
        """Hook run after every write; resumable sessions checkpoint their progress here."""

    async def _store(self, chunk: bytes, crc: int | None = None) -> None:
        """Stores one chunk in the background; `crc` is its CRC32C when already known."""
        await self.engine.run_read(self.engine._check_room, self.caller.namespace, self.spec, self.size)
        previous, turn = self._last_turn, _HashTurn()
        self._last_turn = turn
        # One executor round trip per chunk: the job also takes the chunk's turn at the whole-object hash.
        job = self.engine.executor.submit(self._store_and_hash, chunk, crc, previous, turn)
        # A job cancelled before it started (its waiter was cancelled, say an abort interrupted)
        # never runs: its turn must still end, or the next job would hold its thread forever.
        job.add_done_callback(lambda done: turn.end(False) if done.cancelled() else None)
        self._pending.append(asyncio.wrap_future(job))
        if len(self._pending) >= self.engine.config.upload_pipeline_depth:
            await self._drain(keep=self.engine.config.upload_pipeline_depth - 1)

    def _store_and_hash(
        self, chunk: bytes, crc: int | None, previous: _HashTurn | None, turn: _HashTurn
    ) -> rec.ChunkRef:
        """A chunk's job on a worker thread: store it, then feed it to the whole-object hash once
        every chunk before it has been. A job that fails fails every job after it (their bytes
        can no longer be hashed in order); it never leaves them waiting."""
        hashed = False
        try:
            ref = self._store_chunk(chunk, crc)
            # The executor starts jobs in the order they were submitted, so the predecessor is
            # running or done: this waits for it, never for a job that waits on this one.
            if previous is not None and not previous.wait():
                raise errors.Aborted("an earlier chunk of this upload failed")
            self._hash_chunk(chunk, ref.crc32c)
            hashed = True
            return ref
        finally:
            turn.end(hashed)

    def _hash_chunk(self, chunk: bytes, crc: int) -> None:
        """Runs on a worker thread, once per stored chunk (`crc` its CRC32C), strictly in object order."""
        self._sha.update(chunk)

    async def _store_everything(self) -> None:
        """Stores the partial chunk left in the buffer, then waits until every chunk is stored and hashed."""
        if self._buffer:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            await self._store(chunk)
        await self._drain()

    async def _drain(self, keep: int = 0) -> None:
        # A job ends after its hash turn, so waiting for it keeps memory bounded: no chunk outlives the window.
        while len(self._pending) > keep:
            # Shielded and popped only once done: a cancelled stream (a client that went away) must not
            # cancel chunk jobs in flight, so that abort() still sees how each of them ended.
            ref = await asyncio.shield(self._pending[0])
            self._pending.pop(0)
            self._refs.append(ref)

    def _store_chunk(self, chunk: bytes, crc: int | None = None) -> rec.ChunkRef:
        digest = hashlib.sha256(chunk).digest()
        ref = rec.ChunkRef(sha256=digest, size=len(chunk), crc32c=crc32c(chunk) if crc is None else crc)
        engine = self.engine
        with self._pin_guard:
            if self._pins_released:
                raise errors.Aborted("the upload was abandoned")
            engine._pin([digest])
            self._pinned.append(digest)
        with engine.index.reader() as r:
            durable = r.get(schema.CHUNKS, digest) is not None
        if not durable:
            engine.chunks.put(digest, chunk)
        return ref

    async def finish(self, *, crc32c_expected: int | None = None, sha256_expected: bytes | None = None) -> ObjectInfo:
        if self._done:
            raise errors.InvalidArgument("the upload is already finished")
        self._done = True
        engine, spec = self.engine, self.spec
        try:
            if spec.declared_size is not None and self.size != spec.declared_size:
                raise errors.OutOfRange(f"upload declared {spec.declared_size} bytes but sent {self.size}")
            draft = rec.ObjectRecord(
                size=self.size, content_type=spec.content_type, metadata=spec.metadata, crc32c=self._crc
            )
            if not self._refs and not self._pending and len(self._buffer) <= engine.config.inline_threshold:
                draft.inline_data = bytes(self._buffer)
                self._sha.update(self._buffer)
            else:
                await self._store_everything()
                draft.chunks.extend(self._refs)
            draft.sha256 = self._sha.digest()
            if crc32c_expected is not None and crc32c_expected != draft.crc32c:
                raise errors.ChecksumMismatch(
                    f"object CRC32C is {draft.crc32c:#010x}, the client said {crc32c_expected:#010x}; "
                    "nothing was committed"
                )
            if sha256_expected and sha256_expected != draft.sha256:
                raise errors.ChecksumMismatch("object SHA-256 differs from the client's; nothing was committed")
            if draft.chunks:
                await engine._run(engine.chunks.sync)
            commit = engine._submit_releasing(self._commit_transaction(draft))
            # The pins hold until the commit settles, whatever happens to this coroutine:
            # releasing them earlier could let garbage collection take chunks the commit references.
            self._commit_future = commit
            commit.add_done_callback(lambda _: self._release_pins_soon())
            record, _ = await asyncio.wrap_future(commit)
        except BaseException:
            await self.abort()
            raise
        return engine._info(spec.key, spec.storage_type, record)

    def _commit_transaction(
        self, draft: rec.ObjectRecord
    ) -> Callable[[IndexWriter], tuple[rec.ObjectRecord, list[bytes]]]:
        """The commit transaction; resumable sessions close their session in the same one."""
        spec = self.spec
        return self.engine._commit_op(
            self.caller.namespace, spec.storage_type, spec.key, draft, spec.if_generation_match
        )

    async def abort(self) -> None:
        """Frees what this upload stored; harmless after finish or a previous abort."""
        self._done = True
        pending, self._pending = self._pending, []
        for job in pending:
            try:
                await job
            except BaseException:  # the upload is being thrown away: its errors no longer matter
                pass
        if self._commit_future is None or self._commit_future.done():
            self._release_pins()

    def _release_pins_soon(self) -> None:
        """Called on the index writer thread: hand the garbage check to a worker."""
        if not self.engine._in_background("releasing an upload's pins", self._release_pins):
            self._release_pins()  # the executor is shutting down

    def _release_pins(self) -> None:
        # Held through the collection, so that whoever calls second returns only once
        # the chunks of a failed upload are really gone.
        with self._pin_guard:
            self._pins_released = True
            pinned, self._pinned = self._pinned, []
            if pinned:
                self.engine._unpin_and_collect(pinned)


class _HashTurn:
    """The end of one chunk job's turn at its upload's whole-object hash, and whether it fed it."""

    __slots__ = ("_ended", "_hashed")

    def __init__(self) -> None:
        self._ended = threading.Event()
        self._hashed = False

    def end(self, hashed: bool) -> None:
        self._hashed = hashed
        self._ended.set()

    def wait(self) -> bool:
        """Waits for the turn to end; True when the chunk was hashed."""
        self._ended.wait()
        return self._hashed


class Download:
    """One ranged read of one object generation, its chunks pinned until close()."""

    def __init__(self, engine: Engine, info: ObjectInfo, record: rec.ObjectRecord, byte_range: ByteRange) -> None:
        self.engine = engine
        self.info = info
        self.range = byte_range
        self._record = record
        self._closed = False

    def restrict(self, start: int, end: int) -> None:
        """Narrows the range to [start, end) of the object, once its size is known."""
        if not 0 <= start <= end <= self.info.size:
            raise errors.OutOfRange(f"range {start}-{end} is outside the object's {self.info.size} bytes")
        self.range = ByteRange(start, end, self.info.size)

    def _spans(self) -> list[tuple[rec.ChunkRef, int, int]]:
        """(chunk, start, end within the chunk) for every chunk the range touches."""
        start, end = self.range.start, self.range.end
        wanted: list[tuple[rec.ChunkRef, int, int]] = []
        position = 0
        for ref in self._record.chunks:
            lo, hi = position, position + ref.size
            position = hi
            if hi <= start:
                continue
            if lo >= end:
                break
            wanted.append((ref, max(start, lo) - lo, min(end, hi) - lo))
        return wanted

    @property
    def has_local_files(self) -> bool:
        """True when the range is in chunk files on this machine, so chunk_files() can be used."""
        chunks = self._record.chunks
        return bool(chunks) and self.engine.chunks.local_path(chunks[0].sha256) is not None

    async def chunk_files(self) -> AsyncGenerator[tuple[BinaryIO, int, int], None]:
        """Yields (open chunk file, offset, count) in order, for zero-copy sends.

        Each file has passed its CRC32C check before it is yielded, and is
        closed when the consumer asks for the next one.
        """
        loop = asyncio.get_running_loop()
        engine = self.engine
        wanted = self._spans()
        readahead = max(1, engine.config.download_readahead)
        inflight: list[asyncio.Future[BinaryIO]] = []
        next_index = 0
        try:
            for _ref, lo, hi in wanted:
                while next_index < len(wanted) and len(inflight) < readahead:
                    ref = wanted[next_index][0]
                    inflight.append(loop.run_in_executor(engine.executor, engine._open_verified_chunk, ref))
                    next_index += 1
                with await inflight.pop(0) as file:
                    yield file, lo, hi - lo
        finally:
            # Not cancelled: a read already running would leave its file open. They are short.
            for future in inflight:
                future.add_done_callback(_close_result)

    async def pieces(self, max_bytes: int | None = None) -> AsyncGenerator[tuple[bytes, int], None]:
        """Yields (data, crc32c of data) in order: at most one chunk each, and at most `max_bytes`."""
        start, end = self.range.start, self.range.end
        record = self._record
        if not record.chunks:
            for piece in _cut(record.inline_data, start, end, record.crc32c, max_bytes):
                yield piece
            return
        wanted = self._spans()
        loop = asyncio.get_running_loop()
        engine = self.engine
        readahead = max(1, engine.config.download_readahead)
        inflight: list[asyncio.Future[list[tuple[bytes, int]]]] = []
        next_index = 0
        try:
            for _ in wanted:
                while next_index < len(wanted) and len(inflight) < readahead:
                    ref, lo, hi = wanted[next_index]
                    read = loop.run_in_executor(engine.executor, engine._read_chunk_pieces, ref, lo, hi, max_bytes)
                    inflight.append(read)
                    next_index += 1
                for piece in await inflight.pop(0):
                    yield piece
        finally:
            for future in inflight:
                future.cancel()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._record.chunks:
                self.engine._unpin_after_read([bytes(ref.sha256) for ref in self._record.chunks])


def _due_to_expire(index: Index, now: int, limit: int) -> list[bytes]:
    """Up to `limit` keys of the expiry index whose time has come, oldest first."""
    due: list[bytes] = []
    with index.reader() as r:
        for raw_key, _ in r.scan(schema.EXPIRY, b"", schema.pack_u64(now + 1)):
            due.append(bytes(raw_key))
            if len(due) >= limit:
                break
    return due


def _cut(data: bytes, lo: int, hi: int, crc_of_data: int, max_bytes: int | None) -> Iterator[tuple[bytes, int]]:
    """data[lo:hi] in pieces of at most `max_bytes`, each with its CRC32C (`crc_of_data` when it is all of data)."""
    if hi <= lo:
        return
    if lo == 0 and hi == len(data) and (max_bytes is None or hi <= max_bytes):
        yield data, crc_of_data
        return
    step = hi - lo if max_bytes is None else max_bytes
    view = memoryview(data)
    for start in range(lo, hi, step):
        piece = bytes(view[start : min(hi, start + step)])
        yield piece, crc32c(piece)


def _chunk_missing(ref: rec.ChunkRef) -> errors.DataLoss:
    return errors.DataLoss(f"chunk {ref.sha256.hex()} is missing from the chunk store")


def _chunk_corrupt(ref: rec.ChunkRef) -> errors.DataLoss:
    return errors.DataLoss(f"chunk {ref.sha256.hex()} is corrupt (checksum mismatch); refusing to serve it")


def _log_background_failure(what: str, done: Future[Any]) -> None:
    if not done.cancelled() and (failure := done.exception()) is not None:
        # Nothing is lost, at worst some space: a local store's next start-up sweep removes
        # unreferenced chunks, a shared store's orphan sweep once they are a lease TTL old.
        log.warning("%s failed; unreferenced chunks may stay until later: %s", what, failure, exc_info=failure)


def _close_result(future: asyncio.Future[BinaryIO]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def new_upload_id() -> str:
    return secrets.token_urlsafe(24)


def open_engine(data_dir: str, config: EngineConfig | None = None, **kwargs: Any) -> Engine:
    """An engine on the backends chosen by `backends=` (server/backends.py); by default the
    embedded pair: LMDB index and file chunk store under one data folder."""
    from blobstore.server.backends import open_backend_engine

    return open_backend_engine(data_dir, config, **kwargs)
