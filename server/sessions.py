"""Resumable upload sessions: persisted in the index, resumed by id, freed on cancel or expiry.

A session record (UploadSessionRecord in the `uploads` table) holds the chunks
received so far, their total size (the persisted size) and the CRC32C of those
bytes. Its chunks are reference-counted like an object's, so the start-up sweep
keeps them. The persisted size only advances at a checkpoint: the chunk
files, bytes and names, are made durable by the store's barrier
(ChunkStore.sync: one syncfs for the file store), then one index transaction
appends them to the record and increments their reference counts. Checkpoints
run every `session_checkpoint_chunks` chunks in the background of the stream
and once more when the stream ends, so a big upload pays one sync and one
commit per checkpoint, not per chunk.

The whole-object SHA-256 cannot be serialized mid-stream: the hasher stays in
memory while the same process continues the session, and a new process (after
a restart) recomputes it from the stored chunks, verifying each chunk's CRC32C.

A committed session keeps a small record (no chunks) until it expires, so a
client whose final response was lost learns from QueryUpload that its upload
committed instead of uploading again.

Two writers on one id are refused with ABORTED. The guard is in memory: one
process owns an index (LMDB); a shared index would need a lease in the record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blobstore.client.checksums import crc32c_combine
from blobstore.internal import records_pb2 as rec
from blobstore.server import errors, schema
from blobstore.server.engine import Engine, UploadWriter, new_upload_id
from blobstore.server.index import IndexReader, IndexWriter
from blobstore.server.model import Caller, ObjectInfo, StorageType, UploadSpec

log = logging.getLogger(__name__)

# A stream silent this long makes everything it received durable, a partial chunk included:
# a client that stalls (or dies without closing) loses at most what was still on the wire.
IDLE_CHECKPOINT_S = 1.0


@dataclass(frozen=True)
class SessionStatus:
    persisted_size: int
    # Set once the session has committed.
    object: ObjectInfo | None = None


def _spec_of(record: rec.UploadSessionRecord) -> UploadSpec:
    return UploadSpec(
        key=record.key,
        storage_type=StorageType(record.storage_type),
        content_type=record.content_type,
        metadata=dict(record.metadata),
        declared_size=None if record.declared_size < 0 else record.declared_size,
        if_generation_match=None if record.if_generation_match < 0 else record.if_generation_match,
    )


class UploadSessions:
    """The sessions of one engine, and the in-memory state that goes with them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Upload ids with a live writer in this process (None while it opens): a second writer gets ABORTED.
        self.writers: dict[str, ResumableUpload | None] = {}
        # Upload id -> (persisted size, SHA-256 state of exactly those bytes), for resuming without a re-read.
        self._hashers: dict[str, tuple[int, Any]] = {}

    # ------------------------------------------------------------------ records

    def _load(self, r: IndexReader, caller: Caller, upload_id: str) -> rec.UploadSessionRecord:
        raw = r.get(schema.UPLOADS, upload_id.encode()) if upload_id else None
        record = rec.UploadSessionRecord.FromString(raw) if raw is not None else None
        if record is None or record.namespace != caller.namespace or record.expire_time_ns <= self.engine.clock():
            raise errors.UploadNotFound(f"no upload session {upload_id!r} (unknown, cancelled or expired)")
        return record

    def _load_open(self, txn: IndexReader, caller: Caller, upload_id: str) -> rec.UploadSessionRecord:
        record = self._load(txn, caller, upload_id)
        if record.committed_generation:
            raise errors.FailedPrecondition(
                f"upload session {upload_id!r} already committed generation {record.committed_generation}",
                reason="UPLOAD_ALREADY_COMMITTED",
            )
        return record

    # ------------------------------------------------------------------ API

    async def start(self, caller: Caller, spec: UploadSpec) -> tuple[str, int]:
        """Opens a session; returns its id and expiry time (ns)."""
        engine = self.engine
        engine._validate_write(caller, spec)
        if spec.declared_size is not None:
            await engine.run_read(engine._check_room, caller.namespace, spec, spec.declared_size)
        upload_id = new_upload_id()
        now = engine.clock()
        record = rec.UploadSessionRecord(
            namespace=caller.namespace,
            storage_type=spec.storage_type.value,
            key=spec.key,
            content_type=spec.content_type,
            metadata=spec.metadata,
            declared_size=-1 if spec.declared_size is None else spec.declared_size,
            if_generation_match=-1 if spec.if_generation_match is None else spec.if_generation_match,
            create_time_ns=now,
            expire_time_ns=now + engine.config.upload_session_ttl_ns,
        )

        def op(txn: IndexWriter) -> tuple[None, list[bytes]]:
            txn.put(schema.UPLOADS, upload_id.encode(), record.SerializeToString())
            engine._add_usage(txn, caller.namespace, uploads=1)
            return None, []

        await engine._commit(op)
        return upload_id, record.expire_time_ns

    def query(self, caller: Caller, upload_id: str) -> SessionStatus:
        engine = self.engine
        with engine.index.reader() as r:
            record = self._load(r, caller, upload_id)
            if not record.committed_generation:
                return SessionStatus(record.persisted_size)
            spec = _spec_of(record)
            okey = schema.object_key(record.namespace, spec.storage_type, spec.key)
            current = engine._read_record(r, okey)
        if current is not None and current.generation == record.committed_generation:
            return SessionStatus(record.persisted_size, engine._info(spec.key, spec.storage_type, current))
        # Overwritten or deleted since: what we still know about the committed generation.
        info = ObjectInfo(
            key=spec.key,
            storage_type=spec.storage_type,
            size=record.persisted_size,
            generation=record.committed_generation,
            content_type=spec.content_type,
            metadata=spec.metadata,
            create_time_ns=0,
            update_time_ns=0,
            crc32c=record.crc32c,
            sha256=b"",
        )
        return SessionStatus(record.persisted_size, info)

    async def cancel(self, caller: Caller, upload_id: str) -> None:
        engine = self.engine

        def op(txn: IndexWriter) -> tuple[list[bytes], list[bytes]]:
            record = self._load(txn, caller, upload_id)
            released = self._remove(txn, upload_id, record)
            return released, released

        released = await engine._commit(op)
        self._hashers.pop(upload_id, None)
        # Also collected after the commit in any case; here the caller waits until the files are gone.
        await engine._run(engine._collect, released)

    def _remove(self, txn: IndexWriter, upload_id: str, record: rec.UploadSessionRecord) -> list[bytes]:
        txn.delete(schema.UPLOADS, upload_id.encode())
        if record.committed_generation:
            return []
        self.engine._add_usage(txn, record.namespace, uploads=-1)
        return self.engine._decref(txn, record.chunks)

    def _expired(self, now: int) -> list[str]:
        """The sessions past their expiry that no stream is writing now."""
        due = []
        with self.engine.index.reader() as r:
            for raw_key, raw in r.scan(schema.UPLOADS, b""):
                upload_id = bytes(raw_key).decode()
                if upload_id not in self.writers and rec.UploadSessionRecord.FromString(raw).expire_time_ns <= now:
                    due.append(upload_id)
        return due

    async def reap_expired(self) -> int:
        """Discards expired sessions (and their chunks); returns how many."""
        engine = self.engine
        now = engine.clock()
        due = await engine.run_read(self._expired, now)
        if not due:
            return 0

        def op(txn: IndexWriter) -> tuple[tuple[int, list[bytes]], list[bytes]]:
            reaped, released = 0, []
            for upload_id in due:
                raw = txn.get(schema.UPLOADS, upload_id.encode())
                if raw is None or upload_id in self.writers:
                    continue
                record = rec.UploadSessionRecord.FromString(raw)
                if record.expire_time_ns > engine.clock():
                    continue
                released += self._remove(txn, upload_id, record)
                reaped += 1
            return (reaped, released), released

        reaped, released = await engine._commit(op)
        for upload_id in due:
            self._hashers.pop(upload_id, None)
        await engine._run(engine._collect, released)
        return reaped

    def _read_open(self, caller: Caller, upload_id: str) -> rec.UploadSessionRecord:
        with self.engine.index.reader() as r:
            return self._load_open(r, caller, upload_id)

    async def open(self, caller: Caller, upload_id: str) -> ResumableUpload:
        """A writer continuing the session at its persisted size."""
        if upload_id in self.writers:
            raise errors.Aborted(f"upload session {upload_id!r} is being written by another stream")
        # Claimed before the first await, so two streams opening at once cannot both get it.
        self.writers[upload_id] = None
        try:
            record = await self.engine.run_read(self._read_open, caller, upload_id)
            sha = await self._hasher_at(upload_id, record)
            writer = self.writers[upload_id] = ResumableUpload(self, caller, upload_id, record, sha)
            return writer
        except BaseException:
            self.writers.pop(upload_id, None)
            raise

    async def _hasher_at(self, upload_id: str, record: rec.UploadSessionRecord) -> Any:
        cached = self._hashers.pop(upload_id, None)
        if cached is not None and cached[0] == record.persisted_size:
            return cached[1]
        engine = self.engine

        def rehash() -> Any:
            sha = hashlib.sha256()
            for ref in record.chunks:
                sha.update(engine._read_chunk(ref))
            return sha

        return await engine._run(rehash)

    def _release(self, upload_id: str, persisted_size: int, sha: Any | None) -> None:
        self.writers.pop(upload_id, None)
        if sha is not None:
            self._hashers[upload_id] = (persisted_size, sha)


class ResumableUpload(UploadWriter):
    """An UploadWriter whose progress survives the stream: it checkpoints into its session record."""

    def __init__(
        self,
        sessions: UploadSessions,
        caller: Caller,
        upload_id: str,
        record: rec.UploadSessionRecord,
        sha: Any,
    ) -> None:
        super().__init__(sessions.engine, caller, _spec_of(record))
        self.sessions = sessions
        self.upload_id = upload_id
        self.size = record.persisted_size
        self._crc = record.crc32c
        self._sha = sha
        self._refs = list(record.chunks)
        # The durable prefix of _refs.
        self._persisted = len(self._refs)
        self.persisted_size = record.persisted_size
        # CRC32C of the object's first n stored chunks, fed in order by the hashing chain.
        self._hashed = len(self._refs)
        self._chain_crc = record.crc32c
        self._crc_at: dict[int, int] = {self._hashed: record.crc32c}
        self._checkpoint_task: asyncio.Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        # Serializes write() with the idle flush, which also touches the buffer and the pipeline.
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._quiet_now = False

    async def write(self, offset: int, data: bytes, *, known_crc32c: int | None = None) -> None:
        async with self._lock:
            await super().write(offset, data, known_crc32c=known_crc32c)
        if not self._quiet_now:
            if self._idle is not None:
                self._idle.cancel()
            self._idle = asyncio.get_running_loop().call_later(IDLE_CHECKPOINT_S, self._on_idle)

    def _quiet(self) -> None:
        """No more idle flushes: the stream is finishing or closing."""
        self._quiet_now = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if not self._quiet_now and self._checkpoint_task is None:
            self._checkpoint_task = asyncio.ensure_future(self._flush_and_checkpoint())

    async def _flush_and_checkpoint(self) -> None:
        async with self._lock:
            if self._quiet_now:
                return
            await self._store_everything()
        await self._checkpoint()

    def _hash_chunk(self, chunk: bytes, crc: int) -> None:
        super()._hash_chunk(chunk, crc)
        self._chain_crc = crc32c_combine(self._chain_crc, crc, len(chunk))
        self._crc_at[self._hashed + 1] = self._chain_crc
        self._hashed += 1

    async def _after_write(self) -> None:
        task = self._checkpoint_task
        if task is not None and task.done():
            self._checkpoint_task = None
            task.result()  # a failed checkpoint (session cancelled or expired) ends the stream
        every = max(1, self.engine.config.session_checkpoint_chunks)
        if self._checkpoint_task is None and len(self._refs) - self._persisted >= every:
            self._checkpoint_task = asyncio.ensure_future(self._checkpoint())

    async def _await_checkpoint(self) -> None:
        task = self._checkpoint_task
        if task is not None:
            await asyncio.shield(task)  # a cancelled stream must not cancel a checkpoint half-way
            self._checkpoint_task = None

    async def _checkpoint(self) -> None:
        """Makes the stored chunks that are already hashed durable parts of the session."""
        count = min(len(self._refs), self._hashed)
        if count <= self._persisted:
            return
        new = self._refs[self._persisted : count]
        crc = self._crc_at[count]
        base = self.persisted_size
        size = base + sum(ref.size for ref in new)
        engine = self.engine
        await engine._run(engine.chunks.sync)
        caller, upload_id = self.caller, self.upload_id

        def op(txn: IndexWriter) -> tuple[None, list[bytes]]:
            record = self.sessions._load_open(txn, caller, upload_id)
            if record.persisted_size != base:
                raise errors.Aborted(f"upload session {upload_id!r} was advanced by another writer")
            engine._incref(txn, new)
            record.chunks.extend(new)
            record.persisted_size = size
            record.crc32c = crc
            # An upload that makes progress does not expire: the lifetime counts from its last checkpoint.
            record.expire_time_ns = max(record.expire_time_ns, engine.clock() + engine.config.upload_session_ttl_ns)
            txn.put(schema.UPLOADS, upload_id.encode(), record.SerializeToString())
            return None, []

        await engine._commit(op)
        self._persisted, self.persisted_size = count, size
        for done in [n for n in self._crc_at if n < count]:
            del self._crc_at[done]

    async def finish(self, *, crc32c_expected: int | None = None, sha256_expected: bytes | None = None) -> ObjectInfo:
        self._quiet()
        await self._await_checkpoint()
        info = await super().finish(crc32c_expected=crc32c_expected, sha256_expected=sha256_expected)
        self.persisted_size = info.size
        self._persisted = len(self._refs)
        return info

    def _commit_transaction(
        self, draft: rec.ObjectRecord
    ) -> Callable[[IndexWriter], tuple[rec.ObjectRecord, list[bytes]]]:
        engine, caller, upload_id = self.engine, self.caller, self.upload_id
        commit_object = super()._commit_transaction(draft)

        base = self.persisted_size

        def op(txn: IndexWriter) -> tuple[rec.ObjectRecord, list[bytes]]:
            record = self.sessions._load_open(txn, caller, upload_id)
            if record.persisted_size != base:  # another replica's writer moved it meanwhile
                raise errors.Aborted(f"upload session {upload_id!r} was advanced by another writer")
            # The object takes its references first, so chunks it shares with the session never drop to zero.
            committed, released = commit_object(txn)
            released += engine._decref(txn, record.chunks)
            record.ClearField("chunks")
            record.persisted_size = committed.size
            record.crc32c = committed.crc32c
            record.committed_generation = committed.generation
            txn.put(schema.UPLOADS, upload_id.encode(), record.SerializeToString())
            engine._add_usage(txn, caller.namespace, uploads=-1)
            return committed, released

        return op

    async def abort(self) -> None:
        """Ends this stream: makes what was stored durable in the session, then lets go of it.

        The work runs in its own task, shielded: when the client goes away, gRPC cancels the
        handler (sometimes more than once), and the final checkpoint must still complete.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        # After finish was tried, the hasher may have seen bytes that are not in the session.
        hasher_usable = not self._done
        self._quiet()
        self._done = True
        checkpoint_failed = False
        try:
            await self._await_checkpoint()  # first: an idle flush may be using the pipeline
        except BaseException:
            checkpoint_failed = True
            log.info("upload session %s: a checkpoint failed", self.upload_id, exc_info=True)
        pending, self._pending = self._pending, []
        failed = False
        for job in pending:
            try:
                ref = await job
            except BaseException:  # a chunk that did not store (or hash) ends the durable prefix
                failed = True
                continue
            if not failed:
                self._refs.append(ref)
        keep_hasher = False
        if not checkpoint_failed:
            try:
                await self._checkpoint()
                keep_hasher = hasher_usable and not failed and self._hashed == self._persisted == len(self._refs)
            except BaseException:
                log.info("upload session %s: the final checkpoint failed", self.upload_id, exc_info=True)
        if self._commit_future is None or self._commit_future.done():
            self._release_pins()
        self.sessions._release(self.upload_id, self.persisted_size, self._sha if keep_hasher else None)

    async def suspend(self) -> int:
        """The stream ended without finish_write: keep the session, report its persisted size."""
        await self.abort()
        return self.persisted_size
