"""The engine on a temp folder: commits, overwrites, deletes, refcounts, dedup, generations, keys, listing."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blobstore.internal import records_pb2 as rec
from blobstore.server import errors, schema
from blobstore.server.engine import Engine, EngineConfig, crc32c, open_engine
from blobstore.server.model import ANONYMOUS, Caller, StorageType, UploadSpec
from tests.conftest import TEST_CHUNK_SIZE

Run = Callable[[Coroutine[Any, Any, Any]], Any]
DATA = StorageType.DATA
MiB = 1 << 20


def chunk_files(engine: Engine) -> set[bytes]:
    return set(engine.chunks.iter_digests())


def chunk_refcounts(engine: Engine) -> dict[bytes, int]:
    with engine.index.reader() as r:
        return {key: rec.ChunkRecord.FromString(value).refcount for key, value in r.scan(schema.CHUNKS, b"")}


async def upload(engine: Engine, key: str, data: bytes, piece: int = 300_000, **spec: Any) -> Any:
    writer = engine.new_upload(ANONYMOUS, UploadSpec(key, **spec))
    for offset in range(0, len(data), piece):
        await writer.write(offset, data[offset : offset + piece])
    return await writer.finish()


def test_small_value_is_inline_and_reads_back(engine: Engine, run: Run) -> None:
    info = run(engine.set(ANONYMOUS, DATA, "greeting", b"Hello Storage", content_type="text/plain"))
    assert info.size == 13 and info.generation == 1 and info.content_type == "text/plain"
    assert info.sha256 == hashlib.sha256(b"Hello Storage").digest()
    got, value = run(engine.get(ANONYMOUS, DATA, "greeting"))
    assert value == b"Hello Storage" and got == info
    assert chunk_files(engine) == set()


def test_large_value_is_chunked_and_reads_back(engine: Engine, run: Run) -> None:
    data = os.urandom(3 * MiB + 12345)
    info = run(upload(engine, "big", data))
    assert info.size == len(data) and info.sha256 == hashlib.sha256(data).digest()
    assert len(chunk_files(engine)) == 4
    download = run(engine.open_download(ANONYMOUS, DATA, "big"))

    async def read_all() -> bytes:
        return b"".join([piece async for piece, _ in download.pieces()])

    assert run(read_all()) == data
    download.close()


def test_ranged_download_returns_exactly_the_range(engine: Engine, run: Run) -> None:
    data = os.urandom(2 * MiB + 10)
    run(upload(engine, "big", data))
    for offset, limit in [(0, 1), (MiB - 5, 10), (MiB, MiB), (2 * MiB, 0), (123, 0), (len(data), 0)]:
        download = run(engine.open_download(ANONYMOUS, DATA, "big", offset=offset, limit=limit))

        async def read_all(d: Any = download) -> bytes:
            return b"".join([piece async for piece, _ in d.pieces()])

        end = len(data) if limit == 0 else min(len(data), offset + limit)
        assert run(read_all()) == data[offset:end]
        assert (download.range.start, download.range.end) == (offset, end)
        download.close()
    with pytest.raises(errors.OutOfRange):
        run(engine.open_download(ANONYMOUS, DATA, "big", offset=len(data) + 1))


def test_overwrite_releases_the_old_chunks(engine: Engine, run: Run) -> None:
    first, second = os.urandom(2 * MiB), os.urandom(2 * MiB)
    run(upload(engine, "k", first))
    old = chunk_files(engine)
    info = run(upload(engine, "k", second))
    assert info.generation == 2
    engine.executor.submit(lambda: None).result()  # garbage collection runs on the executor
    engine._collect(old)
    now = chunk_files(engine)
    assert not (old & now) and len(now) == 2
    assert set(chunk_refcounts(engine).values()) == {1}


def test_delete_releases_chunks_and_key(engine: Engine, run: Run) -> None:
    run(upload(engine, "k", os.urandom(2 * MiB)))
    run(engine.delete(ANONYMOUS, DATA, "k"))
    engine._collect(chunk_files(engine))
    assert chunk_files(engine) == set() and chunk_refcounts(engine) == {}
    with pytest.raises(errors.NotFound):
        engine.stat(ANONYMOUS, DATA, "k")
    with pytest.raises(errors.NotFound):
        run(engine.delete(ANONYMOUS, DATA, "k"))


def test_identical_data_is_stored_once_and_refcounted(engine: Engine, run: Run) -> None:
    data = os.urandom(2 * MiB) + os.urandom(MiB // 2)
    run(upload(engine, "a", data))
    files = chunk_files(engine)
    run(upload(engine, "b", data))
    run(upload(engine, "c", data[: 2 * MiB]))  # shares the two whole chunks
    assert chunk_files(engine) == files
    counts = chunk_refcounts(engine)
    assert sorted(counts.values()) == [2, 3, 3]
    run(engine.delete(ANONYMOUS, DATA, "a"))
    run(engine.delete(ANONYMOUS, DATA, "b"))
    engine._collect(files)
    assert sorted(chunk_refcounts(engine).values()) == [1, 1]
    assert len(chunk_files(engine)) == 2
    download = run(engine.open_download(ANONYMOUS, DATA, "c"))

    async def read_all() -> bytes:
        return b"".join([piece async for piece, _ in download.pieces()])

    assert run(read_all()) == data[: 2 * MiB]
    download.close()


def test_generations_increase_store_wide_and_preconditions_hold(engine: Engine, run: Run) -> None:
    a1 = run(engine.set(ANONYMOUS, DATA, "a", b"1", if_generation_match=0))
    b1 = run(engine.set(ANONYMOUS, DATA, "b", b"1"))
    assert b1.generation > a1.generation
    with pytest.raises(errors.GenerationMismatch):
        run(engine.set(ANONYMOUS, DATA, "a", b"2", if_generation_match=0))
    with pytest.raises(errors.GenerationMismatch):
        run(engine.set(ANONYMOUS, DATA, "a", b"2", if_generation_match=a1.generation + 100))
    a2 = run(engine.set(ANONYMOUS, DATA, "a", b"2", if_generation_match=a1.generation))
    assert a2.generation > b1.generation and a2.create_time_ns == a1.create_time_ns
    with pytest.raises(errors.GenerationMismatch):
        run(engine.delete(ANONYMOUS, DATA, "a", if_generation_match=a1.generation))
    run(engine.delete(ANONYMOUS, DATA, "a", if_generation_match=a2.generation))
    with pytest.raises(errors.GenerationMismatch):
        run(engine.get(ANONYMOUS, DATA, "b", generation=b1.generation + 1))


def test_failed_precondition_on_upload_frees_its_chunks(engine: Engine, run: Run) -> None:
    run(engine.set(ANONYMOUS, DATA, "k", b"existing"))
    with pytest.raises(errors.GenerationMismatch):
        run(upload(engine, "k", os.urandom(2 * MiB), if_generation_match=0))
    assert chunk_files(engine) == set() and chunk_refcounts(engine) == {}
    assert run(engine.get(ANONYMOUS, DATA, "k"))[1] == b"existing"


def test_checksum_mismatch_commits_nothing(engine: Engine, run: Run) -> None:
    with pytest.raises(errors.ChecksumMismatch):
        run(engine.set(ANONYMOUS, DATA, "k", b"value", crc32c_expected=12345))
    writer = engine.new_upload(ANONYMOUS, UploadSpec("big"))
    run(writer.write(0, os.urandom(2 * MiB)))
    with pytest.raises(errors.ChecksumMismatch):
        run(writer.finish(sha256_expected=b"\0" * 32))
    assert not engine.exists(ANONYMOUS, DATA, "k") and not engine.exists(ANONYMOUS, DATA, "big")
    assert chunk_files(engine) == set()


def test_a_chunk_job_cancelled_before_it_ran_does_not_hold_up_the_next(tmp_path: Path, run: Run) -> None:
    """Each chunk job waits for its predecessor's turn at the whole-object hash; one that never
    ran (its waiter cancelled while it queued) must still end its turn."""
    engine = open_engine(str(tmp_path / "data"), EngineConfig(chunk_size=TEST_CHUNK_SIZE, io_threads=1))
    release = threading.Event()
    try:
        engine.executor.submit(release.wait)  # the only worker thread is busy
        writer = engine.new_upload(ANONYMOUS, UploadSpec("big"))
        run(writer.write(0, os.urandom(2 * MiB)))  # two chunk jobs queue behind it
        assert len(writer._pending) == 2
        writer._pending[0].cancel()  # as when an abort() waiting on it is interrupted
        run(asyncio.sleep(0))  # the cancellation reaches the queued job
        release.set()
        run(asyncio.wait_for(writer.abort(), 30))
        assert engine.executor.submit(lambda: "free").result(timeout=30) == "free"
        assert not engine.exists(ANONYMOUS, DATA, "big") and chunk_files(engine) == set()
    finally:
        release.set()
        engine.close()


def test_write_offset_and_declared_size_are_enforced(engine: Engine, run: Run) -> None:
    writer = engine.new_upload(ANONYMOUS, UploadSpec("k", declared_size=10))
    with pytest.raises(errors.InvalidArgument, match="write_offset 5"):
        run(writer.write(5, b"abc"))
    with pytest.raises(errors.OutOfRange):
        run(writer.write(0, b"x" * 11))
    writer = engine.new_upload(ANONYMOUS, UploadSpec("k", declared_size=10))
    run(writer.write(0, b"x" * 4))
    with pytest.raises(errors.OutOfRange):
        run(writer.finish())
    assert not engine.exists(ANONYMOUS, DATA, "k")


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "empty"),
        ("x" * 1025, "1025 bytes"),
        ("é" * 513, "1026 bytes"),
        ("a\nb", "U+000A"),
        ("a\x00b", "U+0000"),
        ("tab\there", "U+0009"),
        ("del\x7f", "U+007F"),
        ("c1\x85", "U+0085"),
        ("\ud800", "surrogate"),
    ],
)
def test_bad_keys_are_refused_with_a_reason(engine: Engine, run: Run, key: str, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=re.escape(problem)):
        run(engine.set(ANONYMOUS, DATA, key, b"v"))


@pytest.mark.parametrize("key", ["a", "x" * 1024, "é" * 512, "dir/sub dir/file.tif", "日本語/キー", "emoji 🎉", "a\\b"])
def test_good_keys_are_accepted(engine: Engine, run: Run, key: str) -> None:
    run(engine.set(ANONYMOUS, DATA, key, b"v"))
    assert run(engine.get(ANONYMOUS, DATA, key))[1] == b"v"


def test_storage_types_and_namespaces_are_separate_key_spaces(engine: Engine, run: Run) -> None:
    other = Caller(namespace="other")
    run(engine.set(ANONYMOUS, DATA, "k", b"data"))
    run(engine.set(ANONYMOUS, StorageType.RESULT, "k", b"result"))
    run(engine.set(other, DATA, "k", b"other"))
    assert run(engine.get(ANONYMOUS, DATA, "k"))[1] == b"data"
    assert run(engine.get(ANONYMOUS, StorageType.RESULT, "k"))[1] == b"result"
    assert run(engine.get(other, DATA, "k"))[1] == b"other"
    assert [o.key for o in engine.list(ANONYMOUS, StorageType.LOGS).objects] == []


def test_unknown_storage_type_lists_the_valid_ones() -> None:
    with pytest.raises(errors.InvalidArgument, match="data, tmp, products, result, logs"):
        StorageType.from_number(9)


def test_list_pages_in_key_order_with_delimiter(engine: Engine, run: Run) -> None:
    keys = ["a", "b/1", "b/2", "b/3/x", "c", "c/d", "d"] + [f"e/{i:03d}" for i in range(25)]
    for key in reversed(keys):
        run(engine.set(ANONYMOUS, DATA, key, key.encode()))

    def walk(**kwargs: Any) -> tuple[list[str], list[str], int]:
        objects: list[str] = []
        prefixes: list[str] = []
        pages, token = 0, ""
        while True:
            page = engine.list(ANONYMOUS, DATA, page_token=token, **kwargs)
            pages += 1
            objects += [o.key for o in page.objects]
            prefixes += page.prefixes
            token = page.next_page_token
            if not token:
                return objects, prefixes, pages

    assert walk(page_size=4)[0] == sorted(keys)
    assert walk(page_size=4)[2] == 8
    assert walk(delimiter="/", page_size=2)[:2] == (["a", "c", "d"], ["b/", "c/", "e/"])
    assert walk(prefix="b/", delimiter="/", page_size=1)[:2] == (["b/1", "b/2"], ["b/3/"])
    assert walk(prefix="e/01", page_size=3)[0] == [f"e/{i:03d}" for i in range(10, 20)]
    assert walk(prefix="zzz")[0] == []
    with pytest.raises(errors.InvalidArgument):
        engine.list(ANONYMOUS, DATA, page_token="not-a-token!")
    other_prefix_token = engine.list(ANONYMOUS, DATA, prefix="b/", page_size=1).next_page_token
    with pytest.raises(errors.InvalidArgument):
        engine.list(ANONYMOUS, DATA, prefix="e/", page_token=other_prefix_token)


def test_unary_size_limits(engine: Engine, run: Run) -> None:
    limit = engine.config.max_unary_value
    with pytest.raises(errors.InvalidArgument, match="Upload"):
        run(engine.set(ANONYMOUS, DATA, "k", b"x" * (limit + 1)))
    run(upload(engine, "k", os.urandom(limit + 1)))
    with pytest.raises(errors.ObjectTooLargeForUnary):
        run(engine.get(ANONYMOUS, DATA, "k"))


async def _pieces(engine: Engine, key: str, max_bytes: int, offset: int = 0, limit: int = 0) -> list[tuple[bytes, int]]:
    download = await engine.open_download(ANONYMOUS, DATA, key, offset=offset, limit=limit)
    try:
        return [piece async for piece in download.pieces(max_bytes)]
    finally:
        download.close()


def test_download_pieces_start_at_the_range_and_each_chunk_and_carry_their_own_crc32c(engine: Engine, run: Run) -> None:
    data = os.urandom(2 * TEST_CHUNK_SIZE + 10)
    run(upload(engine, "big", data))
    step = 300_000
    for offset, limit in [(0, 0), (1, 0), (TEST_CHUNK_SIZE - 5, 10), (700_000, MiB), (2 * MiB, 0), (len(data) - 1, 0)]:
        end = len(data) if limit == 0 else offset + limit
        got = run(_pieces(engine, "big", step, offset, limit))
        assert b"".join(piece for piece, _ in got) == data[offset:end]
        assert [crc for _, crc in got] == [crc32c(piece) for piece, _ in got]
        expected_sizes = []
        for chunk_start in range(0, len(data), TEST_CHUNK_SIZE):
            lo, hi = max(offset, chunk_start), min(end, chunk_start + TEST_CHUNK_SIZE)
            expected_sizes += [min(step, hi - start) for start in range(lo, hi, step)]
        assert [len(piece) for piece, _ in got] == expected_sizes


@pytest.mark.parametrize(
    "damage", ["flip a byte before the range", "flip a byte after it", "grow", "truncate", "delete"]
)
def test_a_damaged_chunk_fails_before_any_of_its_bytes_are_handed_out(engine: Engine, run: Run, damage: str) -> None:
    data = os.urandom(TEST_CHUNK_SIZE)
    run(upload(engine, "one", data))
    path = Path(engine.chunks.local_path(hashlib.sha256(data).digest()) or "")  # one chunk, named by its SHA-256
    raw = bytearray(path.read_bytes())
    if damage == "flip a byte before the range":
        raw[100] ^= 0x01
    elif damage == "flip a byte after it":
        raw[-100] ^= 0x01
    elif damage == "grow":
        raw += b"\0"
    elif damage == "truncate":
        del raw[-1]
    path.unlink()
    if damage != "delete":
        path.write_bytes(bytes(raw))

    async def read() -> list[bytes]:
        received: list[bytes] = []
        download = await engine.open_download(ANONYMOUS, DATA, "one", offset=500_000, limit=100_000)
        try:
            with pytest.raises(errors.DataLoss, match="missing" if damage == "delete" else "corrupt"):
                async for piece, _ in download.pieces(64 << 10):
                    received.append(piece)
        finally:
            download.close()
        return received

    assert run(read()) == []


def test_corrupt_chunk_is_data_loss_never_wrong_bytes(engine: Engine, run: Run) -> None:
    run(upload(engine, "k", os.urandom(MiB + 100)))
    run(engine.set(ANONYMOUS, DATA, "mid", os.urandom(200_000)))
    digest = sorted(chunk_files(engine))[0]
    path = Path(engine.chunks.local_path(digest) or "")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))

    async def read_all(key: str) -> bytes:
        download = await engine.open_download(ANONYMOUS, DATA, key)
        try:
            return b"".join([piece async for piece, _ in download.pieces()])
        finally:
            download.close()

    failures = 0
    for key in ("k", "mid"):
        try:
            run(read_all(key))
        except errors.DataLoss:
            failures += 1
    assert failures == 1


def test_a_background_collection_that_fails_is_logged(
    engine: Engine, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(200_000)  # one chunk file, named by its SHA-256
    run(engine.set(ANONYMOUS, DATA, "k", data))
    path = Path(engine.chunks.local_path(hashlib.sha256(data).digest()) or "")
    path.unlink()
    path.mkdir()  # where the chunk file was: unlinking it now fails
    (path / "in-the-way").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="blobstore.server.engine"):
        run(engine.delete(ANONYMOUS, DATA, "k"))
        deadline = time.monotonic() + 30  # the collection runs on a worker thread after the commit
        while "collecting released chunks failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "collecting released chunks failed" in caplog.text
    assert not engine.exists(ANONYMOUS, DATA, "k")


def test_restart_keeps_everything_and_sweeps_orphans(tmp_path: Path, run: Run) -> None:
    engine = open_engine(str(tmp_path / "d"), EngineConfig())
    data = os.urandom(2 * MiB)
    run(upload(engine, "k", data))
    kept = chunk_files(engine)
    orphan = hashlib.sha256(b"orphan").digest()
    engine.chunks.put(orphan, b"orphan")
    engine.close()
    engine = open_engine(str(tmp_path / "d"), EngineConfig())
    try:
        assert engine.startup_sweep()["unreferenced_chunks"] == 1
        assert chunk_files(engine) == kept
        assert engine.stat(ANONYMOUS, DATA, "k").sha256 == hashlib.sha256(data).digest()
    finally:
        engine.close()


def test_tmp_objects_expire(tmp_path: Path, run: Run) -> None:
    now = [1_700_000_000 * 10**9]
    engine = open_engine(str(tmp_path / "d"), EngineConfig(tmp_ttl_ns=10**9), clock=lambda: now[0])
    try:
        run(engine.set(ANONYMOUS, StorageType.TMP, "t", b"temporary"))
        assert engine.exists(ANONYMOUS, StorageType.TMP, "t")
        now[0] += 2 * 10**9
        assert not engine.exists(ANONYMOUS, StorageType.TMP, "t")
        assert run(engine.reap_expired()) == 1
        assert engine.usage("default").objects == 0
    finally:
        engine.close()


def test_usage_tracks_logical_bytes(engine: Engine, run: Run) -> None:
    data = os.urandom(2 * MiB)
    run(upload(engine, "a", data))
    run(upload(engine, "b", data))
    run(engine.set(ANONYMOUS, DATA, "c", b"12345"))
    usage = engine.usage("default")
    assert (usage.bytes, usage.objects) == (4 * MiB + 5, 3)
    run(engine.set(ANONYMOUS, DATA, "c", b"1"))
    run(engine.delete(ANONYMOUS, DATA, "a"))
    usage = engine.usage("default")
    assert (usage.bytes, usage.objects) == (2 * MiB + 1, 2)


def test_long_keys_list_in_true_key_order(engine: Engine, run: Run) -> None:
    head = "p/" + "x" * 500
    keys = [head + tail for tail in ("b", "a", "c", "aa", "/z", "")] + ["p/" + "x" * 399, "p/y"]
    for key in keys:
        run(engine.set(ANONYMOUS, DATA, key, key.encode()[-20:]))
    for page_size in (1, 2, 3, 100):
        listed: list[str] = []
        token = ""
        while True:
            page = engine.list(ANONYMOUS, DATA, prefix="p/", page_size=page_size, page_token=token)
            listed += [o.key for o in page.objects]
            token = page.next_page_token
            if not token:
                break
        assert listed == sorted(keys)
    page = engine.list(ANONYMOUS, DATA, prefix=head, delimiter="/")
    assert page.prefixes == [head + "/"] and [o.key for o in page.objects] == sorted(
        k for k in keys if k.startswith(head) and "/" not in k[len(head) :]
    )
    for key in keys:
        assert run(engine.get(ANONYMOUS, DATA, key))[1] == key.encode()[-20:]


def test_concurrent_sets_share_commits_and_sequential_ones_never_wait(engine: Engine, run: Run) -> None:
    stats = engine.index.group_stats
    groups, jobs = stats.groups, stats.jobs

    async def one_after_the_other() -> None:
        for number in range(20):
            await engine.set(ANONYMOUS, DATA, f"alone/{number}", b"v")

    run(one_after_the_other())
    assert stats.gathers == 0  # nothing overlapped: no Set waited for company
    assert (stats.groups - groups, stats.jobs - jobs) == (20, 20)

    async def together() -> list[Any]:
        return await asyncio.gather(*(engine.set(ANONYMOUS, DATA, f"together/{n}", b"v") for n in range(32)))

    groups, jobs = stats.groups, stats.jobs
    infos = run(together())
    assert [info.key for info in infos] == [f"together/{n}" for n in range(32)]
    assert stats.jobs - jobs == 32
    assert stats.groups - groups < 32  # some Sets shared a commit
