"""BatchSet / BatchGet in the engine: one transaction for many values, each judged on its own."""

from __future__ import annotations

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
