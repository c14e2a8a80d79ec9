"""Three replicas serving one store (S3 chunks + PostgreSQL index), clients spread across them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from click.testing import CliRunner

from blobstore.client import PreconditionError, Storage, cli
from blobstore.client.errors import AuthenticationError
from blobstore.internal import records_pb2 as rec
from blobstore.server import schema
from blobstore.server.backends import BackendConfig
from blobstore.server.model import ANONYMOUS
from blobstore.server.pgindex import PostgresIndex
from blobstore.server.s3store import S3ChunkStore
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server, stop_server

pytestmark = pytest.mark.shared_store

MiB = 1 << 20


@pytest.fixture
def replicas(tmp_path: Path, backends: BackendConfig) -> Iterator[list[RunningServer]]:
    started: list[RunningServer] = []
    try:
        for i in range(3):
            started.append(start_server(tmp_path / f"replica{i}", **backends.server_settings()))
        yield started
    finally:
        for running in started:
            if not running.loop.loop.is_closed():
                stop_server(running)


@pytest.fixture
def clients(replicas: list[RunningServer]) -> Iterator[list[Storage]]:
    opened = [r.client() for r in replicas]
    yield opened
    for client in opened:
        client.close()


def _value(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def _assert_store_consistent(replicas: list[RunningServer], backends: BackendConfig) -> None:
    """Once every replica has stopped (and finished its background collection): every
    referenced chunk exists, no chunk object outlives its last reference, and no lease
    or tombstone is left behind."""
    for running in replicas:
        if not running.loop.loop.is_closed():
            stop_server(running)
    index, chunks = PostgresIndex(backends.postgres), S3ChunkStore(backends.s3)
    try:
        with index.reader() as r:
            referenced = {bytes(k) for k, _ in r.scan(schema.CHUNKS, b"")}
            leases = list(r.scan(schema.CHUNK_LEASES, b""))
            tombstones = list(r.scan(schema.CHUNK_TOMBSTONES, b""))
        stored = set(chunks.iter_digests())
    finally:
        index.close()
        chunks.close()
    assert referenced <= stored, "a referenced chunk is missing from the chunk store"
    assert stored == referenced, "an unreferenced chunk was left in the chunk store"
    assert leases == []
    assert tombstones == []


def test_every_acknowledged_write_reads_back_from_every_replica(
    replicas: list[RunningServer], clients: list[Storage], backends: BackendConfig
) -> None:
    sizes = [0, 100, 70_000, MiB, 3 * MiB + 17]
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda w: _run_worker(w, clients, acknowledged, lock, sizes), range(6)))
    assert acknowledged
    for client in clients:
        for key, value in acknowledged.items():
            assert client.get(key) == value, f"{key} differs on {client.address}"
        listed = set(client.list())
        assert listed == set(acknowledged)
    usage = replicas[0].engine.usage(ANONYMOUS.namespace)
    assert usage.bytes == sum(len(v) for v in acknowledged.values())
    assert usage.objects == len(acknowledged)
    _assert_store_consistent(replicas, backends)


def _run_worker(
    worker: int, clients: list[Storage], acknowledged: dict[str, bytes], lock: threading.Lock, sizes: list[int]
) -> None:
    rng = random.Random(worker)
    for step in range(12):
        client = clients[(worker + step) % len(clients)]
        key = f"w{worker}/k{rng.randrange(4)}"
        if rng.random() < 0.25:
            try:
                client.delete(key)
            except LookupError:
                pass
            with lock:
                acknowledged.pop(key, None)
            continue
        # A few seeds only: replicas store, share and release the same chunks concurrently.
        value = _value(rng.randrange(3), rng.choice(sizes))
        client.set(key, value)
        with lock:
            acknowledged[key] = value


def test_exactly_one_of_racing_create_only_writes_wins(clients: list[Storage]) -> None:
    rounds = 15
    barrier = threading.Barrier(len(clients))
    outcomes: list[list[str]] = [[] for _ in range(rounds)]

    def contender(index: int) -> None:
        client = clients[index]
        for round_number in range(rounds):
            barrier.wait()
            try:
                client.set(f"race{round_number}", f"from {index}", if_generation_match=0)
                outcomes[round_number].append(f"won {index}")
            except PreconditionError:
                outcomes[round_number].append("lost")

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for round_number, outcome in enumerate(outcomes):
        winners = [o for o in outcome if o.startswith("won")]
        assert len(winners) == 1, f"round {round_number}: {outcome}"
        winner = winners[0].split()[1]
        for client in clients:
            assert client.get(f"race{round_number}") == f"from {winner}".encode()


def test_a_chunk_released_on_one_replica_while_another_reuses_it_survives(
    replicas: list[RunningServer], clients: list[Storage], backends: BackendConfig
) -> None:
    # Every replica keeps writing, reading back (through another replica) and deleting an
    # object of the same bytes: each delete drops the shared chunk to no references while
    # another replica's upload is about to reference it. The collector of the first must
    # never delete a chunk the second has stored or found and is about to commit.
    value = _value(7, 200_000)
    failures: list[str] = []

    def churn(index: int) -> None:
        writer, reader = clients[index], clients[(index + 1) % len(clients)]
        for step in range(40):
            key = f"churn{index}"
            writer.set(key, value)
            try:
                if reader.get(key) != value:
                    failures.append(f"{key} step {step}: wrong bytes")
            except Exception as exc:
                failures.append(f"{key} step {step}: {exc!r}")
            writer.delete(key)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    _assert_store_consistent(replicas, backends)


def test_a_replica_that_died_leaves_leases_that_expire_and_free_its_chunks(
    replicas: list[RunningServer], clients: list[Storage], backends: BackendConfig
) -> None:
    dead, survivor = replicas[0].engine, replicas[1].engine
    digest = hashlib.sha256(b"orphan").digest()
    dead._pin([digest])
    dead.chunks.put(digest, b"orphan")
    # The survivor must not take the chunk while the lease stands...
    survivor._collect([digest])
    assert survivor.chunks.exists(digest)
    assert survivor.sweep_leases() == {"candidates": 0, "deleted": 0}
    # ...and frees it once the lease has expired (the dead replica never unpins).
    assert survivor._leases is not None
    survivor._leases.clock = lambda: dead.clock() + dead.config.chunk_lease_ttl_ns + 1
    assert survivor.sweep_leases() == {"candidates": 1, "deleted": 1}
    assert not survivor.chunks.exists(digest)
    dead._leases._pins.clear()  # type: ignore[union-attr]


def test_a_read_that_ends_while_its_replica_stops_still_collects_what_it_held(
    replicas: list[RunningServer], clients: list[Storage], backends: BackendConfig
) -> None:
    # A read's pins are released on a worker after its call returns; if the replica is stopping
    # by then, the worker pool takes no more jobs. The chunk it held (whose last reference went
    # meanwhile) must still go: with the lease dropped and no tombstone, no sweep finds it later.
    stopping = replicas[0].engine
    digest = hashlib.sha256(b"held by a read").digest()
    stopping._pin([digest])
    stopping.chunks.put(digest, b"held by a read")
    stopping.executor.shutdown(wait=True)
    stopping._unpin_and_collect([digest])
    assert not stopping.chunks.exists(digest)
    _assert_store_consistent(replicas, backends)


def test_a_signed_url_made_by_one_replica_works_on_the_others(
    replicas: list[RunningServer], clients: list[Storage]
) -> None:
    value = _value(3, 300_000)
    upload_url = clients[0].get_upload_url("signed")
    download_url = clients[0].get_signed_url("signed")
    first, second, third = (r.server.ports["http"] for r in replicas)

    def on(url: str, port: int) -> str:
        return url.replace(f":{first}/", f":{port}/", 1)

    put = requests.put(on(upload_url, second), data=value, timeout=60)
    assert put.status_code in (200, 201), put.text
    got = requests.get(on(download_url, third), timeout=60)
    assert got.status_code == 200 and got.content == value
    forged = requests.get(on(download_url.replace("sig=", "sig=0"), third), timeout=60)
    assert forged.status_code in (401, 403)


def test_a_token_made_with_the_cli_works_on_every_replica(
    tmp_path: Path, backends: BackendConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (
        ("BLOBSTORE_INDEX", "postgres"),
        ("BLOBSTORE_POSTGRES_DSN", backends.postgres.dsn),
        ("BLOBSTORE_POSTGRES_SCHEMA", backends.postgres.schema),
    ):
        monkeypatch.setenv(name, value)
    made = CliRunner().invoke(cli.main, ["token", "create", "--data-dir", str(tmp_path / "cli"), "--namespace", "team"])
    assert made.exit_code == 0, made.output
    token = made.stdout.splitlines()[0]
    replicas = [start_server(tmp_path / f"r{i}", **backends.server_settings()) for i in range(2)]
    try:
        with Storage(replicas[0].address, token) as first, Storage(replicas[1].address, token) as second:
            first.set("mine", b"team data")
            assert second.get("mine") == b"team data"
        with Storage(replicas[1].address) as anonymous, pytest.raises(AuthenticationError):
            anonymous.get("mine")  # the store has tokens now: every replica asks for one
    finally:
        for running in replicas:
            stop_server(running)


def _supports_resumable_uploads(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StorageStub(channel)
        try:
            stub.QueryUpload(pb.QueryUploadRequest(upload_id="probe"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code() != grpc.StatusCode.UNIMPLEMENTED  # type: ignore[no-any-return]
        return True


def test_an_upload_interrupted_by_a_dying_replica_resumes_through_another(
    replicas: list[RunningServer], clients: list[Storage]
) -> None:
    if not _supports_resumable_uploads(replicas[0].address):
        pytest.skip("resumable upload sessions (StartUpload/QueryUpload, issue 5) are not implemented yet")
    value = os.urandom(5 * MiB + 3)
    first, second = replicas[0], replicas[1]
    spec = pb.UploadSpec(key="resumed", size=len(value))
    with grpc.insecure_channel(first.address) as channel:
        stub = pb_grpc.StorageStub(channel)
        upload_id = stub.StartUpload(pb.StartUploadRequest(spec=spec), timeout=30).upload_id
        sent = threading.Event()

        def messages() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(upload_id=upload_id, write_offset=0, data=value[: 2 * MiB])
            yield pb.UploadRequest(write_offset=2 * MiB, data=value[2 * MiB : 3 * MiB])
            sent.set()
            threading.Event().wait(60)  # the replica dies before the stream goes on

        call = stub.Upload.future(messages(), timeout=60)
        sent.wait(30)
        _wait_persisted(second.address, upload_id, lambda size: size > 0)
        stop_server(first, grace=0)
        with pytest.raises(grpc.RpcError):
            call.result()
    with grpc.insecure_channel(second.address) as channel:
        stub = pb_grpc.StorageStub(channel)
        persisted = stub.QueryUpload(pb.QueryUploadRequest(upload_id=upload_id), timeout=30).persisted_size
        assert 0 < persisted <= 3 * MiB

        def rest() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(
                upload_id=upload_id, write_offset=persisted, data=value[persisted:], finish_write=True
            )

        response = stub.Upload(rest(), timeout=60)
        assert response.object.size == len(value)
    for client in clients[1:]:
        assert client.get("resumed") == value


def _wait_persisted(address: str, upload_id: str, done: Callable[[int], bool]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StorageStub(channel)
        for _ in range(600):
            response: Any = stub.QueryUpload(pb.QueryUploadRequest(upload_id=upload_id), timeout=10)
            if done(response.persisted_size):
                return
            threading.Event().wait(0.05)
    raise AssertionError("the first replica never persisted any of the upload")


def test_replicas_with_different_chunk_sizes_read_each_others_objects(tmp_path: Path, backends: BackendConfig) -> None:
    # Chunks are named by their content: a store whose chunk size changed holds both sizes,
    # and every replica reads them all, whichever size it writes itself.
    chunk_sizes = [MiB, 2 * MiB]
    started = [
        start_server(tmp_path / f"sized{i}", s3=dataclasses.replace(backends.s3, chunk_size=size))
        for i, size in enumerate(chunk_sizes)
    ]
    clients = [running.client() for running in started]
    try:
        values = {f"made-by-{i}": _value(100 + i, 5 * MiB + 17) for i in range(len(clients))}
        for i, client in enumerate(clients):
            client.set(f"made-by-{i}", values[f"made-by-{i}"])
        for client in clients:
            for key, value in values.items():
                assert client.get(key) == value, f"{key} differs on {client.address}"
        with started[0].engine.index.reader() as r:
            stored_sizes = {rec.ChunkRecord.FromString(raw).size for _, raw in r.scan(schema.CHUNKS, b"")}
        assert set(chunk_sizes) <= stored_sizes
    finally:
        for client in clients:
            client.close()
    _assert_store_consistent(started, backends)
