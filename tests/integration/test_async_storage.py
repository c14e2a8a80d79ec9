"""AsyncStorage against a real server, and both clients shared by concurrent tasks and threads."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from blobstore.client import AsyncStorage, NotFoundError, PreconditionError, Storage
from tests.conftest import RunningServer


def blob(seed: int, size: int) -> bytes:
    """Deterministic bytes, distinct per seed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def test_async_round_trip_of_every_method(server: RunningServer, tmp_path: Path, run) -> None:
    async def scenario() -> None:
        async with AsyncStorage(server.address) as storage:
            info = await storage.set("notes/a", "Hello Storage")
            assert info.content_type.startswith("text/plain")
            assert await storage.get("notes/a") == b"Hello Storage"
            large = blob(1, (3 << 20) + 17)  # over the unary limit: set and get stream by themselves
            assert (await storage.set("notes/large", large)).size == len(large)
            assert await storage.get("notes/large") == large

            source = tmp_path / "source.bin"
            source.write_bytes(blob(2, 5 << 20))
            sent: list[int] = []
            await storage.set_file("files/one", str(source), metadata={"k": "v"}, progress=sent.append)
            assert sum(sent) == 5 << 20
            received: list[int] = []
            target = tmp_path / "copy.bin"
            fetched = await storage.get_file("files/one", target, progress=received.append)
            assert target.read_bytes() == source.read_bytes()
            assert sum(received) == 5 << 20 and fetched.metadata == {"k": "v"}
            buffer = io.BytesIO()
            await storage.get_file("files/one", buffer)
            assert buffer.getvalue() == source.read_bytes()

            assert await storage.exists("files/one")
            assert (await storage.stat("files/one")).size == 5 << 20
            assert await storage.list("notes/") == ["notes/a", "notes/large"]
            assert [key async for key in storage.iter_list(page_size=1)] == ["files/one", "notes/a", "notes/large"]
            assert await storage.list_prefixes() == ([], ["files/", "notes/"])
            assert (await storage.limits()).chunk_size_bytes == server.engine.config.chunk_size

            with pytest.raises(PreconditionError):
                await storage.set("notes/a", b"x", if_generation_match=0)
            await storage.delete("notes/a")
            assert not await storage.exists("notes/a")
            with pytest.raises(NotFoundError):
                await storage.get("notes/a")
            with pytest.raises(NotFoundError):
                await storage.get_file("notes/a", tmp_path / "never")
            assert not (tmp_path / "never").exists()
            download_url = await storage.get_signed_url("files/one")
            assert requests.get(download_url, timeout=60).content == source.read_bytes()
            upload_url = await storage.get_upload_url("via/url")
            assert requests.put(upload_url, data=b"put over http", timeout=60).status_code in (200, 201)
            assert await storage.get("via/url") == b"put over http"
            assert await storage.set("tmp-key", b"t", storage_type="tmp")
            assert await storage.list(storage_type="tmp") == ["tmp-key"]

    run(scenario())


def test_one_async_storage_shared_by_many_tasks(server: RunningServer, run) -> None:
    sizes = [10, 70_000, (1 << 20) + 5, 2 << 20] * 5

    async def worker(storage: AsyncStorage, n: int) -> bytes:
        value = blob(n, sizes[n])
        await storage.set(f"task/{n:02d}", value)
        return await storage.get(f"task/{n:02d}")

    async def scenario() -> None:
        async with AsyncStorage(server.address) as storage:
            results = await asyncio.gather(*(worker(storage, n) for n in range(len(sizes))))
            assert [len(r) for r in results] == sizes
            assert all(result == blob(n, sizes[n]) for n, result in enumerate(results))
            assert len(await storage.list("task/")) == len(sizes)

    run(scenario())


def test_one_storage_shared_by_many_threads(server: RunningServer, tmp_path: Path) -> None:
    def worker(n: int) -> bool:
        value = blob(n, [100, (2 << 20) + 3][n % 2])
        storage.set(f"thread/{n:02d}", value)
        target = tmp_path / f"out-{n}"
        storage.get_file(f"thread/{n:02d}", target)
        return storage.get(f"thread/{n:02d}") == value == target.read_bytes()

    with server.client() as storage, ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(worker, range(16)))
        assert len(storage.list("thread/")) == 16


def test_context_managers_close_the_channel(server: RunningServer, run) -> None:
    with Storage(server.address) as storage:
        storage.set("k", b"v")
    with pytest.raises(ValueError, match="closed channel"):
        storage.get("k")

    async def scenario() -> AsyncStorage:
        async with AsyncStorage(server.address) as client:
            assert await client.get("k") == b"v"
        return client

    closed = run(scenario())

    async def after() -> None:
        await closed.get("k")

    with pytest.raises(Exception, match="closed"):
        run(after())


def test_env_address_is_the_default(server: RunningServer, run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOBSTORE_ADDRESS", server.address)

    async def scenario() -> bytes:
        async with AsyncStorage() as storage:
            await storage.set("env", os.urandom(8))
            return await storage.get("env")

    assert len(run(scenario())) == 8
