"""The LMDB index's group commit: each job succeeds or fails on its own, alone or in company."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobstore.server import errors
from blobstore.server.index import IndexWriter, LmdbIndex


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
