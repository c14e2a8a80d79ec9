"""Upload sessions at the engine level: expiry frees chunks, a restart re-verifies what it resumes."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blobstore.server import errors
from blobstore.server.engine import Engine, EngineConfig, open_engine
from blobstore.server.model import ANONYMOUS, StorageType, UploadSpec
from blobstore.server.sessions import UploadSessions
from tests.conftest import FakeClock

Run = Callable[[Coroutine[Any, Any, Any]], Any]
CHUNK = 4096


def _engine(path: Path, clock: FakeClock) -> Engine:
    return open_engine(str(path), EngineConfig(chunk_size=CHUNK, session_checkpoint_chunks=2), clock=clock)


def _chunk_files(path: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(path / "store" / "chunks") for name in names]


async def _send(sessions: UploadSessions, upload_id: str, offset: int, data: bytes) -> int:
    writer = await sessions.open(ANONYMOUS, upload_id)
    try:
        await writer.write(offset, data)
        return await writer.suspend()
    finally:
        await writer.abort()


def test_an_expired_session_is_reaped_with_its_chunks(tmp_path: Path, clock: FakeClock, run: Run) -> None:
    engine = _engine(tmp_path, clock)
    try:
        sessions = UploadSessions(engine)
        upload_id, expire_ns = run(sessions.start(ANONYMOUS, UploadSpec("k")))
        assert expire_ns == clock() + engine.config.upload_session_ttl_ns
        ttl_s = engine.config.upload_session_ttl_ns / 1e9
        clock.advance(ttl_s / 2)
        assert run(_send(sessions, upload_id, 0, os.urandom(3 * CHUNK + 10))) == 3 * CHUNK
        assert len(_chunk_files(tmp_path)) == 3
        assert engine.usage(ANONYMOUS.namespace).open_uploads == 1
        clock.advance(ttl_s / 2 + 1)  # past the first expiry, but the session made progress since
        assert run(sessions.reap_expired()) == 0
        assert sessions.query(ANONYMOUS, upload_id).persisted_size == 3 * CHUNK
        clock.advance(ttl_s / 2)
        with pytest.raises(errors.UploadNotFound):
            sessions.query(ANONYMOUS, upload_id)
        assert run(sessions.reap_expired()) == 1
        assert _chunk_files(tmp_path) == []
        assert engine.usage(ANONYMOUS.namespace).open_uploads == 0
    finally:
        engine.close()


def test_resuming_in_a_new_process_verifies_the_stored_chunks(tmp_path: Path, clock: FakeClock, run: Run) -> None:
    engine = _engine(tmp_path, clock)
    try:
        sessions = UploadSessions(engine)
        upload_id, _ = run(sessions.start(ANONYMOUS, UploadSpec("k")))
        assert run(_send(sessions, upload_id, 0, os.urandom(2 * CHUNK))) == 2 * CHUNK
    finally:
        engine.close()
    victim = _chunk_files(tmp_path)[0]
    original = victim.read_bytes()
    victim.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # always a change, whatever the byte
    engine = _engine(tmp_path, clock)
    try:
        sessions = UploadSessions(engine)
        with pytest.raises(errors.DataLoss):
            run(sessions.open(ANONYMOUS, upload_id))
        # The failed open did not keep the session claimed.
        run(sessions.cancel(ANONYMOUS, upload_id))
    finally:
        engine.close()


def test_a_committed_session_still_answers_after_the_object_changed(tmp_path: Path, clock: FakeClock, run: Run) -> None:
    engine = _engine(tmp_path, clock)
    try:
        sessions = UploadSessions(engine)
        upload_id, _ = run(sessions.start(ANONYMOUS, UploadSpec("k")))

        async def upload() -> int:
            writer = await sessions.open(ANONYMOUS, upload_id)
            try:
                await writer.write(0, b"v1" * CHUNK)
                return (await writer.finish()).generation
            finally:
                await writer.abort()

        generation = run(upload())
        run(engine.set(ANONYMOUS, StorageType.DATA, "k", b"v2"))
        status = sessions.query(ANONYMOUS, upload_id)
        assert status.object is not None
        assert (status.object.generation, status.persisted_size) == (generation, 2 * CHUNK)
        with pytest.raises(errors.FailedPrecondition):
            run(sessions.open(ANONYMOUS, upload_id))
        assert engine.usage(ANONYMOUS.namespace).open_uploads == 0
    finally:
        engine.close()
