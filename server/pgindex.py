"""The metadata index on PostgreSQL, shared by every replica.

All tables of server/schema.py live in one key-value table, (tbl, k) -> v, with
bytea keys: PostgreSQL compares bytea bytewise, so a key range scan in key order
is the same as LMDB's. Each submitted op runs in its own SERIALIZABLE
transaction and runs again from the start after a serialization failure (ops are
pure functions of their transaction, which the Index protocol promises), so a
precondition checked inside an op holds across replicas.

Write ops submitted together are committed together (group commit), as on LMDB:
one writer thread runs whatever has queued up in one SERIALIZABLE transaction.
Every write of a namespace updates its usage row, so writes committed in
transactions of their own conflicted with each other and ran again and again;
within a group they follow one another, and only other replicas' groups can
conflict with them. An op's writes stay in a buffer of its own until it has
succeeded, so one that fails is undone by dropping its buffer; an op that has to
reach the server first (a delete, a scan) does so inside a savepoint.

The SQL is plain (no stored procedures, no server-side cursors, no advisory
locks), so PostgreSQL-compatible distributed databases (CockroachDB, YugabyteDB)
can run it too.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool

from blobstore.server import errors
from blobstore.server.backends import PostgresConfig
from blobstore.server.index import STOP, GroupStats, IndexReader, IndexWriter, run_groups

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
_SCAN_BATCH = 500
_PUT_BATCH = 1000  # rows per INSERT: far below PostgreSQL's 65535 parameters
# Each nextval() reserves this many generations for the transaction that called it, so a
# batch of up to this many entries costs one round trip for its generations, not one each.
# Values a transaction leaves unused are gaps, as generations already have across keys.
# Only ever raise it: a replica still running with a larger block would collide with a smaller one.
GENERATION_BLOCK = 1024
# Serialization failures and deadlocks: the transaction did nothing and may run again.
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)


class _GenerationBlock:
    """The generations one nextval() reserved for a transaction, handed out in order.

    Every value of the block is above what any transaction got before the call and below
    what any gets after it, so a key's next version, committed by a transaction that saw the
    previous one, still gets a larger generation.
    """

    __slots__ = ("_conn", "_left", "_q")

    def __init__(self, conn: psycopg.Connection[Any], queries: _Queries) -> None:
        self._conn = conn
        self._q = queries
        self._left = range(0)

    def take(self) -> int:
        if not self._left:
            row = self._conn.execute(self._q.next_generation).fetchone()
            assert row is not None
            self._left = range(int(row[0]), int(row[0]) + GENERATION_BLOCK)
        generation, self._left = self._left[0], self._left[1:]
        return generation


class _Txn:
    """One transaction's view; writes are buffered and sent together at the end (one round trip)."""

    __slots__ = ("_conn", "_generations", "_pending", "_q")

    def __init__(
        self, conn: psycopg.Connection[Any], queries: _Queries, generations: _GenerationBlock | None = None
    ) -> None:
        self._conn = conn
        self._q = queries
        self._pending: dict[tuple[str, bytes], bytes] = {}
        self._generations = generations or _GenerationBlock(conn, queries)

    def get(self, table: str, key: bytes) -> bytes | None:
        pending = self._pending.get((table, key))
        if pending is not None:
            return pending
        row = self._conn.execute(self._q.get, (table, key)).fetchone()
        return bytes(row[0]) if row else None

    def scan(self, table: str, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        self.flush()
        position, inclusive = start, True
        while True:
            query = self._q.scan_from if inclusive else self._q.scan_after
            params: tuple[Any, ...] = (table, position)
            if stop is not None:
                query = self._q.scan_from_to if inclusive else self._q.scan_after_to
                params = (table, position, stop)
            rows = self._conn.execute(query, (*params, _SCAN_BATCH)).fetchall()
            for key, value in rows:
                yield bytes(key), bytes(value)
            if len(rows) < _SCAN_BATCH:
                return
            position, inclusive = bytes(rows[-1][0]), False

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._pending[(table, bytes(key))] = bytes(value)

    def delete(self, table: str, key: bytes) -> bool:
        self._pending.pop((table, key), None)
        self.flush()
        return self._conn.execute(self._q.delete, (table, key)).rowcount > 0

    def next_generation(self) -> int:
        """The store-wide generation from a sequence: no hot row that every commit must update."""
        return self._generations.take()

    def flush(self) -> None:
        _write_rows(self._conn, self._q, self._pending)


def _write_rows(conn: psycopg.Connection[Any], queries: _Queries, pending: dict[tuple[str, bytes], bytes]) -> None:
    """Sends buffered writes in as few INSERTs as possible, and empties the buffer."""
    if pending:
        rows = list(pending.items())
        pending.clear()
        for start in range(0, len(rows), _PUT_BATCH):
            batch = rows[start : start + _PUT_BATCH]
            params = [item for (table, key), value in batch for item in (table, key, value)]
            conn.execute(queries.put_many(len(batch)), params)


_SAVEPOINT = "blobstore_op"


class _GroupOpTxn(_Txn):
    """One op's view inside a group transaction: its own buffered writes over those of
    the group's ops before it (already decided), over the server."""

    __slots__ = ("_group", "savepoint")

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        queries: _Queries,
        group: dict[tuple[str, bytes], bytes],
        generations: _GenerationBlock,
    ):
        # One block of generations for the group: nextval() is not undone by a rollback, so what
        # an op that failed took stays taken, and the next op goes on from there.
        super().__init__(conn, queries, generations)
        self._group = group
        self.savepoint = False

    def get(self, table: str, key: bytes) -> bytes | None:
        pending = self._pending.get((table, key))
        if pending is None:
            pending = self._group.get((table, key))
        if pending is not None:
            return pending
        row = self._conn.execute(self._q.get, (table, key)).fetchone()
        return bytes(row[0]) if row else None

    # scan() flushes first: with flush() below, the group's writes and this op's are on the server.

    def delete(self, table: str, key: bytes) -> bool:
        self._pending.pop((table, key), None)
        self.flush()
        self._enter_savepoint()
        return self._conn.execute(self._q.delete, (table, key)).rowcount > 0

    def flush(self) -> None:
        # The group's writes go first and outside this op's savepoint: they stand whatever this op does.
        _write_rows(self._conn, self._q, self._group)
        if self._pending:
            self._enter_savepoint()
            _write_rows(self._conn, self._q, self._pending)

    def _enter_savepoint(self) -> None:
        if not self.savepoint:
            self._conn.execute("SAVEPOINT " + _SAVEPOINT)
            self.savepoint = True

    def succeeded(self) -> None:
        if self.savepoint:
            self._conn.execute("RELEASE SAVEPOINT " + _SAVEPOINT)
        self._group.update(self._pending)

    def failed(self) -> None:
        if self.savepoint:
            self._conn.execute("ROLLBACK TO SAVEPOINT " + _SAVEPOINT)
            self._conn.execute("RELEASE SAVEPOINT " + _SAVEPOINT)
        self._pending.clear()


@dataclass(eq=False)
class _Job:
    """Ops whose outcomes settle one future: one op (submit), or a list (submit_batch)."""

    ops: list[Callable[[IndexWriter], Any]]
    future: Future[Any]
    batch: bool


class _OpBroke(Exception):
    """An op's statement failed on the server outside a savepoint: the group's transaction is lost."""

    def __init__(self, job: _Job, failure: BaseException) -> None:
        self.job = job
        self.failure = failure


class _Queries:
    def put_many(self, rows: int) -> bytes:
        """One INSERT for all of a transaction's writes: one round trip at commit."""
        query = self._put_many.get(rows)
        if query is None:
            values = b", ".join([b"(%s, %s, %s)"] * rows)
            query = self._put_head + values + b" ON CONFLICT (tbl, k) DO UPDATE SET v = excluded.v"
            if rows <= 64:
                self._put_many[rows] = query
        return query

    def __init__(self, schema: str) -> None:
        kv = sql.Identifier(schema, "kv")
        sequence = sql.Identifier(schema, "generation")

        def q(text: str) -> bytes:
            return sql.SQL(text).format(kv=kv, seq=sequence).as_bytes(None)

        self.get = q("SELECT v FROM {kv} WHERE tbl = %s AND k = %s")
        self.scan_from = q("SELECT k, v FROM {kv} WHERE tbl = %s AND k >= %s ORDER BY k LIMIT %s")
        self.scan_after = q("SELECT k, v FROM {kv} WHERE tbl = %s AND k > %s ORDER BY k LIMIT %s")
        self.scan_from_to = q("SELECT k, v FROM {kv} WHERE tbl = %s AND k >= %s AND k < %s ORDER BY k LIMIT %s")
        self.scan_after_to = q("SELECT k, v FROM {kv} WHERE tbl = %s AND k > %s AND k < %s ORDER BY k LIMIT %s")
        self._put_head = q("INSERT INTO {kv} (tbl, k, v) VALUES ")
        self._put_many: dict[int, bytes] = {}
        self.delete = q("DELETE FROM {kv} WHERE tbl = %s AND k = %s")
        self.next_generation = q("SELECT nextval('{seq}')")
        self.migrations = [
            q(
                "CREATE TABLE IF NOT EXISTS {kv} "
                "(tbl TEXT NOT NULL, k BYTEA NOT NULL, v BYTEA NOT NULL, PRIMARY KEY (tbl, k))"
            ),
            q("CREATE SEQUENCE IF NOT EXISTS {seq}"),
            # Stores made before generations came in blocks: every later value is above the old ones.
            q(f"ALTER SEQUENCE {{seq}} INCREMENT BY {GENERATION_BLOCK}"),
        ]


_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresIndex:
    """The Index protocol on PostgreSQL: snapshot readers and serializable, retried write transactions."""

    shared = True  # several processes may use one store at once

    def __init__(self, config: PostgresConfig) -> None:
        if not config.dsn:
            raise ValueError("the postgres index needs a DSN (setting postgres.dsn, BLOBSTORE_POSTGRES_DSN)")
        if not _SCHEMA_NAME.match(config.schema):
            raise ValueError(f"postgres schema name {config.schema!r} must be a lower-case SQL identifier")
        self.config = config
        self._q = _Queries(config.schema)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            config.dsn,
            min_size=2,
            max_size=config.pool_size,
            kwargs={"autocommit": True},
            open=True,
            name="blobstore-index",
        )
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.group_stats = GroupStats()
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._pool.wait(timeout=30)
            self._migrate()
        except BaseException:
            self._pool.close()
            raise
        self._writer = threading.Thread(target=self._write_groups, name="blobstore-pg-writer", daemon=True)
        self._writer.start()

    def _migrate(self) -> None:
        with self._pool.connection() as conn:
            # Two replicas starting together both try; IF NOT EXISTS can still race in the catalog.
            for attempt in range(5):
                try:
                    with conn.transaction():
                        conn.execute(
                            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.config.schema))
                        )
                        for statement in self._q.migrations:
                            conn.execute(statement)
                    break
                except (pg_errors.UniqueViolation, pg_errors.DuplicateObject, pg_errors.SerializationFailure):
                    if attempt == 4:
                        raise
                    time.sleep(0.1 * (attempt + 1))

    @contextmanager
    def reader(self) -> Iterator[IndexReader]:
        with self._pool.connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield _Txn(conn, self._q)
            finally:
                conn.execute("COMMIT")

    def submit(self, op: Callable[[IndexWriter], T]) -> Future[T]:
        future: Future[T] = Future()
        self._enqueue([_Job([op], future, batch=False)])
        return future

    def submit_many(self, ops: list[Callable[[IndexWriter], Any]]) -> list[Future[Any]]:
        jobs = [_Job([op], Future(), batch=False) for op in ops]
        self._enqueue(jobs)
        return [job.future for job in jobs]

    def submit_batch(self, ops: list[Callable[[IndexWriter], Any]]) -> Future[list[Any]]:
        future: Future[list[Any]] = Future()
        self._enqueue([_Job(list(ops), future, batch=True)])
        return future

    def _enqueue(self, jobs: list[_Job]) -> None:
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the index is closed")
            self._queue.put(jobs)

    # ------------------------------------------------------------------ group commit

    MAX_GROUP = 64  # jobs per transaction

    def _write_groups(self) -> None:
        run_groups(self._queue, self.MAX_GROUP, self._commit_group, stats=self.group_stats)

    def _commit_group(self, jobs: list[_Job]) -> None:
        """Runs the jobs in one transaction, again after a conflict, and settles their futures."""
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        delay = 0.002
        attempt = 0
        while jobs:
            try:
                outcomes = self._attempt_group(jobs)
            except _OpBroke as broke:
                # That op's own failure; the others run again in a fresh transaction.
                broke.job.future.set_exception(broke.failure)
                jobs = [job for job in jobs if job is not broke.job]
                continue
            except _RETRYABLE:
                if attempt == self.config.max_retries:
                    _fail_all(jobs, errors.Aborted("the index transaction kept conflicting with others; retry"))
                    return
                attempt += 1
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.2)
                continue
            except psycopg.OperationalError as exc:
                _fail_all(jobs, errors.Unavailable(f"the metadata index (PostgreSQL) is unreachable: {exc}"))
                return
            except BaseException as exc:  # a failed commit, or a bug: nothing of the group took effect
                _fail_all(jobs, exc)
                return
            for job, results in zip(jobs, outcomes, strict=True):
                if job.batch:
                    job.future.set_result(results)
                elif isinstance(results[0], BaseException):
                    job.future.set_exception(results[0])
                else:
                    job.future.set_result(results[0])
            return

    @contextmanager
    def _serializable(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection in a SERIALIZABLE transaction: committed at the end, rolled back on an exception."""
        with self._pool.connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                raise

    def _attempt_group(self, jobs: list[_Job]) -> list[list[Any]]:
        with self._serializable() as conn:
            group: dict[tuple[str, bytes], bytes] = {}
            generations = _GenerationBlock(conn, self._q)
            outcomes = [[self._run_op(conn, group, generations, job, op) for op in job.ops] for job in jobs]
            _write_rows(conn, self._q, group)
        return outcomes

    def _run_op(
        self,
        conn: psycopg.Connection[Any],
        group: dict[tuple[str, bytes], bytes],
        generations: _GenerationBlock,
        job: _Job,
        op: Callable[..., Any],
    ) -> Any:
        """The op's result, or the exception that undid it alone."""
        txn = _GroupOpTxn(conn, self._q, group, generations)
        try:
            result = op(txn)
        except (*_RETRYABLE, psycopg.OperationalError):
            raise  # the whole group runs again, or fails
        except psycopg.Error as failure:
            if not txn.savepoint:
                raise _OpBroke(job, failure) from failure
            txn.failed()
            return failure
        except BaseException as failure:  # that op's own outcome
            txn.failed()
            return failure
        txn.succeeded()
        return result

    def run(self, op: Callable[[IndexWriter], T]) -> T:
        """Runs `op` in a transaction on the calling thread."""
        return self._run(op)

    def _run(self, op: Callable[[IndexWriter], T]) -> T:
        delay = 0.002
        for attempt in range(self.config.max_retries + 1):
            try:
                with self._serializable() as conn:
                    txn = _Txn(conn, self._q)
                    result = op(txn)
                    txn.flush()
                return result
            except _RETRYABLE:
                if attempt == self.config.max_retries:
                    raise errors.Aborted("the index transaction kept conflicting with others; retry") from None
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.2)
            except psycopg.OperationalError as exc:
                raise errors.Unavailable(f"the metadata index (PostgreSQL) is unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    def drop_schema(self) -> None:
        """Removes every table of this store (tests; irreversible)."""
        with self._pool.connection() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.config.schema)))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(STOP)
        self._writer.join()
        self._pool.close()


def _fail_all(jobs: list[_Job], failure: BaseException) -> None:
    for job in jobs:
        job.future.set_exception(failure)
