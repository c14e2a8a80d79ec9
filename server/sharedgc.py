"""Chunk pins and garbage collection that stay safe when several replicas share one store.

On one machine, pins in memory keep the collector from deleting a chunk that
an upload is about to reference or a download is about to read. Replicas do not
share memory, so here a pin is also a *lease* row in the shared index, and a
deletion is announced by a *tombstone* row before the chunk object goes:

  pin (first pin of a digest on this replica), one transaction:
      a live tombstone for the digest?  -> wait: another replica is deleting it
      put lease (digest, replica) = expiry time
  collect (chunk no longer referenced), transaction D1:
      a chunk record (refcount > 0)?     -> keep it
      a live lease from any replica?     -> keep it (expired leases are removed)
      a live tombstone?                  -> keep it: someone else is deleting it
      put tombstone (digest) = now
  then DELETE the object, then transaction D2 removes the tombstone.
  unpin (last pin of a digest on this replica): delete the lease, then collect.

Because the index runs these as serializable transactions, a lease and a
tombstone never coexist unnoticed: either the collector saw the lease and kept
the chunk, or the pin waited until the object was gone (and the uploader then
stores it again, finding no chunk record). An upload that found a chunk record
after its lease committed may skip storing the chunk: no deletion can start
while its lease stands.

Leases rather than a time-based grace period: a grace period must outlast the
slowest upload or download on any replica and still races with a PUT that
lands just before a DELETE, while a lease holds exactly as long as the pin. A
replica that dies leaves leases behind; they expire after `lease_ttl_ns`, and
the periodic sweep collects their chunks. A tombstone older than
`tombstone_stale_ns` belongs to a collector that died between D1 and D2 and is
taken over; that bound is far above the S3 client's own time-outs.

A chunk object with no chunk record, no lease and no tombstone (an orphan: a
replica died between unpinning and collecting, a collection failed, a PUT that
the client gave up on landed late) is in no table, so neither collection nor
the lease sweep ever finds it. The orphan sweep lists the store instead and
hands what has no chunk record to collect(), whose D1 transaction still refuses
a chunk any replica holds a lease on: an uploader commits its lease before it
looks for the chunk record and before it PUTs, so a listed chunk that an upload
is about to store or reuse is kept, and a pin that comes after D1 waits for the
deletion and then stores the chunk again. On top of that the sweep only takes
objects last modified more than a lease TTL ago: a chunk an upload PUT to S3
(which dates every PUT) stays younger than that for as long as the upload's
lease can stand, so the sweep does not even contend with uploads in flight, and
does not rely on the leases alone should a PUT ever reach the store outside one
(a request the client gave up on, a replica of another version). Downloads and
uploads that reuse an old chunk are protected by their leases, as from any
collector.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from blobstore.server import errors, schema
from blobstore.server.chunkstore import ChunkStore
from blobstore.server.index import Index, IndexWriter

log = logging.getLogger(__name__)

NS_PER_S = 10**9
# Listed chunks checked against the index at a time: one S3 LIST page, one range scan of records.
ORPHAN_PAGE = 1000


class _ChunkBeingDeleted(Exception):
    pass


def _next_prefix(prefix: bytes) -> bytes:
    return (int.from_bytes(prefix, "big") + 1).to_bytes(len(prefix), "big")


class ChunkLeases:
    """Pins as leases in the shared index, and the tombstone protocol for deleting chunks."""

    def __init__(
        self,
        index: Index,
        chunks: ChunkStore,
        clock: Callable[[], int],
        *,
        lease_ttl_ns: int = 86_400 * NS_PER_S,
        tombstone_stale_ns: int = 600 * NS_PER_S,
        max_wait_s: float = 30.0,
    ) -> None:
        self.index = index
        self.chunks = chunks
        self.clock = clock
        self.lease_ttl_ns = lease_ttl_ns
        self.tombstone_stale_ns = tombstone_stale_ns
        self.max_wait_s = max_wait_s
        self.replica = secrets.token_hex(8).encode()
        self._pins: Counter[bytes] = Counter()
        # Held across the lease transactions, so that a second pin of a digest on this
        # replica never runs ahead of the lease the first one is still writing.
        self._lock = threading.Lock()

    def _commit(self, op: Callable[[IndexWriter], object]) -> object:
        return self.index.submit(op).result()

    def _lease_key(self, digest: bytes) -> bytes:
        return digest + self.replica

    def _tombstone_live(self, raw: bytes | None, now: int) -> bool:
        return raw is not None and schema.unpack_u64(raw) > now - self.tombstone_stale_ns

    # ------------------------------------------------------------------ pins

    def pin(self, digests: Iterable[bytes]) -> None:
        wanted = [bytes(d) for d in digests]
        deadline = time.monotonic() + self.max_wait_s
        delay = 0.01
        while True:
            with self._lock:
                new = sorted({d for d in wanted if self._pins[d] == 0})
                try:
                    if new:
                        self._commit(self._lease_op(new))
                except _ChunkBeingDeleted:
                    pass
                else:
                    self._pins.update(wanted)
                    return
            if time.monotonic() > deadline:
                raise errors.Unavailable("a chunk of this transfer is being deleted by another replica; retry")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _lease_op(self, digests: list[bytes]) -> Callable[[IndexWriter], None]:
        def op(txn: IndexWriter) -> None:
            now = self.clock()
            for digest in digests:
                tombstone = txn.get(schema.CHUNK_TOMBSTONES, digest)
                if self._tombstone_live(tombstone, now):
                    raise _ChunkBeingDeleted(digest.hex())
                txn.put(schema.CHUNK_LEASES, self._lease_key(digest), schema.pack_u64(now + self.lease_ttl_ns))

        return op

    def unpin(self, digests: Iterable[bytes]) -> list[bytes]:
        """Drops pins; returns the digests this replica no longer holds (to be collected)."""
        with self._lock:
            freed = []
            for digest in digests:
                digest = bytes(digest)
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]
                    freed.append(digest)
            if freed:
                keys = [self._lease_key(d) for d in freed]

                def op(txn: IndexWriter) -> None:
                    for key in keys:
                        txn.delete(schema.CHUNK_LEASES, key)

                try:
                    self._commit(op)
                except Exception:  # the leases expire by themselves; the transfer itself went fine
                    log.warning("could not drop chunk leases; they expire after their TTL", exc_info=True)
        return freed

    # ------------------------------------------------------------------ collection

    def collect(self, digests: Iterable[bytes]) -> int:
        """Deletes the chunk objects that no record references and no replica holds; returns how many."""
        deleted = 0
        for digest in self._unreferenced(digests):
            if not self._commit(self._doom_op(digest)):
                continue
            self.chunks.delete(digest)
            deleted += 1

            def clear(txn: IndexWriter, digest: bytes = digest) -> None:
                txn.delete(schema.CHUNK_TOMBSTONES, digest)

            self._commit(clear)
        return deleted

    def _unreferenced(self, digests: Iterable[bytes]) -> list[bytes]:
        """The digests without a chunk record, in one read-only snapshot: when an upload or a
        download unpins, nearly every chunk still has its record, and a look is cheaper than a
        serializable transaction per chunk. Skipping a referenced chunk is safe: whoever drops
        its last reference collects it then. If that collection ran while our lease still stood
        (and so kept the chunk), the reference was gone before our unpin removed the lease, so
        before this snapshot, which then finds no record and collects the chunk here."""
        with self.index.reader() as r:
            return [bytes(d) for d in digests if r.get(schema.CHUNKS, bytes(d)) is None]

    def _doom_op(self, digest: bytes) -> Callable[[IndexWriter], bool]:
        def op(txn: IndexWriter) -> bool:
            now = self.clock()
            if txn.get(schema.CHUNKS, digest) is not None:
                return False
            for key, value in list(txn.scan(schema.CHUNK_LEASES, digest, _next_prefix(digest))):
                if schema.unpack_u64(value) > now:
                    return False
                txn.delete(schema.CHUNK_LEASES, key)
            if self._tombstone_live(txn.get(schema.CHUNK_TOMBSTONES, digest), now):
                return False
            txn.put(schema.CHUNK_TOMBSTONES, digest, schema.pack_u64(now))
            return True

        return op

    def sweep(self) -> dict[str, int]:
        """Collects the chunks of expired leases (replicas that died) and of stale tombstones."""
        now = self.clock()
        candidates: set[bytes] = set()
        with self.index.reader() as r:
            for key, value in r.scan(schema.CHUNK_LEASES, b""):
                if schema.unpack_u64(value) <= now:
                    candidates.add(bytes(key[:32]))
            for key, value in r.scan(schema.CHUNK_TOMBSTONES, b""):
                if not self._tombstone_live(value, now):
                    candidates.add(bytes(key))
        deleted = self.collect(sorted(candidates)) if candidates else 0
        if candidates:
            log.info("lease sweep: %d candidates, %d chunks deleted", len(candidates), deleted)
        return {"candidates": len(candidates), "deleted": deleted}

    # ------------------------------------------------------------------ orphans

    def claim_orphan_sweep(self, interval_ns: int) -> bool:
        """True for the one replica that may list the store now: none has claimed it within
        `interval_ns`. Bounds the listing to one per interval for the whole store, however many
        replicas run and however often they restart."""
        now = self.clock()
        with self.index.reader() as r:
            last = r.get(schema.META, schema.META_ORPHAN_SWEEP)
        if last is not None and schema.unpack_u64(last) > now - interval_ns:
            return False  # the usual answer, from a read: no write transaction per reap interval

        def op(txn: IndexWriter) -> bool:
            now = self.clock()
            last = txn.get(schema.META, schema.META_ORPHAN_SWEEP)
            if last is not None and schema.unpack_u64(last) > now - interval_ns:
                return False
            txn.put(schema.META, schema.META_ORPHAN_SWEEP, schema.pack_u64(now))
            return True

        return bool(self._commit(op))

    def sweep_orphans(self, min_age_ns: int, *, stop: Callable[[], bool] = lambda: False) -> dict[str, int]:
        """Collects the chunk objects last modified over `min_age_ns` ago that have no chunk record
        (collect() keeps those under a live lease). Costs, per 1000 chunks in the store, one LIST
        request and one range scan of the index's chunk records (two queries of 500 rows), and a
        transaction per orphan found; `stop` is asked between pages."""
        now = self.clock()
        listed = old = orphans = deleted = 0
        listing = self.chunks.iter_chunks()
        while page := list(itertools.islice(listing, ORPHAN_PAGE)):
            listed += len(page)
            aged = sorted(digest for digest, modified in page if modified <= now - min_age_ns)
            old += len(aged)
            if aged:
                # The records of the page's range of digests in one scan: a look-up per listed
                # chunk would cost a round trip each, millions for a big store.
                with self.index.reader() as r:
                    recorded = {bytes(key) for key, _ in r.scan(schema.CHUNKS, aged[0], aged[-1] + b"\0")}
                unrecorded = [digest for digest in aged if digest not in recorded]
                orphans += len(unrecorded)
                if unrecorded:
                    deleted += self.collect(unrecorded)
            if stop():
                break
        result = {"listed": listed, "old": old, "orphans": orphans, "deleted": deleted}
        log.info("orphan sweep: %s", result)
        return result
