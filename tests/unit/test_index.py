"""The LMDB index's group commit: each job succeeds or fails on its own, alone or in company, and
a group waits for company only while writes overlap."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blobstore.server import errors
from blobstore.server.app import ServerConfig
from blobstore.server.backends import BackendConfig, open_index
from blobstore.server.config import load_config
from blobstore.server.index import STOP, GroupStats, IndexWriter, LmdbIndex, run_groups


def failing(txn: IndexWriter) -> None:
    txn.put("meta", b"x", b"1")
    raise errors.InvalidArgument("no")


def passing(txn: IndexWriter) -> str:
    txn.put("meta", b"y", b"2")
    return "ok"


def test_a_lone_failing_job_leaves_nothing(tmp_path: Path) -> None:
    index = LmdbIndex(str(tmp_path / "index"))
    try:
        with pytest.raises(errors.InvalidArgument):
            index.submit(failing).result()
        assert index.submit(passing).result() == "ok"
        with index.reader() as r:
            assert r.get("meta", b"x") is None
            assert r.get("meta", b"y") == b"2"
    finally:
        index.close()


def test_a_failing_job_in_a_group_leaves_the_others(tmp_path: Path) -> None:
    index = LmdbIndex(str(tmp_path / "index"))
    try:
        bad, good = index.submit_many([failing, passing])
        with pytest.raises(errors.InvalidArgument):
            bad.result()
        assert good.result() == "ok"
    finally:
        index.close()
    reopened = LmdbIndex(str(tmp_path / "index"), readonly=True)
    try:
        with reopened.reader() as r:
            assert r.get("meta", b"x") is None
            assert r.get("meta", b"y") == b"2"
    finally:
        reopened.close()


def other_passing(txn: IndexWriter) -> str:
    txn.put("meta", b"z", b"3")
    return "also ok"


def test_a_group_without_failures_commits_once_and_one_with_a_failure_again_job_by_job(tmp_path: Path) -> None:
    index = LmdbIndex(str(tmp_path / "index"))
    try:
        assert [future.result() for future in index.submit_many([passing, other_passing])] == ["ok", "also ok"]
        assert index.group_stats.regroups == 0
        good, bad, also_good = index.submit_many([passing, failing, other_passing])
        with pytest.raises(errors.InvalidArgument):
            bad.result()
        assert (good.result(), also_good.result()) == ("ok", "also ok")
        assert index.group_stats.regroups == 1
        assert index.group_stats.groups == 2 and index.group_stats.jobs == 5
        with index.reader() as r:
            assert r.get("meta", b"x") is None
    finally:
        index.close()


def test_writes_one_after_the_other_never_wait_for_company(tmp_path: Path) -> None:
    index = LmdbIndex(str(tmp_path / "index"), gather_s=60.0)  # a wait would stall this test for a minute
    try:
        for _ in range(30):
            assert index.submit(passing).result() == "ok"
        assert index.group_stats.gathers == 0
        assert index.group_stats.groups == 30
        assert index.group_stats.counts[0] == 30  # all in the bucket of size 1
    finally:
        index.close()


def test_a_group_after_an_overlapped_commit_waits_for_the_callers_of_the_last_one() -> None:
    """Two jobs queue up while the first commits: the next group waits for one more job (the first
    one's caller writing again), then commits at once, not at the end of its (long) wait."""
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    groups: list[list[str]] = []
    queued: list[int] = []
    stats = GroupStats()

    def run_group(group: list[str]) -> None:
        if not groups:
            jobs.put(["second"])
            jobs.put(["third"])
        queued.append(jobs.qsize())  # as the index does once the commit is durable
        groups.append(group)

    writer = threading.Thread(
        target=run_groups,
        args=(jobs, 256, run_group),
        kwargs={"stats": stats, "gather_s": 600.0, "queued_at_commit": lambda: queued[-1]},
    )
    writer.start()
    jobs.put(["first"])
    deadline = time.monotonic() + 60  # only so that a broken writer fails the test instead of hanging it
    while stats.gathers == 0 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert stats.gathers == 1
    jobs.put(["fourth"])
    jobs.put(STOP)
    writer.join(60)
    assert not writer.is_alive()
    assert groups == [["first"], ["second", "third", "fourth"]]
    assert stats.groups == 2 and stats.jobs == 4


@pytest.mark.parametrize(("gather_us", "gathers"), [(0, 0), (1000, 1)])
def test_the_group_commit_wait_is_the_engine_setting(tmp_path: Path, gather_us: int, gathers: int) -> None:
    """Three writes queue up while a first one commits: the next group waits for company only
    when engine.index_commit_gather_us allows it."""
    settings = load_config(ServerConfig, overrides={"engine.index_commit_gather_us": str(gather_us)})
    index = open_index(str(tmp_path), settings.backends, gather_us=settings.engine.index_commit_gather_us)
    try:
        release = threading.Event()
        first = index.submit(lambda txn: release.wait(60))
        deadline = time.monotonic() + 60  # only so that a broken writer fails the test instead of hanging it
        while not first.running() and time.monotonic() < deadline:
            time.sleep(0.001)
        later = [index.submit(passing) for _ in range(3)]
        release.set()
        assert first.result(60) is True
        assert [future.result(60) for future in later] == ["ok"] * 3
        assert index.group_stats.gathers == gathers
        assert index.group_stats.groups == 2
    finally:
        index.close()


def test_a_negative_group_commit_wait_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="index_commit_gather_us must not be negative"):
        open_index(str(tmp_path), BackendConfig(), gather_us=-1)
