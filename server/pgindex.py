"""The metadata index on PostgreSQL, shared by every replica.

All tables of server/schema.py live in one key-value table, (tbl, k) -> v, with
bytea keys: PostgreSQL compares bytea bytewise, so a key range scan in key order
is the same as LMDB's. Each submitted op runs in its own SERIALIZABLE
transaction and runs again from the start after a serialization failure (ops are
pure functions of their transaction, which the Index protocol promises), so a
precondition checked inside an op holds across replicas.

The SQL is plain (no stored procedures, no server-side cursors, no advisory
locks), so PostgreSQL-compatible distributed databases (CockroachDB, YugabyteDB)
can run it too.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool

from blobstore.server import errors
from blobstore.server.backends import PostgresConfig
from blobstore.server.index import IndexReader, IndexWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
_SCAN_BATCH = 500
_PUT_BATCH = 1000  # rows per INSERT: far below PostgreSQL's 65535 parameters
# Serialization failures and deadlocks: the transaction did nothing and may run again.
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)


class _Txn:
    """One transaction's view; writes are buffered and sent together at the end (one round trip)."""

    __slots__ = ("_conn", "_pending", "_q")

    def __init__(self, conn: psycopg.Connection[Any], queries: _Queries) -> None:
        self._conn = conn
        self._q = queries
        self._pending: dict[tuple[str, bytes], bytes] = {}

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
        row = self._conn.execute(self._q.next_generation).fetchone()
        assert row is not None
        return int(row[0])

    def flush(self) -> None:
        if self._pending:
            rows = list(self._pending.items())
            self._pending.clear()
            for start in range(0, len(rows), _PUT_BATCH):
                batch = rows[start : start + _PUT_BATCH]
                params = [item for (table, key), value in batch for item in (table, key, value)]
                self._conn.execute(self._q.put_many(len(batch)), params)


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
        self._writers = ThreadPoolExecutor(max_workers=config.pool_size, thread_name_prefix="blobstore-pg")
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._pool.wait(timeout=30)
            self._migrate()
        except BaseException:
            self._pool.close()
            self._writers.shutdown()
            raise

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
        if self._closed:
            raise errors.Unavailable("the index is closed")
        return self._writers.submit(self._run, op)

    def submit_many(self, ops: list[Callable[[IndexWriter], Any]]) -> list[Future[Any]]:
        # Separate transactions: PostgreSQL commits them concurrently, and one op's
        # conflict does not make the others run again.
        return [self.submit(op) for op in ops]

    def submit_batch(self, ops: list[Callable[[IndexWriter], Any]]) -> Future[list[Any]]:
        # One transaction (one commit) for the batch, each op inside its own savepoint. A
        # conflict with another transaction still retries the whole batch, as for any op.
        def run_each(txn: IndexWriter) -> list[Any]:
            assert isinstance(txn, _Txn)
            txn.flush()
            conn = txn._conn
            outcomes: list[Any] = []
            for op in ops:
                conn.execute("SAVEPOINT batch_op")
                step = _Txn(conn, self._q)
                try:
                    result = op(step)
                    step.flush()
                except (*_RETRYABLE, psycopg.OperationalError):
                    raise
                except BaseException as failure:  # that op's own outcome
                    conn.execute("ROLLBACK TO SAVEPOINT batch_op")
                    outcomes.append(failure)
                else:
                    conn.execute("RELEASE SAVEPOINT batch_op")
                    outcomes.append(result)
            return outcomes

        return self.submit(run_each)

    def run(self, op: Callable[[IndexWriter], T]) -> T:
        """Runs `op` in a transaction on the calling thread."""
        return self._run(op)

    def _run(self, op: Callable[[IndexWriter], T]) -> T:
        delay = 0.002
        for attempt in range(self.config.max_retries + 1):
            try:
                with self._pool.connection() as conn:
                    conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                    try:
                        txn = _Txn(conn, self._q)
                        result = op(txn)
                        txn.flush()
                        conn.execute("COMMIT")
                    except BaseException:
                        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                            conn.execute("ROLLBACK")
                        raise
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
        self._writers.shutdown(wait=True)
        self._pool.close()
