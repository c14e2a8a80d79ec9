"""The metadata index: a small transactional key-value interface and its LMDB backend.

The engine keeps all of its logic in functions of a transaction (`IndexWriter`),
so a backend only has to provide snapshot reads and serializable write
transactions over named tables of bytes. A distributed backend (PostgreSQL)
implements the same three protocols; nothing LMDB-specific leaks out of here.
"""

from __future__ import annotations

import bisect
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import lmdb

from blobstore.server import errors, schema

T = TypeVar("T")


class IndexReader(Protocol):
    def get(self, table: str, key: bytes) -> bytes | None: ...

    def scan(self, table: str, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Yields (key, value) for start <= key < stop in key order."""
        ...


class IndexWriter(IndexReader, Protocol):
    def put(self, table: str, key: bytes, value: bytes) -> None: ...

    def delete(self, table: str, key: bytes) -> bool: ...


class Index(Protocol):
    group_stats: GroupStats  # how the writes' group commits went, for metrics

    def reader(self) -> Any:
        """A context manager yielding an IndexReader over one consistent snapshot."""
        ...

    def submit(self, op: Callable[[IndexWriter], T]) -> Future[T]:
        """Runs `op` in a write transaction; the future resolves once it is durable.

        `op` must touch nothing but the transaction: a backend may run it again
        after a conflict. If `op` raises, none of its writes take effect.
        """
        ...

    def submit_many(self, ops: list[Callable[[IndexWriter], Any]]) -> list[Future[Any]]:
        """Like submit for each op, committed together in one transaction when the
        backend can; each op still succeeds or fails on its own."""
        ...

    def submit_batch(self, ops: list[Callable[[IndexWriter], Any]]) -> Future[list[Any]]:
        """Runs every op in one transaction, each on its own: the future's list holds,
        in order, each op's result or the exception that undid that op alone."""
        ...

    def close(self) -> None: ...


class _LmdbTxn:
    __slots__ = ("_dbs", "_txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    def get(self, table: str, key: bytes) -> bytes | None:
        value = self._txn.get(key, db=self._dbs[table])
        return value  # type: ignore[return-value]  # buffers=False: always bytes

    def scan(self, table: str, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        cursor = self._txn.cursor(db=self._dbs[table])
        if not cursor.set_range(start):
            return
        for key, value in cursor.iternext():
            if stop is not None and key >= stop:  # type: ignore[operator]
                return
            yield key, value  # type: ignore[misc]

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[table])

    def delete(self, table: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._dbs[table]))


class _LmdbSnapshot(_LmdbTxn):
    """A read transaction as a context manager. A class rather than a @contextmanager generator:
    every request reads the index this way (its caller's token and limits, then its record),
    and the generator's machinery cost more than the LMDB transaction itself."""

    __slots__ = ("_env",)

    def __init__(self, env: lmdb.Environment, dbs: dict[str, Any]) -> None:
        self._env = env
        self._dbs = dbs

    def __enter__(self) -> _LmdbSnapshot:
        self._txn = self._env.begin()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._txn.abort()


_Job = tuple[Callable[[IndexWriter], Any], "Future[Any]"]


class _Regroup(Exception):
    """A job of a group failed: the group is undone and run again, each job on its own."""

    def __init__(self, failure: BaseException) -> None:
        super().__init__(failure)
        self.failure = failure


# Queued to a writer thread: it stops once the jobs queued before have run.
STOP = object()


class GroupStats:
    """How a writer thread's group commits went, as plain numbers (updated once per group, by
    that thread only; read at scrape time)."""

    # Upper bounds of the group-size histogram's buckets (jobs per commit); the last is +Inf.
    BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    __slots__ = ("counts", "gathers", "jobs", "regroups")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # groups by size: bucket i holds sizes <= BOUNDS[i]
        self.jobs = 0
        self.gathers = 0  # groups that waited for company before committing
        self.regroups = 0  # groups run again job by job because one of their jobs failed

    def record(self, size: int) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, size)] += 1
        self.jobs += size

    @property
    def groups(self) -> int:
        return sum(self.counts)


def run_groups(
    jobs: queue.SimpleQueue[Any],
    max_group: int,
    run_group: Callable[[list[Any]], None],
    *,
    stats: GroupStats | None = None,
    gather_s: float = 0.0,
    queued_at_commit: Callable[[], int] = lambda: 0,
) -> None:
    """A writer thread's loop: takes whatever lists of jobs have queued up (up to about
    `max_group` jobs) and hands them to `run_group` together, until STOP.

    `queued_at_commit()` tells, after `run_group`, how many submissions were queued by the
    time its commit was durable, before any of its results were handed back. If some were,
    writes are arriving faster than they commit, and the next group waits up to `gather_s`
    for more before it commits, so that more of them share one commit and its fsyncs: until
    it holds as many jobs as the last group and those queued (the callers of the last group
    are likely to write again), or the time is up. A write that nothing overlaps never waits:
    one client's next write can only come after the result of its last.
    """
    stats = stats if stats is not None else GroupStats()
    expected = 0  # jobs the next group waits for, if writes overlapped
    while True:
        item = jobs.get()
        if item is STOP:
            return
        group = list(item)
        stop_after = False
        deadline: float | None = None
        while len(group) < max_group:
            try:
                more = jobs.get_nowait()
            except queue.Empty:
                if len(group) >= expected:
                    break
                if deadline is None:
                    stats.gathers += 1
                    deadline = time.monotonic() + gather_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    more = jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if more is STOP:
                stop_after = True
                break
            group.extend(more)
        stats.record(len(group))  # first: once a caller hears back, its group is counted
        run_group(group)
        if stop_after:
            return
        queued = queued_at_commit()
        expected = len(group) + queued if queued and gather_s > 0 else 0


class LmdbIndex:
    """LMDB with every write funnelled through one writer thread.

    LMDB allows one write transaction at a time and binds it to a thread. The
    writer thread drains whatever jobs are queued and runs them in one
    transaction (group commit: one fsync for many requests), waiting briefly for
    more while writes overlap (run_groups). A failing job leaves the others
    intact: the group is then run again with each job in a nested transaction
    (nested ones cost, so only then).
    """

    DEFAULT_MAP_SIZE = 1 << 40  # address space only: the file grows as data arrives
    MAX_GROUP = 256
    # How long a group waits for company while writes overlap (see run_groups): about what a
    # commit with its two fsyncs takes on a local disk, so that waiting at most doubles it.
    GATHER_S = 0.001

    def __init__(
        self,
        path: str,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
        readonly: bool = False,
        gather_s: float = GATHER_S,
    ) -> None:
        """`readonly` opens an index another process may be serving, for checks (no writer thread)."""
        if not readonly:
            os.makedirs(path, exist_ok=True)
        self.path = path
        self._env = lmdb.open(
            path,
            map_size=map_size,
            max_dbs=len(schema.ALL_TABLES) + 4,
            max_readers=1024,
            readahead=False,
            sync=sync,
            metasync=sync,
            readonly=readonly,
            create=not readonly,
        )
        self._dbs = {name: self._env.open_db(name.encode(), create=not readonly) for name in schema.ALL_TABLES}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._readonly = readonly
        self._closed = False
        self._gather_s = gather_s
        self._queued_at_commit = 0  # submissions queued when the last commit became durable
        self.group_stats = GroupStats()
        self._writer = threading.Thread(target=self._run_writer, name="blobstore-index-writer", daemon=True)
        if not readonly:
            self._writer.start()

    def reader(self) -> _LmdbSnapshot:
        return _LmdbSnapshot(self._env, self._dbs)

    def _check_writable(self) -> None:
        if self._closed or self._readonly:
            raise errors.Unavailable("the index is closed" if self._closed else "the index was opened read-only")

    def submit(self, op: Callable[[IndexWriter], T]) -> Future[T]:
        self._check_writable()
        future: Future[T] = Future()
        self._queue.put(((op, future),))
        return future

    def submit_many(self, ops: list[Callable[[IndexWriter], Any]]) -> list[Future[Any]]:
        self._check_writable()
        jobs: list[_Job] = [(op, Future()) for op in ops]
        self._queue.put(jobs)
        return [future for _, future in jobs]

    def submit_batch(self, ops: list[Callable[[IndexWriter], Any]]) -> Future[list[Any]]:
        # One job and one future for the whole batch: a future per op costs more
        # than the op itself (a lock, and a wake-up of the event loop each).
        def run_each(txn: IndexWriter) -> list[Any]:
            assert isinstance(txn, _LmdbTxn)
            outcomes: list[Any] = []
            for op in ops:
                child = self._env.begin(write=True, parent=txn._txn)
                try:
                    outcomes.append(op(_LmdbTxn(child, self._dbs)))
                except BaseException as failure:  # that op's own outcome
                    child.abort()
                    outcomes.append(_translate(failure))
                else:
                    child.commit()
            return outcomes

        return self.submit(run_each)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._readonly:
            self._queue.put(STOP)
            self._writer.join()
        self._env.close()

    def stat(self) -> dict[str, int]:
        info = self._env.info()
        return {"map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * self._env.stat()["psize"]}

    def _run_writer(self) -> None:
        run_groups(
            self._queue,
            self.MAX_GROUP,
            self._run_group,
            stats=self.group_stats,
            gather_s=self._gather_s,
            queued_at_commit=lambda: self._queued_at_commit,
        )

    def _run_group(self, jobs: list[_Job]) -> None:
        jobs = [(op, future) for op, future in jobs if future.set_running_or_notify_cancel()]
        if not jobs:
            return
        outcomes: list[tuple[Any, BaseException | None]]
        try:
            try:
                outcomes = self._run_together(jobs)
            except _Regroup as regroup:  # a job failed and the transaction was undone
                if len(jobs) == 1:  # alone, it simply failed: nothing to run again
                    outcomes = [(None, _translate(regroup.failure))]
                else:
                    self.group_stats.regroups += 1
                    outcomes = self._run_nested(jobs)
        except BaseException as commit_failure:  # the commit itself failed: nothing took effect
            outcomes = [(None, _translate(commit_failure))] * len(jobs)
        self._queued_at_commit = self._queue.qsize()  # before any caller hears back
        for (_, future), (result, failure) in zip(jobs, outcomes, strict=True):
            if failure is None:
                future.set_result(result)
            else:
                future.set_exception(failure)

    def _run_together(self, jobs: list[_Job]) -> list[tuple[Any, BaseException | None]]:
        """Runs the jobs one after the other in one transaction, or undoes them all and raises
        _Regroup if one fails. Cheaper than a nested transaction per job: py-lmdb releases the
        interpreter lock to begin and to commit each one, and under load the writer then waits
        for the event loop to give it back, twice per job. Jobs rarely fail."""
        outcomes: list[tuple[Any, BaseException | None]] = []
        with self._env.begin(write=True) as txn:
            writer = _LmdbTxn(txn, self._dbs)
            for op, _ in jobs:
                try:
                    outcomes.append((op(writer), None))
                except BaseException as failure:  # undone with the others
                    raise _Regroup(failure) from failure
        return outcomes

    def _run_nested(self, jobs: list[_Job]) -> list[tuple[Any, BaseException | None]]:
        """Runs each job in a nested transaction, so that one failing leaves the others intact."""
        outcomes: list[tuple[Any, BaseException | None]] = []
        with self._env.begin(write=True) as txn:
            for op, _ in jobs:
                child = self._env.begin(write=True, parent=txn)
                try:
                    result = op(_LmdbTxn(child, self._dbs))
                except BaseException as failure:  # reported to the job's caller
                    child.abort()
                    outcomes.append((None, _translate(failure)))
                else:
                    child.commit()
                    outcomes.append((result, None))
        return outcomes


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, lmdb.MapFullError):
        return errors.ResourceExhausted("the metadata index is full (raise its map size)")
    if isinstance(exc, lmdb.Error):
        code: int | None = getattr(exc, "errno", None) or _errno_from_message(str(exc))
        if code in (errno.ENOSPC, errno.EDQUOT):
            return errors.DiskFull("no space left on the device holding the metadata index")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.DiskFull("no space left on the device holding the metadata index")
    return exc


def _errno_from_message(message: str) -> int | None:
    if "No space left" in message:
        return errno.ENOSPC
    if "quota exceeded" in message.lower():
        return errno.EDQUOT
    return None
