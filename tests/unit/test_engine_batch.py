"""BatchSet / BatchGet in the engine: one transaction for many values, each judged on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blobstore.server import errors, schema
from blobstore.server.engine import Engine, EngineConfig, open_engine
from blobstore.server.model import ANONYMOUS, BatchEntry, ObjectInfo, StorageType
from blobstore.server.quotas import QuotaConfig

Run = Callable[[Coroutine[Any, Any, Any]], Any]
DATA = StorageType.DATA


def test_batch_set_stores_every_entry_with_its_own_generation(engine: Engine, run: Run) -> None:
    results = run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry(f"k{i}", f"v{i}".encode()) for i in range(50)]))
    assert all(isinstance(result, ObjectInfo) for result in results)
    generations = [result.generation for result in results]
    assert generations == sorted(set(generations))
    for i in range(50):
        _, value = run(engine.get(ANONYMOUS, DATA, f"k{i}"))
        assert value == f"v{i}".encode()


def test_one_bad_entry_fails_alone(engine: Engine, run: Run) -> None:
    entries = [
        BatchEntry("good-1", b"a"),
        BatchEntry("bad\x00key", b"b"),
        BatchEntry("good-2", b"c"),
        BatchEntry("bad-crc", b"d", crc32c_expected=1),
        BatchEntry("too-big", b"x" * (engine.config.max_unary_value + 1)),
    ]
    results = run(engine.batch_set(ANONYMOUS, DATA, entries))
    assert isinstance(results[0], ObjectInfo) and isinstance(results[2], ObjectInfo)
    assert isinstance(results[1], errors.InvalidArgument)
    assert isinstance(results[3], errors.ChecksumMismatch)
    assert isinstance(results[4], errors.InvalidArgument)
    assert run(engine.get(ANONYMOUS, DATA, "good-2"))[1] == b"c"
    for key in ("bad-crc", "too-big"):
        assert not engine.exists(ANONYMOUS, DATA, key)


def test_preconditions_are_checked_per_entry(engine: Engine, run: Run) -> None:
    first = run(engine.set(ANONYMOUS, DATA, "existing", b"old"))
    entries = [
        BatchEntry("existing", b"new", if_generation_match=first.generation),
        BatchEntry("fresh", b"new", if_generation_match=0),
        BatchEntry("fresh-but-stale", b"new", if_generation_match=12345),
    ]
    results = run(engine.batch_set(ANONYMOUS, DATA, entries))
    assert isinstance(results[0], ObjectInfo) and isinstance(results[1], ObjectInfo)
    assert isinstance(results[2], errors.GenerationMismatch)
    # The same precondition again: the first write moved the generation, so it fails now.
    again = run(engine.batch_set(ANONYMOUS, DATA, [entries[0], BatchEntry("fresh", b"x", if_generation_match=0)]))
    assert all(isinstance(result, errors.GenerationMismatch) for result in again)
    assert run(engine.get(ANONYMOUS, DATA, "existing"))[1] == b"new"


def test_mixed_sizes_inline_and_chunked(engine: Engine, run: Run) -> None:
    big = os.urandom(engine.config.chunk_size - 7)  # above the inline threshold: stored as a chunk
    medium = os.urandom(engine.config.inline_threshold + 1)
    entries = [BatchEntry("small", b"s"), BatchEntry("big", big), BatchEntry("medium", medium), BatchEntry("e", b"")]
    results = run(engine.batch_set(ANONYMOUS, DATA, entries))
    assert [result.size for result in results if isinstance(result, ObjectInfo)] == [1, len(big), len(medium), 0]
    got = run(engine.batch_get(ANONYMOUS, DATA, ["big", "small", "medium", "e"]))
    assert [value for _, value in got] == [big, b"s", medium, b""]
    with engine.index.reader() as r:
        assert len(list(r.scan(schema.CHUNKS, b""))) == 2
    # Overwriting with small values releases the chunks.
    run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry("big", b"now small"), BatchEntry("medium", b"too")]))
    with engine.index.reader() as r:
        assert list(r.scan(schema.CHUNKS, b"")) == []


def test_batch_get_reports_each_key(engine: Engine, run: Run) -> None:
    run(engine.set(ANONYMOUS, DATA, "here", b"value"))
    results = run(engine.batch_get(ANONYMOUS, DATA, ["here", "missing", "bad\x01", "here"]))
    assert results[0][1] == b"value" and results[3][1] == b"value"
    assert isinstance(results[1], errors.NotFound)
    assert isinstance(results[2], errors.InvalidArgument)


def test_batch_get_stops_filling_at_the_byte_budget(engine: Engine, run: Run) -> None:
    run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry(f"k{i}", bytes(1000)) for i in range(10)]))
    results = run(engine.batch_get(ANONYMOUS, DATA, [f"k{i}" for i in range(10)], max_total_bytes=5000))
    served = [result for result in results if isinstance(result, tuple)]
    assert 1 <= len(served) < 10
    assert all(isinstance(result, errors.BatchResponseFull) for result in results[len(served) :])


def test_too_many_entries_fail_the_call(engine: Engine, run: Run) -> None:
    count = engine.config.max_batch_entries + 1
    with pytest.raises(errors.InvalidArgument, match="at most"):
        run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry(f"k{i}", b"") for i in range(count)]))
    with pytest.raises(errors.InvalidArgument, match="at most"):
        run(engine.batch_get(ANONYMOUS, DATA, [f"k{i}" for i in range(count)]))


def test_usage_counts_every_committed_entry(engine: Engine, run: Run) -> None:
    run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry("a", b"12"), BatchEntry("b\x00", b"x"), BatchEntry("c", b"345")]))
    usage = engine.usage(ANONYMOUS.namespace)
    assert (usage.objects, usage.bytes) == (2, 5)


def test_chunks_of_a_batch_are_unpinned_and_collectable(engine: Engine, run: Run) -> None:
    big = os.urandom(engine.config.inline_threshold * 2)
    run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry("big", big), BatchEntry("bad\x00", big)]))
    assert len(list(engine.chunks.iter_digests())) == 1
    run(engine.delete(ANONYMOUS, DATA, "big"))
    # Unpinning and collection run on worker threads: wait for them, not for a time.
    deadline = time.monotonic() + 30
    while list(engine.chunks.iter_digests()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(engine.chunks.iter_digests()) == []


def test_a_quota_fails_the_entries_past_it_alone(tmp_path: Path, run: Run) -> None:
    config = EngineConfig(quotas=QuotaConfig(max_objects=2))
    engine = open_engine(str(tmp_path / "quota"), config)
    try:
        results = run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry(f"q{i}", b"v") for i in range(3)]))
        assert [isinstance(result, ObjectInfo) for result in results] == [True, True, False]
        assert isinstance(results[2], errors.QuotaExceeded)
        assert engine.usage(ANONYMOUS.namespace).objects == 2
    finally:
        engine.close()


def test_quota_and_precondition_failures_mixed_with_good_entries(tmp_path: Path, run: Run) -> None:
    # Each entry is judged against the usage the entries before it left: an overwrite that does not
    # grow the count still fits once the namespace is full, a new key does not.
    config = EngineConfig(quotas=QuotaConfig(max_objects=3, max_bytes=100))
    engine = open_engine(str(tmp_path / "mixed"), config)
    try:
        first = run(engine.set(ANONYMOUS, DATA, "old", b"12345"))
        entries = [
            BatchEntry("new-1", b"a" * 10),
            BatchEntry("old", b"x" * 7, if_generation_match=first.generation + 99),  # stale precondition
            BatchEntry("new-2", b"b" * 95),  # past max_bytes: 5 + 10 + 95 > 100
            BatchEntry("new-2", b"b" * 20),  # the same key again, small enough
            BatchEntry("new-3", b"c"),  # past max_objects: old, new-1, new-2 are there
            BatchEntry("old", b"y" * 6, if_generation_match=first.generation),  # overwrite: no new object
            BatchEntry("new-1", b"", if_generation_match=0),  # exists by now
        ]
        results = run(engine.batch_set(ANONYMOUS, DATA, entries))
        kinds = [type(result).__name__ for result in results]
        assert kinds == [
            "ObjectInfo",
            "GenerationMismatch",
            "QuotaExceeded",
            "ObjectInfo",
            "QuotaExceeded",
            "ObjectInfo",
            "GenerationMismatch",
        ]
        usage = engine.usage(ANONYMOUS.namespace)
        assert (usage.objects, usage.bytes) == (3, 10 + 20 + 6)
        assert run(engine.get(ANONYMOUS, DATA, "old"))[1] == b"y" * 6
        assert run(engine.get(ANONYMOUS, DATA, "new-2"))[1] == b"b" * 20
        assert not engine.exists(ANONYMOUS, DATA, "new-3")
        stored = [result for result in results if isinstance(result, ObjectInfo)]
        assert [info.generation for info in stored] == sorted({info.generation for info in stored})
        assert all(info.generation > first.generation for info in stored)
    finally:
        engine.close()
    # What the batch left is what is on disk: reopened, the same values and usage.
    engine = open_engine(str(tmp_path / "mixed"), config)
    try:
        assert run(engine.get(ANONYMOUS, DATA, "new-1"))[1] == b"a" * 10
        usage = engine.usage(ANONYMOUS.namespace)
        assert (usage.objects, usage.bytes) == (3, 36)
    finally:
        engine.close()


def test_generations_are_unique_and_increasing_across_concurrent_batches_and_sets(engine: Engine, run: Run) -> None:
    async def together() -> list[list[ObjectInfo]]:
        batches = [
            engine.batch_set(ANONYMOUS, DATA, [BatchEntry(f"b{n}/{i}", bytes([i])) for i in range(30)])
            for n in range(8)
        ]
        sets = [engine.set(ANONYMOUS, DATA, f"s{n}", b"v") for n in range(20)]
        done: list[Any] = await asyncio.gather(*batches, *sets)
        groups = [result if isinstance(result, list) else [result] for result in done]
        assert all(isinstance(info, ObjectInfo) for group in groups for info in group)
        return groups

    groups = run(together())
    generations = [info.generation for group in groups for info in group]
    assert len(generations) == 8 * 30 + 20
    assert len(set(generations)) == len(generations)
    for group in groups:
        assert [info.generation for info in group] == sorted(info.generation for info in group)
    # Later writes get later generations, whichever path they take.
    later = run(engine.set(ANONYMOUS, DATA, "later", b"v")).generation
    assert later > max(generations)
    again = run(engine.batch_set(ANONYMOUS, DATA, [BatchEntry("b0/0", b"w")]))[0]
    assert isinstance(again, ObjectInfo) and again.generation > later


def test_tmp_overwrites_in_one_batch_keep_one_expiry_entry(engine: Engine, run: Run) -> None:
    tmp = StorageType.TMP
    run(engine.batch_set(ANONYMOUS, tmp, [BatchEntry("t", b"1"), BatchEntry("t", b"2"), BatchEntry("u", b"3")]))
    with engine.index.reader() as r:
        expiry = [schema.split_expiry_key(raw_key)[1] for raw_key, _ in r.scan(schema.EXPIRY, b"")]
    assert sorted(expiry) == sorted(schema.object_key(ANONYMOUS.namespace, tmp, key) for key in ("t", "u"))
    assert run(engine.get(ANONYMOUS, tmp, "t"))[1] == b"2"
    assert engine.usage(ANONYMOUS.namespace).objects == 2


def test_a_batch_that_fills_the_index_reports_each_entry(tmp_path: Path, run: Run) -> None:
    # The one-transaction path cannot undo part of a batch: when the index fills up part-way, the
    # batch runs again entry by entry, each with its own outcome, and nothing partial is visible.
    engine = open_engine(str(tmp_path / "full"), EngineConfig(index_map_size=2 << 20))
    try:
        entries = [BatchEntry(f"k{i}", os.urandom(50 << 10)) for i in range(60)]
        results = run(engine.batch_set(ANONYMOUS, DATA, entries))
        stored = [entry for entry, result in zip(entries, results, strict=True) if isinstance(result, ObjectInfo)]
        refused = [result for result in results if not isinstance(result, ObjectInfo)]
        assert refused and all(isinstance(result, errors.ResourceExhausted) for result in refused)
        for entry in stored:
            assert run(engine.get(ANONYMOUS, DATA, entry.key))[1] == entry.value
        assert engine.usage(ANONYMOUS.namespace).objects == len(stored)
    finally:
        engine.close()


def test_object_info_of_builds_what_the_constructor_builds() -> None:
    values = ("k", StorageType.TMP, 3, 4, "text/plain", {"a": "b"}, 5, 6, 7, b"\x08" * 32, 9)
    built = ObjectInfo.of(*values)
    assert built == ObjectInfo(*values)
    # Every field, including one added later and forgotten in of(): comparing would not see it missing.
    assert vars(built) == vars(ObjectInfo(*values))
    assert dataclasses.astuple(built) == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.size = 1  # type: ignore[misc]
