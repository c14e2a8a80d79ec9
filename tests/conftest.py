"""Shared fixtures: an engine on a temp folder, and a real server in process on port 0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blobstore.client import Storage
from blobstore.server.app import BlobstoreServer, ServerConfig
from blobstore.server.engine import Engine, EngineConfig, open_engine

T = TypeVar("T")


class FakeClock:
    """An injectable clock in nanoseconds that only moves when told to."""

    def __init__(self, start_ns: int = 1_700_000_000 * 10**9) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 10**9)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def run() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(str(tmp_path / "data"), EngineConfig())
    yield engine
    engine.close()


class LoopThread:
    """An asyncio loop in a background thread, for servers the blocking client talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RunningServer:
    server: BlobstoreServer
    loop: LoopThread
    data_dir: Path

    @property
    def address(self) -> str:
        address: str = self.server.address
        return address

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def client(self, **kwargs: Any) -> Storage:
        return Storage(self.address, **kwargs)


def start_server(
    data_dir: Path, *, engine: Engine | None = None, clock: Callable[[], int] | None = None, **overrides: Any
) -> RunningServer:
    """A server on free ports; pass `engine`, or just a `clock` (say a FakeClock) for the engine it opens."""
    loop = LoopThread()
    config = ServerConfig(data_dir=str(data_dir), port=0, **overrides)

    async def build() -> BlobstoreServer:
        given = engine
        if given is None and clock is not None:
            given = open_engine(str(data_dir), config.engine, clock=clock)
        server = BlobstoreServer(config, given)
        await server.start()
        return server

    try:
        return RunningServer(loop.call(build()), loop, data_dir)
    except BaseException:
        loop.close()
        raise


def stop_server(running: RunningServer, grace: float = 1.0) -> None:
    try:
        running.loop.call(running.server.stop(grace))
    finally:
        running.loop.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path / "data")
    yield running
    stop_server(running)


@pytest.fixture
def storage(server: RunningServer) -> Iterator[Storage]:
    with server.client() as client:
        yield client
