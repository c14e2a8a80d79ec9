"""Shared fixtures: an engine on a temp folder, and a real server in process on port 0."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blobstore.client import Storage
from blobstore.server.app import BlobstoreServer, ServerConfig
from blobstore.server.backends import BackendConfig, PostgresConfig, S3Config
from blobstore.server.engine import Engine, EngineConfig, open_engine
from tests.infra import services

BACKENDS = ("file-lmdb", "s3pg")
# Tests size their objects in MiB around 1 MiB chunks; the product default (4 MiB) is a tuning
# for speed (docs/benchmarks.md, item 23), and small chunks keep multi-chunk cases small.
TEST_CHUNK_SIZE = 1 << 20
SHARED_SIGNING_SECRET = b"replicas-of-one-test-store-share-this-secret"

T = TypeVar("T")


class FakeClock:
    """An injectable clock in nanoseconds that only moves when told to."""

    def __init__(self, start_ns: int = 1_700_000_000 * 10**9) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 10**9)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("BLOBSTORE_TEST_BACKEND", "file-lmdb"),
        help="the backend pair the engine and server fixtures use: file-lmdb (embedded) or s3pg "
        "(S3 chunk store on Ceph's RADOS Gateway + PostgreSQL index, both started on loopback by the tests)",
    )
    parser.addoption("--soak", action="store_true", help="run the long versions of the crash tests (make soak)")
    parser.addoption("--crash-rounds", type=int, default=None, help="kill/restart rounds of the crash harness")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_store: needs the s3pg backend pair (runs in the --backend=s3pg pass)")
    config.addinivalue_line(
        "markers",
        "file_store: works on the data dir's own files: chunk files, the LMDB index the token "
        "commands open, the URL signing key file (file-lmdb pass only)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--backend") == "s3pg":
        local = pytest.mark.skip(reason="works on the data dir's own files: runs in the file-lmdb pass")
        for item in items:
            if "file_store" in item.keywords:
                item.add_marker(local)
        return
    skip = pytest.mark.skip(reason="needs the shared backends: runs in the --backend=s3pg pass of `make test`")
    for item in items:
        if "shared_store" in item.keywords:
            item.add_marker(skip)


@dataclass
class SharedServices:
    postgres: services.Postgres
    ceph: services.CephRgw
    bucket: str = "blobstore-tests"

    def backends(self) -> BackendConfig:
        """A fresh, empty store: its own PostgreSQL schema and its own key prefix in the bucket."""
        name = "t" + uuid.uuid4().hex[:16]
        return BackendConfig(
            chunk_store="s3",
            index="postgres",
            s3=S3Config(
                endpoint=self.ceph.endpoint,
                bucket=self.bucket,
                prefix=name,
                region=self.ceph.region,
                access_key=self.ceph.access_key,
                secret_key=self.ceph.secret_key,
            ),
            postgres=PostgresConfig(dsn=self.postgres.dsn, schema=name, pool_size=8),
        )


@pytest.fixture(scope="session")
def shared_services(request: pytest.FixtureRequest) -> Iterator[SharedServices]:
    """PostgreSQL and Ceph's RADOS Gateway, installed if missing and started once per session."""
    try:
        postgres = services.Postgres().start()
    except services.Unavailable as exc:
        pytest.skip(f"SKIPPING the s3pg backend tests: PostgreSQL cannot run here: {exc}")
    try:
        try:
            ceph = services.CephRgw().start()
        except services.Unavailable as exc:
            pytest.skip(f"SKIPPING the s3pg backend tests: Ceph's RADOS Gateway cannot run here: {exc}")
        try:
            yield SharedServices(postgres, ceph)
        finally:
            ceph.stop()
    finally:
        postgres.stop()


_test_backends: contextvars.ContextVar[BackendConfig | None] = contextvars.ContextVar("test_backends", default=None)


@pytest.fixture
def backends(request: pytest.FixtureRequest) -> Iterator[BackendConfig]:
    """The backend pair of this test's store (one store per test, also across server restarts)."""
    if request.config.getoption("--backend") != "s3pg":
        yield BackendConfig()
        return
    shared: SharedServices = request.getfixturevalue("shared_services")
    config = shared.backends()
    token = _test_backends.set(config)
    try:
        yield config
    finally:
        _test_backends.reset(token)
        _drop_store(config)


def _drop_store(config: BackendConfig) -> None:
    from blobstore.server.pgindex import PostgresIndex
    from blobstore.server.s3store import S3ChunkStore

    index = PostgresIndex(config.postgres)
    try:
        index.drop_schema()
    finally:
        index.close()
    chunks = S3ChunkStore(config.s3)
    try:
        for digest in list(chunks.iter_digests()):
            chunks.delete(digest)
    finally:
        chunks.close()


@pytest.fixture(autouse=True)
def _backend_for_started_servers(request: pytest.FixtureRequest) -> None:
    # start_server() is a plain function: in the s3pg pass it must find this test's store.
    if request.config.getoption("--backend") == "s3pg" and _test_backends.get() is None:
        request.getfixturevalue("backends")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def run() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture
def engine(tmp_path: Path, backends: BackendConfig) -> Iterator[Engine]:
    engine = open_engine(str(tmp_path / "data"), EngineConfig(chunk_size=TEST_CHUNK_SIZE), backends=backends)
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
    shared = _test_backends.get()
    if shared is not None:
        for name, value in shared.server_settings().items():
            overrides.setdefault(name, value)
        overrides.setdefault("url_signing_secrets", (SHARED_SIGNING_SECRET,))
    overrides.setdefault("port", 0)
    overrides.setdefault("engine", EngineConfig(chunk_size=TEST_CHUNK_SIZE))
    config = ServerConfig(data_dir=str(data_dir), **overrides)

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
