"""The shared backends on the real engines: S3ChunkStore on Ceph's RADOS Gateway, PostgresIndex on PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from blobstore.server import errors
from blobstore.server.backends import BackendConfig
from blobstore.server.index import IndexWriter
from blobstore.server.pgindex import GENERATION_BLOCK, PostgresIndex
from blobstore.server.s3store import S3ChunkStore
from tests.conftest import RunningServer

pytestmark = pytest.mark.shared_store


@pytest.fixture
def chunks(backends: BackendConfig) -> Iterator[S3ChunkStore]:
    store = S3ChunkStore(backends.s3)
    yield store
    store.close()


@pytest.fixture
def index(backends: BackendConfig) -> Iterator[PostgresIndex]:
    index = PostgresIndex(backends.postgres)
    yield index
    index.close()


def test_the_server_fixture_runs_on_the_shared_pair(server: RunningServer) -> None:
    assert type(server.engine.index).__name__ == "PostgresIndex"
    assert type(server.engine.chunks).__name__ == "S3ChunkStore"


def test_chunks_put_by_hash_read_ranges_and_delete(chunks: S3ChunkStore) -> None:
    data = bytes(range(256)) * 4096
    digest = hashlib.sha256(data).digest()
    assert not chunks.exists(digest)
    chunks.put(digest, data)
    chunks.put(digest, memoryview(data))  # idempotent
    assert chunks.exists(digest)
    assert chunks.read(digest) == data
    assert chunks.read(digest, 1000, 10) == data[1000:1010]
    assert chunks.read(digest, len(data) - 5) == data[-5:]
    assert chunks.local_path(digest) is None
    assert list(chunks.iter_digests()) == [digest]
    chunks.delete(digest)
    chunks.delete(digest)  # idempotent
    assert not chunks.exists(digest)
    with pytest.raises(FileNotFoundError):
        chunks.read(digest)


def test_index_scans_in_bytewise_key_order_within_the_range(index: PostgresIndex) -> None:
    keys = [b"", b"\x00", b"a", b"a\x00", b"a\xff", b"b", b"\xff", b"\xff\xff"] + [b"m%04d" % i for i in range(1200)]

    def fill(txn: IndexWriter) -> None:
        for key in keys:
            txn.put("objects", key, b"v" + key)
        txn.put("chunks", b"a", b"other table")

    index.submit(fill).result()
    with index.reader() as r:
        assert [k for k, _ in r.scan("objects", b"")] == sorted(keys)
        assert [k for k, _ in r.scan("objects", b"a", b"b")] == [b"a", b"a\x00", b"a\xff"]
        assert r.get("objects", b"a\xff") == b"va\xff"
        assert r.get("chunks", b"a") == b"other table"
        assert r.get("objects", b"missing") is None


def test_a_failing_op_leaves_nothing_and_others_commit(index: PostgresIndex) -> None:
    def failing(txn: IndexWriter) -> None:
        txn.put("meta", b"x", b"1")
        raise errors.InvalidArgument("no")

    def passing(txn: IndexWriter) -> bool:
        txn.put("meta", b"y", b"2")
        return txn.delete("meta", b"absent")

    bad, good = index.submit_many([failing, passing])
    with pytest.raises(errors.InvalidArgument):
        bad.result()
    assert good.result() is False
    with index.reader() as r:
        assert r.get("meta", b"x") is None
        assert r.get("meta", b"y") == b"2"


def test_ops_committed_together_see_each_other_and_fail_alone(index: PostgresIndex) -> None:
    # submit_many queues its ops at once, so one writer runs them in one transaction (group commit).
    def put_one(txn: IndexWriter) -> str:
        txn.put("meta", b"g/1", b"1")
        return "a"

    def put_then_fail(txn: IndexWriter) -> None:
        txn.put("meta", b"g/2", b"2")  # still in this op's own buffer
        raise errors.InvalidArgument("b")

    def read_both(txn: IndexWriter) -> tuple[bytes | None, bytes | None]:
        return txn.get("meta", b"g/1"), txn.get("meta", b"g/2")

    def delete_then_fail(txn: IndexWriter) -> None:
        assert txn.delete("meta", b"g/1")  # reaches the server: inside a savepoint
        raise errors.InvalidArgument("d")

    def put_and_scan(txn: IndexWriter) -> list[bytes]:
        txn.put("meta", b"g/3", b"3")
        return [key for key, _ in txn.scan("meta", b"g/", b"g0")]

    def delete_and_read(txn: IndexWriter) -> bytes | None:
        txn.delete("meta", b"g/3")
        txn.put("meta", b"g/4", b"4")
        return txn.get("meta", b"g/3")

    futures = index.submit_many([put_one, put_then_fail, read_both, delete_then_fail, put_and_scan, delete_and_read])
    assert futures[0].result() == "a"
    with pytest.raises(errors.InvalidArgument, match="b"):
        futures[1].result()
    assert futures[2].result() == (b"1", None)
    with pytest.raises(errors.InvalidArgument, match="d"):
        futures[3].result()
    assert futures[4].result() == [b"g/1", b"g/3"]
    assert futures[5].result() is None
    with index.reader() as r:
        assert [(key, value) for key, value in r.scan("meta", b"g/", b"g0")] == [(b"g/1", b"1"), (b"g/4", b"4")]


def test_an_op_whose_statement_fails_on_the_server_fails_alone(index: PostgresIndex) -> None:
    def bad_statement(txn: IndexWriter) -> None:
        txn.get("no-such\x00table", b"k")  # PostgreSQL refuses a NUL in text

    def fine(txn: IndexWriter) -> str:
        txn.put("meta", b"fine", b"1")
        return "fine"

    bad, good = index.submit_many([bad_statement, fine])
    with pytest.raises(psycopg.Error):
        bad.result()
    assert good.result() == "fine"
    with index.reader() as r:
        assert r.get("meta", b"fine") == b"1"


def test_a_reader_sees_one_snapshot(index: PostgresIndex) -> None:
    index.submit(lambda txn: txn.put("meta", b"k", b"old")).result()
    with index.reader() as r:
        assert r.get("meta", b"k") == b"old"
        index.submit(lambda txn: txn.put("meta", b"k", b"new")).result()
        assert r.get("meta", b"k") == b"old"
    with index.reader() as r:
        assert r.get("meta", b"k") == b"new"


def test_concurrent_read_modify_writes_lose_no_update(index: PostgresIndex) -> None:
    def increment(txn: IndexWriter) -> None:
        raw = txn.get("usage", b"n")
        txn.put("usage", b"n", str(int(raw or b"0") + 1).encode())

    other = PostgresIndex(index.config)  # a second replica's connection pool
    try:
        futures: list[Future[None]] = []
        threads = [
            threading.Thread(
                target=lambda i=i: futures.extend((index if i % 2 else other).submit(increment) for _ in range(25))
            )
            for i in range(4)
        ]
        _run_all(threads)
        for future in futures:
            future.result()
    finally:
        other.close()
    with index.reader() as r:
        assert r.get("usage", b"n") == b"100"


def test_generations_come_from_a_sequence_and_only_grow(index: PostgresIndex) -> None:
    seen = [index.submit(lambda txn: txn.next_generation()).result() for _ in range(5)]  # type: ignore[attr-defined]
    assert seen == sorted(seen) and len(set(seen)) == 5


def _nextval_calls(index: PostgresIndex) -> int:
    with psycopg.connect(index.config.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (last_value - 1) / %s + 1 FROM pg_sequences WHERE schemaname = %s AND sequencename = 'generation'",
            (GENERATION_BLOCK, index.config.schema),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _stamp(keys: list[bytes]) -> Callable[[IndexWriter], list[int]]:
    """Gives each key a new generation, which must be above the one it has."""

    def op(txn: IndexWriter) -> list[int]:
        given = []
        for key in keys:
            raw = txn.get("meta", key)
            generation: int = txn.next_generation()  # type: ignore[attr-defined]
            assert raw is None or generation > int(raw), f"{key!r}: generation {generation} after {raw!r}"
            txn.put("meta", key, str(generation).encode())
            given.append(generation)
        return given

    return op


def test_a_batch_takes_its_generations_in_one_round_trip(index: PostgresIndex) -> None:
    index.submit(lambda txn: txn.next_generation()).result()  # type: ignore[attr-defined]
    before = _nextval_calls(index)
    one_op = index.submit(_stamp([b"g%d" % i for i in range(50)])).result()
    assert _nextval_calls(index) == before + 1
    one_op_each = index.submit_batch([_stamp([b"h%d" % i]) for i in range(50)]).result()
    assert _nextval_calls(index) == before + 2
    given = one_op + [generation for (generation,) in one_op_each]
    assert given == sorted(given) and len(set(given)) == 100


def test_generations_stay_unique_and_grow_under_concurrent_batches_on_two_replicas(index: PostgresIndex) -> None:
    keys = [b"shared%d" % i for i in range(8)]
    other = PostgresIndex(index.config)  # a second replica's connection pool
    committed: list[tuple[list[bytes], list[int]]] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        replica = index if number % 2 else other
        for round_number in range(8):
            order = keys[number % len(keys) :] + keys[: number % len(keys)]
            chosen = order[: 3 + (number + round_number) % 5]
            given = replica.submit(_stamp(chosen)).result()
            with lock:
                committed.append((chosen, given))

    try:
        _run_all([threading.Thread(target=client, args=(number,)) for number in range(6)])
    finally:
        other.close()
    assert len(committed) == 48
    everything = [generation for _, given in committed for generation in given]
    assert len(set(everything)) == len(everything)
    assert all(given == sorted(given) for _, given in committed)
    latest: dict[bytes, int] = {}
    for chosen, given in committed:
        for key, generation in zip(chosen, given, strict=True):
            latest[key] = max(latest.get(key, 0), generation)
    with index.reader() as r:
        # The version that stands is the one committed last: it must hold the largest generation.
        assert {key: int(r.get("meta", key) or b"0") for key in keys} == latest


def test_a_batch_commits_together_and_a_failing_op_alone(index: PostgresIndex) -> None:
    def failing(txn: IndexWriter) -> None:
        txn.put("meta", b"bad", b"1")
        raise errors.InvalidArgument("no")

    def writer(key: bytes) -> Callable[[IndexWriter], bytes]:
        def op(txn: IndexWriter) -> bytes:
            txn.put("meta", key, b"v")
            return key

        return op

    outcomes = index.submit_batch([writer(b"a"), failing, writer(b"b")]).result()
    assert outcomes[0] == b"a" and outcomes[2] == b"b"
    assert isinstance(outcomes[1], errors.InvalidArgument)
    with index.reader() as r:
        assert r.get("meta", b"bad") is None
        assert (r.get("meta", b"a"), r.get("meta", b"b")) == (b"v", b"v")


def test_a_stalled_index_does_not_stall_the_server(server: RunningServer, backends: BackendConfig) -> None:
    # Index reads on PostgreSQL wait on the network; they run off the event loop, so while one
    # request waits on the database the server still answers everyone else.
    with server.client() as storage:
        storage.set("waiting", b"value")
    with psycopg.connect(backends.postgres.dsn) as blocker:
        kv = sql.Identifier(backends.postgres.schema, "kv")
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(kv))  # until rollback
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: server.client().get("waiting"))
            with grpc.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(3):
                    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=20)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert not waiting.done(), "the Get should still be waiting on the locked index"
            blocker.rollback()
            assert waiting.result(timeout=60) == b"value"


def _run_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
