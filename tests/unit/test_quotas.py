"""Quotas on the engine: each limit hit and recovered from, nothing partial left, usage exact."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blobstore.internal import records_pb2 as rec
from blobstore.server import errors, quotas, schema
from blobstore.server.engine import Engine, EngineConfig, open_engine
from blobstore.server.model import Caller, StorageType, UploadSpec
from tests.conftest import TEST_CHUNK_SIZE, FakeClock

MiB = 1 << 20
ALICE = Caller("alice")
BOB = Caller("bob")
DATA = StorageType.DATA


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(clock: Callable[[], int] | None = None, **limits: Any) -> Engine:
        config = EngineConfig(chunk_size=TEST_CHUNK_SIZE, quotas=quotas.QuotaConfig(**limits))
        kwargs = {"clock": clock} if clock is not None else {}
        engine = open_engine(str(tmp_path / f"data{len(engines)}"), config, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def stored_chunks(engine: Engine) -> set[bytes]:
    return set(engine.chunks.iter_digests())


def recount(engine: Engine, namespace: str) -> tuple[int, int]:
    """(bytes, objects) of a namespace, counted from its object records."""
    total = count = 0
    with engine.index.reader() as r:
        for _, raw in r.scan(schema.OBJECTS, namespace.encode() + b"\x00", namespace.encode() + b"\x01"):
            total += rec.ObjectRecord.FromString(raw).size
            count += 1
    return total, count


async def upload(engine: Engine, caller: Caller, key: str, pieces: list[bytes], **spec: Any) -> None:
    writer = engine.new_upload(caller, UploadSpec(key, **spec))
    try:
        offset = 0
        for piece in pieces:
            await writer.write(offset, piece)
            offset += len(piece)
        await writer.finish()
    finally:
        await writer.abort()


def test_byte_quota_refuses_a_set_that_would_pass_it_and_names_the_limit(make_engine, run) -> None:
    engine = make_engine(max_bytes=1000)
    run(engine.set(ALICE, DATA, "a", b"x" * 600))
    with pytest.raises(errors.QuotaExceeded, match="max_bytes") as caught:
        run(engine.set(ALICE, DATA, "b", b"x" * 401))
    assert "1000" in str(caught.value)
    assert not engine.exists(ALICE, DATA, "b")
    assert engine.usage("alice").bytes == 600
    run(engine.set(ALICE, DATA, "b", b"x" * 400))  # exactly at the limit is allowed
    assert engine.usage("alice").bytes == 1000


def test_byte_quota_recovers_after_a_delete(make_engine, run) -> None:
    engine = make_engine(max_bytes=1000)
    run(engine.set(ALICE, DATA, "a", b"x" * 900))
    with pytest.raises(errors.QuotaExceeded):
        run(engine.set(ALICE, DATA, "b", b"y" * 500))
    run(engine.delete(ALICE, DATA, "a"))
    run(engine.set(ALICE, DATA, "b", b"y" * 500))
    assert run(engine.get(ALICE, DATA, "b"))[1] == b"y" * 500


def test_quotas_are_per_namespace(make_engine, run) -> None:
    engine = make_engine(max_objects=1)
    run(engine.set(ALICE, DATA, "a", b"1"))
    run(engine.set(BOB, DATA, "a", b"1"))  # bob has a quota of his own
    with pytest.raises(errors.QuotaExceeded):
        run(engine.set(ALICE, DATA, "b", b"1"))


def test_object_quota_hit_and_recovered(make_engine, run) -> None:
    engine = make_engine(max_objects=2)
    run(engine.set(ALICE, DATA, "a", b"1"))
    run(engine.set(ALICE, StorageType.TMP, "b", b"1"))  # every storage type counts
    with pytest.raises(errors.QuotaExceeded, match="max_objects"):
        run(engine.set(ALICE, DATA, "c", b"1"))
    run(engine.set(ALICE, DATA, "a", b"22"))  # overwriting adds no object
    run(engine.delete(ALICE, StorageType.TMP, "b"))
    run(engine.set(ALICE, DATA, "c", b"1"))
    assert engine.usage("alice").objects == 2


def test_overwrite_is_billed_by_its_net_growth(make_engine, run) -> None:
    engine = make_engine(max_bytes=1000)
    run(engine.set(ALICE, DATA, "a", b"x" * 1000))
    run(engine.set(ALICE, DATA, "a", b"y" * 1000))  # same size: fine at the limit
    run(engine.set(ALICE, DATA, "a", b"z" * 10))
    assert engine.usage("alice").bytes == 10


def test_a_namespace_over_a_lowered_limit_may_shrink_and_delete_but_not_grow(make_engine, run) -> None:
    engine = make_engine()
    run(engine.set(ALICE, DATA, "a", b"x" * 500))
    run(engine.set(ALICE, DATA, "b", b"x" * 500))
    engine.index.submit(lambda txn: quotas.set_override(txn, "alice", max_bytes=100)).result()
    with pytest.raises(errors.QuotaExceeded):
        run(engine.set(ALICE, DATA, "a", b"x" * 501))
    run(engine.set(ALICE, DATA, "a", b"x" * 500))
    run(engine.set(ALICE, DATA, "a", b"x" * 50))
    run(engine.delete(ALICE, DATA, "b"))
    assert engine.usage("alice").bytes == 50
    with pytest.raises(errors.QuotaExceeded):
        run(engine.set(ALICE, DATA, "c", b"x" * 51))


def test_an_upload_that_would_pass_the_quota_fails_mid_stream_and_frees_its_chunks(make_engine, run) -> None:
    engine = make_engine(max_bytes=3 * MiB)
    with pytest.raises(errors.QuotaExceeded, match="max_bytes"):
        run(upload(engine, ALICE, "big", [bytes([i]) * MiB for i in range(6)]))
    assert stored_chunks(engine) == set()
    assert not engine.exists(ALICE, DATA, "big")
    assert engine.usage("alice").bytes == 0


def test_a_declared_size_over_the_quota_is_refused_before_any_byte(make_engine) -> None:
    engine = make_engine(max_bytes=MiB)
    with pytest.raises(errors.QuotaExceeded, match="max_bytes"):
        engine.new_upload(ALICE, UploadSpec("big", declared_size=MiB + 1))
    engine.new_upload(ALICE, UploadSpec("fits", declared_size=MiB))


def test_the_commit_decides_when_concurrent_uploads_together_pass_the_quota(make_engine, run) -> None:
    # Each upload fits alone, so neither is stopped while streaming: the second
    # commit must fail, free its chunks and leave the first intact.
    engine = make_engine(max_bytes=3 * MiB)

    async def race() -> None:
        first = engine.new_upload(ALICE, UploadSpec("first"))
        second = engine.new_upload(ALICE, UploadSpec("second"))
        for i in range(2):
            await first.write(i * MiB, bytes([1, i]) * (MiB // 2))
            await second.write(i * MiB, bytes([2, i]) * (MiB // 2))
        await first.finish()
        with pytest.raises(errors.QuotaExceeded, match="max_bytes"):
            await second.finish()

    run(race())
    first_chunks = {bytes([1, i]) * (MiB // 2) for i in range(2)}
    assert stored_chunks(engine) == {hashlib.sha256(chunk).digest() for chunk in first_chunks}
    assert engine.usage("alice").bytes == 2 * MiB
    assert not engine.exists(ALICE, DATA, "second")


def test_dedup_is_billed_by_logical_size(make_engine, run) -> None:
    engine = make_engine(max_bytes=4 * MiB + 1000)
    value = b"".join(bytes([i]) * MiB for i in range(2))
    run(engine.set(ALICE, DATA, "inline", b"x" * 1000))
    run(upload(engine, ALICE, "copy1", [value]))
    run(upload(engine, ALICE, "copy2", [value]))
    assert len(stored_chunks(engine)) == 2  # stored once...
    assert engine.usage("alice").bytes == 4 * MiB + 1000  # ...billed twice
    with pytest.raises(errors.QuotaExceeded):
        run(upload(engine, ALICE, "copy3", [value]))


def test_concurrent_writers_never_pass_the_limits(make_engine, run) -> None:
    engine = make_engine(max_objects=10, max_bytes=5000)

    async def storm() -> list[BaseException | Any]:
        writes = [engine.set(ALICE, DATA, f"k{i}", b"x" * 100) for i in range(30)]
        writes += [engine.set(BOB, DATA, f"k{i}", b"x" * 1000) for i in range(12)]
        return await asyncio.gather(*writes, return_exceptions=True)

    results = run(storm())
    alice, bob = results[:30], results[30:]
    assert sum(not isinstance(r, BaseException) for r in alice) == 10
    assert sum(not isinstance(r, BaseException) for r in bob) == 5
    assert all(isinstance(r, errors.QuotaExceeded) for r in results if isinstance(r, BaseException))
    assert (engine.usage("alice").bytes, engine.usage("alice").objects) == (1000, 10)
    assert (engine.usage("bob").bytes, engine.usage("bob").objects) == (5000, 5)


def test_usage_stays_exact_through_a_random_mix_of_operations(make_engine, run) -> None:
    clock = FakeClock()
    engine = make_engine(clock=clock)
    engine.config.tmp_ttl_ns = 100 * 10**9
    rng = random.Random(4)
    sizes = [0, 1, 700, 70_000, MiB, MiB + 3]
    contents = {size: bytes(rng.randrange(256) for _ in range(64)) * (size // 64 + 1) for size in sizes}

    async def mix() -> None:
        for _ in range(150):
            caller = rng.choice([ALICE, BOB])
            key = f"k{rng.randrange(8)}"
            storage_type = rng.choice([DATA, StorageType.TMP, StorageType.LOGS])
            action = rng.random()
            if action < 0.6:
                size = rng.choice(sizes)
                value = contents[size][:size]  # the same content under many keys exercises dedup
                if size <= MiB:
                    await engine.set(caller, storage_type, key, value)
                else:
                    await upload(engine, caller, key, [value], storage_type=storage_type)
            elif action < 0.85:
                try:
                    await engine.delete(caller, storage_type, key)
                except errors.NotFound:
                    pass
            elif action < 0.95:
                clock.advance(rng.choice([10, 60, 120]))
            else:
                await engine.reap_expired()

    run(mix())
    for namespace in ("alice", "bob"):
        usage = engine.usage(namespace)
        assert (usage.bytes, usage.objects) == recount(engine, namespace)


def test_open_upload_sessions_are_counted_and_limited(make_engine, run) -> None:
    # Resumable sessions charge uploads=+1 when opened and -1 when they end, in their own transactions.
    engine = make_engine(max_open_uploads=2)

    def open_session(txn: Any) -> None:
        quotas.charge(txn, "alice", engine.config.quotas, uploads=1)

    def close_session(txn: Any) -> None:
        quotas.charge(txn, "alice", engine.config.quotas, uploads=-1)

    engine.index.submit(open_session).result()
    engine.index.submit(open_session).result()
    with pytest.raises(errors.QuotaExceeded, match="max_open_uploads"):
        engine.index.submit(open_session).result()
    assert engine.usage("alice").open_uploads == 2
    engine.index.submit(close_session).result()
    engine.index.submit(open_session).result()
    assert engine.usage("alice").open_uploads == 2


def test_overrides_replace_the_defaults_field_by_field(make_engine, run) -> None:
    engine = make_engine(max_bytes=1000, max_objects=5, requests_per_second=50)
    engine.index.submit(lambda txn: quotas.set_override(txn, "alice", max_bytes=0, requests_per_second=2.5)).result()
    alice = engine.quota_status("alice").limits
    assert (alice.max_bytes, alice.max_objects, alice.requests_per_second) == (0, 5, 2.5)
    assert engine.quota_status("bob").limits.max_bytes == 1000
    run(engine.set(ALICE, DATA, "big", b"x" * 5000))  # 0: unlimited
    engine.index.submit(lambda txn: quotas.set_override(txn, "alice", max_bytes=None)).result()
    assert engine.quota_status("alice").limits.max_bytes == 1000
    with pytest.raises(errors.InvalidArgument):
        engine.index.submit(lambda txn: quotas.set_override(txn, "alice", max_bytes=-1)).result()
    with pytest.raises(errors.InvalidArgument):
        engine.index.submit(lambda txn: quotas.set_override(txn, "alice", bytes=1)).result()


def test_rate_limiter_is_a_token_bucket_per_namespace(clock: FakeClock) -> None:
    limiter = quotas.RateLimiter(clock)
    limits = quotas.Limits(max_bytes=0, max_objects=0, max_open_uploads=0, requests_per_second=2, burst=3)
    for _ in range(3):
        limiter.acquire("alice", limits)
    with pytest.raises(errors.RateLimited, match="requests_per_second"):
        limiter.acquire("alice", limits)
    limiter.acquire("bob", limits)
    clock.advance(0.5)  # one request's worth
    limiter.acquire("alice", limits)
    with pytest.raises(errors.RateLimited):
        limiter.acquire("alice", limits)
    clock.advance(3600)  # refills to the burst, no further
    for _ in range(3):
        limiter.acquire("alice", limits)
    with pytest.raises(errors.RateLimited):
        limiter.acquire("alice", limits)


def test_rate_limiter_default_burst_is_two_seconds_of_rate(clock: FakeClock) -> None:
    limiter = quotas.RateLimiter(clock)
    limits = quotas.Limits(max_bytes=0, max_objects=0, max_open_uploads=0, requests_per_second=5, burst=0)
    for _ in range(10):
        limiter.acquire("alice", limits)
    with pytest.raises(errors.RateLimited):
        limiter.acquire("alice", limits)
    unlimited = quotas.Limits(max_bytes=0, max_objects=0, max_open_uploads=0, requests_per_second=0, burst=0)
    for _ in range(1000):
        limiter.acquire("carol", unlimited)
