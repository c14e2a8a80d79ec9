"""Integrity checks of a store: re-hash every chunk, and cross-check the index against the chunk files.

`scrub` reads every chunk the index references, recomputes its SHA-256 (its
name) and CRC32C (kept in the index), and reports corrupt or missing chunks
with the objects and upload sessions that use them. It also verifies what the
engine's transactions keep in step: each chunk's reference count equals the
number of objects and open sessions referring to it, and each namespace's
usage record matches its objects and sessions.

It only reads. It can run beside a live server (LMDB readers do not block the
writer); chunk files written by uploads still in flight then show up as
unreferenced, which is reported but is not a problem: the engine removes
unreferenced chunks itself (at start-up, and when an upload gives up).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from blobstore.internal import records_pb2 as rec
from blobstore.server import schema
from blobstore.server.chunkstore import ChunkStore, FileChunkStore
from blobstore.server.engine import crc32c
from blobstore.server.index import Index, LmdbIndex


@dataclass
class ScrubReport:
    chunks_checked: int = 0
    bytes_checked: int = 0
    objects: int = 0
    open_sessions: int = 0
    # Chunk digests (hex) whose bytes no longer match their name or CRC32C.
    corrupt: list[str] = field(default_factory=list)
    # Chunk digests (hex) the index references but the chunk store lacks.
    missing: list[str] = field(default_factory=list)
    # Digest (hex) of a corrupt or missing chunk -> what uses it ("<namespace>/<storage type>/<key>", "upload <id>").
    affected: dict[str, list[str]] = field(default_factory=dict)
    # Index bookkeeping that disagrees with what the records say.
    inconsistencies: list[str] = field(default_factory=list)
    # Chunk files nothing references (harmless; the start-up sweep removes them).
    unreferenced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.inconsistencies)

    def affected_keys(self) -> list[str]:
        return sorted({user for users in self.affected.values() for user in users})


def scrub(index: Index, chunks: ChunkStore, *, rehash: bool = True) -> ScrubReport:
    report = ScrubReport()
    users: dict[bytes, list[str]] = defaultdict(list)
    refs: Counter[bytes] = Counter()
    ref_shape: dict[bytes, tuple[int, int]] = {}
    usage: dict[str, rec.UsageRecord] = defaultdict(rec.UsageRecord)

    def note_refs(owner: str, chunk_refs: list[rec.ChunkRef]) -> None:
        for ref in chunk_refs:
            digest = bytes(ref.sha256)
            refs[digest] += 1
            users[digest].append(owner)
            shape = (ref.size, ref.crc32c)
            if ref_shape.setdefault(digest, shape) != shape:
                report.inconsistencies.append(f"chunk {digest.hex()} is referenced with different sizes or CRC32Cs")

    with index.reader() as r:
        for okey, raw in r.scan(schema.OBJECTS, b""):
            namespace, storage_type = schema.split_object_key(bytes(okey))
            record = rec.ObjectRecord.FromString(raw)
            key = record.key or bytes(okey).split(b"\0", 2)[2].decode()
            report.objects += 1
            usage[namespace].bytes += record.size
            usage[namespace].objects += 1
            if sum(ref.size for ref in record.chunks) + len(record.inline_data) != record.size:
                report.inconsistencies.append(f"object {namespace}/{storage_type.label}/{key}: chunk sizes != size")
            note_refs(f"{namespace}/{storage_type.label}/{key}", list(record.chunks))
        for raw_id, raw in r.scan(schema.UPLOADS, b""):
            session = rec.UploadSessionRecord.FromString(raw)
            if session.committed_generation:
                continue
            report.open_sessions += 1
            usage[session.namespace].open_uploads += 1
            if sum(ref.size for ref in session.chunks) != session.persisted_size:
                report.inconsistencies.append(f"upload {bytes(raw_id).decode()}: chunk sizes != persisted size")
            note_refs(f"upload {bytes(raw_id).decode()}", list(session.chunks))
        recorded: dict[bytes, rec.ChunkRecord] = {
            bytes(digest): rec.ChunkRecord.FromString(raw) for digest, raw in r.scan(schema.CHUNKS, b"")
        }
        for raw_namespace, raw in r.scan(schema.USAGE, b""):
            namespace = bytes(raw_namespace).decode()
            stored = rec.UsageRecord.FromString(raw)
            expected = usage.pop(namespace, rec.UsageRecord())
            if stored != expected:
                report.inconsistencies.append(
                    f"usage of {namespace!r}: recorded {_usage_text(stored)}, the records add up to "
                    f"{_usage_text(expected)}"
                )
        for namespace, expected in usage.items():
            if expected != rec.UsageRecord():
                report.inconsistencies.append(f"usage of {namespace!r} is missing ({_usage_text(expected)})")

    for digest, count in refs.items():
        chunk = recorded.get(digest)
        if chunk is None:
            report.inconsistencies.append(f"chunk {digest.hex()} is referenced {count} times but has no chunk record")
        elif chunk.refcount != count:
            report.inconsistencies.append(f"chunk {digest.hex()} has refcount {chunk.refcount}, referenced {count}")
        elif (chunk.size, chunk.crc32c) != ref_shape[digest]:
            report.inconsistencies.append(f"chunk {digest.hex()}: its record and its references disagree")
    for digest in recorded.keys() - refs.keys():
        report.inconsistencies.append(f"chunk {digest.hex()} has a chunk record but nothing references it")

    on_disk = set(chunks.iter_digests())
    for digest in sorted(recorded):
        if digest not in on_disk:
            report.missing.append(digest.hex())
            continue
        if not rehash:
            continue
        try:
            data = chunks.read(digest)
        except FileNotFoundError:
            report.missing.append(digest.hex())
            continue
        report.chunks_checked += 1
        report.bytes_checked += len(data)
        chunk = recorded[digest]
        if hashlib.sha256(data).digest() != digest or crc32c(data) != chunk.crc32c or len(data) != chunk.size:
            report.corrupt.append(digest.hex())
    report.unreferenced = sorted(digest.hex() for digest in on_disk - recorded.keys())
    for digest_hex in report.corrupt + report.missing:
        report.affected[digest_hex] = sorted(set(users.get(bytes.fromhex(digest_hex), [])))
    return report


def _usage_text(usage: rec.UsageRecord) -> str:
    return f"{usage.bytes} bytes, {usage.objects} objects, {usage.open_uploads} open uploads"


def scrub_data_dir(data_dir: str, *, rehash: bool = True) -> ScrubReport:
    """Scrubs the embedded store under `data_dir` (index opened read-only; a server may be running)."""
    index_dir = os.path.join(data_dir, "index")
    if not os.path.exists(os.path.join(index_dir, "data.mdb")):
        raise FileNotFoundError(f"no blobstore index under {data_dir!r}")
    index = LmdbIndex(index_dir, readonly=True)
    try:
        return scrub(index, FileChunkStore(os.path.join(data_dir, "store")), rehash=rehash)
    finally:
        index.close()
