"""Orphans of a shared store: chunk objects in S3 with no chunk record, no lease and no tombstone."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from blobstore.client import cli
from blobstore.server.backends import BackendConfig
from blobstore.server.engine import NS_PER_DAY, Engine, EngineConfig, open_engine
from tests.conftest import TEST_CHUNK_SIZE, FakeClock, start_server, stop_server

pytestmark = pytest.mark.shared_store

NS_PER_HOUR = 3600 * 10**9


@pytest.fixture
def open_replica(tmp_path: Path, backends: BackendConfig) -> Iterator[Callable[[Callable[[], int]], Engine]]:
    """Engines on the test's store, each with its own lease identity: replicas without a server."""
    opened: list[Engine] = []

    def open_one(clock: Callable[[], int]) -> Engine:
        engine = open_engine(
            str(tmp_path / f"replica{len(opened)}"),
            EngineConfig(chunk_size=TEST_CHUNK_SIZE),
            backends=backends,
            clock=clock,
        )
        opened.append(engine)
        return engine

    yield open_one
    for engine in opened:
        engine.close()


def _a_day_later() -> FakeClock:
    """A clock to which every object in the store is older than a lease TTL (a day by default)."""
    return FakeClock(time.time_ns() + NS_PER_DAY + NS_PER_HOUR)


def _stray_chunk(engine: Engine, content: bytes) -> bytes:
    """A chunk PUT straight into the store: no chunk record, no lease, no tombstone."""
    digest = hashlib.sha256(content).digest()
    engine.chunks.put(digest, content)
    return digest


def test_an_orphan_chunk_is_collected_once_older_than_a_lease_ttl(
    open_replica: Callable[[Callable[[], int]], Engine],
) -> None:
    now, later = open_replica(time.time_ns), open_replica(_a_day_later())
    digest = _stray_chunk(now, b"left behind by a replica that crashed")
    # Just PUT: an upload in flight could have written it, so it stays for now...
    assert now.sweep_orphans() == {"listed": 1, "old": 0, "orphans": 0, "deleted": 0}
    assert now.chunks.exists(digest)
    # ...and goes once it is older than any lease its writer could still hold.
    assert later.sweep_orphans() == {"listed": 1, "old": 1, "orphans": 1, "deleted": 1}
    assert not later.chunks.exists(digest)


def test_a_chunk_under_another_replicas_live_lease_is_not_collected(
    open_replica: Callable[[Callable[[], int]], Engine],
) -> None:
    clock = _a_day_later()
    holder, sweeper = open_replica(clock), open_replica(clock)
    digest = hashlib.sha256(b"being uploaded").digest()
    holder._pin([digest])  # as an upload does before it PUTs the chunk and, later, commits it
    holder.chunks.put(digest, b"being uploaded")
    assert sweeper.sweep_orphans() == {"listed": 1, "old": 1, "orphans": 1, "deleted": 0}
    assert sweeper.chunks.exists(digest)
    # Only the lease kept it: once the holder drops it (and dies before collecting), it goes.
    assert holder._leases is not None
    holder._leases.unpin([digest])
    assert sweeper.sweep_orphans() == {"listed": 1, "old": 1, "orphans": 1, "deleted": 1}
    assert not sweeper.chunks.exists(digest)


def test_a_referenced_chunk_is_not_collected(
    tmp_path: Path, open_replica: Callable[[Callable[[], int]], Engine]
) -> None:
    value = hashlib.sha256(b"kept").digest() * 8192  # 256 KiB: one chunk, not inline
    writer = start_server(tmp_path / "writer")
    try:
        with writer.client() as client:
            client.set("kept", value)
            assert open_replica(_a_day_later()).sweep_orphans() == {"listed": 1, "old": 1, "orphans": 0, "deleted": 0}
            assert client.get("kept") == value
    finally:
        stop_server(writer)


def test_one_replica_of_the_store_sweeps_orphans_by_itself_once_per_interval(
    tmp_path: Path, open_replica: Callable[[Callable[[], int]], Engine]
) -> None:
    value = hashlib.sha256(b"kept").digest() * 8192
    writer = start_server(tmp_path / "writer")
    try:
        with writer.client() as client:
            client.set("kept", value)
        orphan = _stray_chunk(writer.engine, b"left behind by a collection that failed")
        later = _a_day_later()
        sweeper = start_server(
            tmp_path / "sweeper",
            engine=open_replica(later),
            reap_interval_s=0.05,
        )
        try:
            deadline = time.monotonic() + 30
            while sweeper.engine.chunks.exists(orphan) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not sweeper.engine.chunks.exists(orphan)
            with sweeper.client() as client:
                assert client.get("kept") == value
        finally:
            stop_server(sweeper)
    finally:
        stop_server(writer)
    # The sweep claimed the interval for the whole store: no replica lists it again until it ends.
    assert open_replica(later).sweep_orphans_if_due() == {}
    later.advance(NS_PER_DAY / 10**9)
    assert open_replica(later).sweep_orphans_if_due()["listed"] == 1


def test_the_cli_sweeps_orphans_now_and_keeps_what_a_replica_holds(
    backends: BackendConfig, open_replica: Callable[[Callable[[], int]], Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    for setting, value in {
        "INDEX": "postgres",
        "POSTGRES_DSN": backends.postgres.dsn,
        "POSTGRES_SCHEMA": backends.postgres.schema,
        "CHUNK_STORE": "s3",
        "S3_ENDPOINT": backends.s3.endpoint,
        "S3_BUCKET": backends.s3.bucket,
        "S3_PREFIX": backends.s3.prefix,
        "S3_REGION": backends.s3.region,
        "S3_ACCESS_KEY": backends.s3.access_key,
        "S3_SECRET_KEY": backends.s3.secret_key,
    }.items():
        monkeypatch.setenv(f"BLOBSTORE_{setting}", value)
    holder = open_replica(time.time_ns)
    orphan = _stray_chunk(holder, b"left behind")
    held = hashlib.sha256(b"held").digest()
    holder._pin([held])
    holder.chunks.put(held, b"held")
    # A chunk this fresh may be an upload's in flight: only an explicit age takes it.
    swept = CliRunner().invoke(cli.main, ["sweep-orphans", "--older-than", "0s"])
    assert swept.exit_code == 0, swept.output
    assert "listed 2 chunks, 2 old enough, 2 without a record, deleted 1" in swept.output
    assert not holder.chunks.exists(orphan)
    assert holder.chunks.exists(held)
