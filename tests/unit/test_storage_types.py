"""Storage-type rules on the engine: tmp expiry on a fake clock, products, result and logs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.server import errors, schema
from blobstore.server.engine import Engine, EngineConfig, open_engine
from blobstore.server.model import BatchEntry, Caller, Role, StorageType, UploadSpec
from tests.conftest import TEST_CHUNK_SIZE, FakeClock

DAY = 86_400
MiB = 1 << 20
USER = Caller("alice")
CATALOG = Caller("alice", frozenset({Role.CATALOG}))
ADMIN = Caller("alice", frozenset({Role.ADMIN}))
TMP = StorageType.TMP
PRODUCTS = StorageType.PRODUCTS


@pytest.fixture
def timed(tmp_path: Path, clock: FakeClock) -> Iterator[Engine]:
    engine = open_engine(str(tmp_path / "data"), EngineConfig(chunk_size=TEST_CHUNK_SIZE), clock=clock)
    yield engine
    engine.close()


def wait_until_no_chunks(engine: Engine) -> set[bytes]:
    """Freed chunks are deleted on a worker thread: wait for it (bounded), return what is left."""
    deadline = time.monotonic() + 30
    while (left := set(engine.chunks.iter_digests())) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


async def upload(engine: Engine, caller: Caller, storage_type: StorageType, key: str, data: bytes) -> None:
    writer = engine.new_upload(caller, UploadSpec(key, storage_type))
    try:
        await writer.write(0, data)
        await writer.finish()
    finally:
        await writer.abort()


def test_tmp_objects_expire_seven_days_after_their_last_write(timed: Engine, clock: FakeClock, run) -> None:
    written = run(timed.set(USER, TMP, "t", b"soon gone"))
    assert written.expire_time_ns == clock() + 7 * DAY * 10**9
    clock.advance(7 * DAY - 1)
    assert run(timed.get(USER, TMP, "t"))[1] == b"soon gone"
    run(timed.set(USER, TMP, "t", b"rewritten"))  # a write restarts the clock
    clock.advance(7 * DAY - 1)
    assert timed.exists(USER, TMP, "t")
    clock.advance(1)
    assert not timed.exists(USER, TMP, "t")


def test_an_expired_object_is_not_found_before_the_reaper_runs(timed: Engine, clock: FakeClock, run) -> None:
    big = b"".join(bytes([i]) * MiB for i in range(3))
    run(timed.set(USER, TMP, "small", b"x"))
    run(upload(timed, USER, TMP, "big", big))
    run(timed.set(USER, StorageType.DATA, "kept", b"data never expires"))
    clock.advance(7 * DAY)

    for key in ("small", "big"):
        with pytest.raises(errors.NotFound):
            timed.stat(USER, TMP, key)
        with pytest.raises(errors.NotFound):
            run(timed.get(USER, TMP, key))
        with pytest.raises(errors.NotFound):
            run(timed.open_download(USER, TMP, key))
        with pytest.raises(errors.NotFound):
            run(timed.delete(USER, TMP, key))
    assert timed.list(USER, TMP).objects == []
    # The records are still there: only the clock hides them.
    with timed.index.reader() as r:
        assert r.get(schema.OBJECTS, schema.object_key("alice", TMP, "big")) is not None
    assert timed.usage("alice").objects == 3
    assert run(timed.get(USER, StorageType.DATA, "kept"))[1] == b"data never expires"


def test_the_reaper_deletes_expired_objects_and_frees_their_chunks(timed: Engine, clock: FakeClock, run) -> None:
    big = b"".join(bytes([i]) * MiB for i in range(3))
    run(upload(timed, USER, TMP, "big", big))
    run(timed.set(USER, TMP, "small", b"x" * 10))
    clock.advance(DAY)
    run(timed.set(USER, TMP, "younger", b"y"))
    assert len(set(timed.chunks.iter_digests())) == 3
    assert run(timed.reap_expired()) == 0

    clock.advance(6 * DAY)
    assert run(timed.reap_expired()) == 2
    assert wait_until_no_chunks(timed) == set()
    with timed.index.reader() as r:
        assert r.get(schema.OBJECTS, schema.object_key("alice", TMP, "big")) is None
        assert list(r.scan(schema.EXPIRY, b"")) != []  # "younger" is still due later
    usage = timed.usage("alice")
    assert (usage.bytes, usage.objects) == (1, 1)
    assert timed.exists(USER, TMP, "younger")
    clock.advance(DAY)
    assert run(timed.reap_expired()) == 1
    assert timed.usage("alice").objects == 0


def test_an_expired_key_can_be_written_again_as_new(timed: Engine, clock: FakeClock, run) -> None:
    first = run(timed.set(USER, TMP, "t", b"1"))
    clock.advance(8 * DAY)
    again = run(timed.set(USER, TMP, "t", b"2", if_generation_match=0))
    assert again.create_time_ns > first.create_time_ns
    assert timed.usage("alice").objects == 1
    assert run(timed.reap_expired()) == 0  # the old expiry entry no longer matches


def test_the_tmp_lifetime_is_configurable(tmp_path: Path, clock: FakeClock, run) -> None:
    engine = open_engine(str(tmp_path / "data"), EngineConfig(tmp_ttl_ns=3600 * 10**9), clock=clock)
    try:
        run(engine.set(USER, TMP, "t", b"1"))
        clock.advance(3599)
        assert engine.exists(USER, TMP, "t")
        clock.advance(1)
        assert not engine.exists(USER, TMP, "t")
    finally:
        engine.close()


def test_users_may_upload_stat_and_list_products_but_not_read_or_delete_them(timed: Engine, run) -> None:
    run(timed.set(USER, PRODUCTS, "scene.tif", b"raster"))
    run(upload(timed, USER, PRODUCTS, "big.tif", b"r" * (2 * MiB)))
    run(timed.set(USER, PRODUCTS, "scene.tif", b"raster v2"))  # overwrite is an upload too
    assert timed.stat(USER, PRODUCTS, "scene.tif").size == 9
    assert [o.key for o in timed.list(USER, PRODUCTS).objects] == ["big.tif", "scene.tif"]
    for attempt in (
        timed.get(USER, PRODUCTS, "scene.tif"),
        timed.open_download(USER, PRODUCTS, "big.tif"),
        timed.delete(USER, PRODUCTS, "scene.tif"),
        timed.get(USER, PRODUCTS, "missing"),
    ):
        with pytest.raises(errors.ForbiddenByStorageType, match="read and removed through the catalog"):
            run(attempt)
    assert timed.exists(USER, PRODUCTS, "scene.tif")


@pytest.mark.parametrize("caller", [CATALOG, ADMIN], ids=["catalog", "admin"])
def test_the_catalog_reads_and_deletes_products(timed: Engine, caller: Caller, run) -> None:
    run(timed.set(USER, PRODUCTS, "scene.tif", b"raster"))
    run(upload(timed, USER, PRODUCTS, "big.tif", b"r" * (2 * MiB)))
    assert run(timed.get(caller, PRODUCTS, "scene.tif"))[1] == b"raster"
    download = run(timed.open_download(caller, PRODUCTS, "big.tif"))
    download.close()
    run(timed.delete(caller, PRODUCTS, "scene.tif"))
    assert not timed.exists(USER, PRODUCTS, "scene.tif")


@pytest.mark.parametrize("storage_type", [StorageType.RESULT, StorageType.LOGS, StorageType.DATA])
def test_result_and_logs_behave_like_data(timed: Engine, clock: FakeClock, storage_type: StorageType, run) -> None:
    info = run(timed.set(USER, storage_type, "k", b"v"))
    assert info.expire_time_ns == 0
    clock.advance(365 * DAY)
    assert run(timed.get(USER, storage_type, "k"))[1] == b"v"
    assert [o.key for o in timed.list(USER, storage_type).objects] == ["k"]
    run(timed.delete(USER, storage_type, "k"))
    assert not timed.exists(USER, storage_type, "k")


def test_storage_types_are_separate_key_spaces(timed: Engine, run) -> None:
    for storage_type in StorageType:
        run(timed.set(USER, storage_type, "same-key", storage_type.label.encode()))
    for storage_type in (StorageType.DATA, TMP, StorageType.RESULT, StorageType.LOGS):
        assert run(timed.get(USER, storage_type, "same-key"))[1] == storage_type.label.encode()


@pytest.mark.parametrize("bad", [6, 99, -1])
def test_an_unknown_storage_type_lists_the_valid_ones(bad: int) -> None:
    with pytest.raises(errors.InvalidArgument, match="valid storage types: data, tmp, products, result, logs"):
        StorageType.from_number(bad)
    with pytest.raises(errors.InvalidArgument, match="valid storage types"):
        StorageType.from_label("scratch")


def test_batches_treat_an_expired_tmp_object_as_absent(timed: Engine, clock: FakeClock, run) -> None:
    first = run(timed.set(USER, TMP, "fleeting", b"old"))
    clock.advance(7 * DAY + 1)
    [missing] = run(timed.batch_get(USER, TMP, ["fleeting"]))
    assert isinstance(missing, errors.NotFound)
    # Expired counts as absent for a precondition too, and the new version is created anew.
    [created] = run(timed.batch_set(USER, TMP, [BatchEntry("fleeting", b"new", if_generation_match=0)]))
    assert not isinstance(created, errors.BlobstoreError)
    assert created.generation > first.generation
    assert created.create_time_ns == created.update_time_ns == clock()
    assert created.expire_time_ns == clock() + 7 * DAY * 10**9
    [(info, value)] = run(timed.batch_get(USER, TMP, ["fleeting"]))
    assert (info, value) == (created, b"new")
