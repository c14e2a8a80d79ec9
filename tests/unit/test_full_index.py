"""A full LMDB map: writes fail RESOURCE_EXHAUSTED, reads keep working, deletes make room again."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blobstore.server import errors
from blobstore.server.engine import EngineConfig, open_engine
from blobstore.server.model import ANONYMOUS, StorageType

Run = Callable[[Coroutine[Any, Any, Any]], Any]
KiB = 1 << 10
DATA = StorageType.DATA


def test_a_full_index_map_refuses_writes_and_recovers_after_deletes(tmp_path: Path, run: Run) -> None:
    config = EngineConfig(index_map_size=2 << 20)
    engine = open_engine(str(tmp_path / "data"), config)
    stored: dict[str, bytes] = {}
    try:
        for number in range(200):
            value = os.urandom(50 * KiB)  # inline: it lives in the index itself
            try:
                run(engine.set(ANONYMOUS, DATA, f"k{number}", value))
            except errors.ResourceExhausted as exc:
                assert "index is full" in str(exc)
                break
            stored[f"k{number}"] = value
        else:
            pytest.fail("the 2 MiB index never filled up")
        assert len(stored) > 5
        for key, value in stored.items():
            assert run(engine.get(ANONYMOUS, DATA, key))[1] == value
        for key in list(stored)[: len(stored) // 2]:
            run(engine.delete(ANONYMOUS, DATA, key))
            del stored[key]
        run(engine.set(ANONYMOUS, DATA, "after", b"room again"))
        stored["after"] = b"room again"
    finally:
        engine.close()
    engine = open_engine(str(tmp_path / "data"), config)
    try:
        for key, value in stored.items():
            assert run(engine.get(ANONYMOUS, DATA, key))[1] == value
        assert engine.usage(ANONYMOUS.namespace).objects == len(stored)
    finally:
        engine.close()
