"""A hypothesis state machine drives the engine against a dict model.

Small chunks (1 KiB) and a small inline threshold make every value of a few KiB
span several chunks, so chunking, deduplication, reference counts, session
checkpoints and resumption after a restart are all exercised. After every step
the store must read back exactly as the model says, and a scrub must find the
reference counts and usage records exact.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blobstore.server import errors
from blobstore.server.engine import Engine, EngineConfig, open_engine
from blobstore.server.model import ANONYMOUS, StorageType, UploadSpec
from blobstore.server.scrub import scrub
from blobstore.server.sessions import UploadSessions
from tests.conftest import FakeClock

CHUNK = 1024
DATA = StorageType.DATA
KEYS = st.sampled_from(["a", "b", "dir/c", "dir/d"])
# Repeated fixed values make identical chunks across keys and versions (deduplication).
VALUES = st.one_of(
    st.binary(max_size=6 * CHUNK),
    st.sampled_from([b"", b"x" * 3000, bytes(range(256)) * 8, b"y" * CHUNK]),
)
PIECES = st.lists(st.integers(min_value=1, max_value=2 * CHUNK), min_size=1, max_size=6)


@dataclass
class SessionModel:
    key: str
    value: bytes
    persisted: int = 0


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="engine-model-")
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.config = EngineConfig(
            chunk_size=CHUNK,
            inline_threshold=256,
            max_unary_value=4 * CHUNK,
            session_checkpoint_chunks=2,
            upload_pipeline_depth=2,
        )
        self.model: dict[str, bytes] = {}
        self.open_sessions: dict[str, SessionModel] = {}
        self.engine: Engine
        self.sessions: UploadSessions
        self._open()

    def _open(self) -> None:
        self.engine = open_engine(self.directory, self.config, clock=self.clock)
        self.engine.startup_sweep()
        self.sessions = UploadSessions(self.engine)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.engine.close()
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _write_in_pieces(self, writer: Any, data: bytes, offset: int, pieces: list[int]) -> int:
        position = 0
        for size in pieces:
            piece = data[position : position + size]
            if not piece:
                break
            await writer.write(offset + position, piece)
            position += len(piece)
        return position

    async def _read(self, key: str) -> bytes:
        download = await self.engine.open_download(ANONYMOUS, DATA, key)
        try:
            return b"".join([data async for data, _ in download.pieces()])
        finally:
            download.close()

    # ------------------------------------------------------------------ rules

    @initialize()
    def empty(self) -> None:
        assert self.engine.list(ANONYMOUS, DATA).objects == []

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: bytes) -> None:
        if len(value) > self.config.max_unary_value:
            with pytest.raises(errors.InvalidArgument):
                self.run(self.engine.set(ANONYMOUS, DATA, key, value))
            return
        info = self.run(self.engine.set(ANONYMOUS, DATA, key, value))
        assert info.size == len(value)
        self.model[key] = value

    @rule(key=KEYS, value=VALUES, pieces=PIECES)
    def upload_in_pieces(self, key: str, value: bytes, pieces: list[int]) -> None:
        async def upload() -> None:
            writer = self.engine.new_upload(ANONYMOUS, UploadSpec(key))
            try:
                sent = await self._write_in_pieces(writer, value, 0, [*pieces, len(value)])
                assert sent == len(value)
                await writer.finish()
            finally:
                await writer.abort()

        self.run(upload())
        self.model[key] = value

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if key in self.model:
            self.run(self.engine.delete(ANONYMOUS, DATA, key))
            del self.model[key]
        else:
            with pytest.raises(errors.NotFound):
                self.run(self.engine.delete(ANONYMOUS, DATA, key))

    @rule(key=KEYS, value=VALUES)
    def start_session(self, key: str, value: bytes) -> None:
        upload_id, _ = self.run(self.sessions.start(ANONYMOUS, UploadSpec(key)))
        self.open_sessions[upload_id] = SessionModel(key, value)

    @precondition(lambda self: self.open_sessions)
    @rule(data=st.data(), pieces=PIECES, finish=st.booleans())
    def continue_session(self, data: st.DataObject, pieces: list[int], finish: bool) -> None:
        upload_id = data.draw(st.sampled_from(sorted(self.open_sessions)))
        session = self.open_sessions[upload_id]
        status = self.sessions.query(ANONYMOUS, upload_id)
        assert status.object is None
        assert status.persisted_size == session.persisted

        async def resume() -> tuple[int, Any]:
            writer = await self.sessions.open(ANONYMOUS, upload_id)
            with pytest.raises(errors.Aborted):
                await self.sessions.open(ANONYMOUS, upload_id)
            try:
                offset = session.persisted
                if finish:
                    pieces.append(len(session.value))
                sent = await self._write_in_pieces(writer, session.value[offset:], offset, pieces)
                if finish:
                    return sent, await writer.finish()
                return sent, await writer.suspend()
            finally:
                await writer.abort()

        sent, outcome = self.run(resume())
        if finish:
            assert outcome.size == len(session.value)
            self.model[session.key] = session.value
            del self.open_sessions[upload_id]
            assert self.sessions.query(ANONYMOUS, upload_id).object is not None
        else:
            # Whole chunks are durable (a stream idle for a second also persists its partial chunk);
            # the persisted size never goes back.
            received = session.persisted + sent
            assert received - received % CHUNK <= outcome <= received
            assert outcome >= session.persisted
            session.persisted = outcome

    @precondition(lambda self: self.open_sessions)
    @rule(data=st.data())
    def cancel_session(self, data: st.DataObject) -> None:
        upload_id = data.draw(st.sampled_from(sorted(self.open_sessions)))
        self.run(self.sessions.cancel(ANONYMOUS, upload_id))
        del self.open_sessions[upload_id]
        with pytest.raises(errors.UploadNotFound):
            self.sessions.query(ANONYMOUS, upload_id)

    @rule()
    def expire_sessions(self) -> None:
        self.clock.advance(self.config.upload_session_ttl_ns / 1e9 + 1)
        self.run(self.sessions.reap_expired())
        for upload_id in self.open_sessions:
            with pytest.raises(errors.UploadNotFound):
                self.sessions.query(ANONYMOUS, upload_id)
        self.open_sessions.clear()

    @rule()
    def restart(self) -> None:
        self.engine.close()
        self._open()
        report = scrub(self.engine.index, self.engine.chunks)
        assert not report.unreferenced, report

    # ------------------------------------------------------------------ invariants

    @invariant()
    def store_matches_the_model(self) -> None:
        listed = {info.key: info.size for info in self.engine.list(ANONYMOUS, DATA).objects}
        assert listed == {key: len(value) for key, value in self.model.items()}
        for key, value in self.model.items():
            assert self.run(self._read(key)) == value
        usage = self.engine.usage(ANONYMOUS.namespace)
        assert usage.objects == len(self.model)
        assert usage.bytes == sum(len(value) for value in self.model.values())
        assert usage.open_uploads == len(self.open_sessions)

    @invariant()
    def reference_counts_are_exact(self) -> None:
        report = scrub(self.engine.index, self.engine.chunks)
        assert report.ok, report


EngineMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_against_a_dict_model = EngineMachine.TestCase
