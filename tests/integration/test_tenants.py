"""Tenants through a real server: tokens, isolation across every RPC, storage-type rules, quotas."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from blobstore.client import (
    AsyncStorage,
    AuthenticationError,
    InvalidArgumentError,
    Limits,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    Storage,
    StorageError,
)
from blobstore.server import quotas
from blobstore.server.auth import TokenStore
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import FakeClock, RunningServer, start_server, stop_server

MiB = 1 << 20
DAY = 86_400


@dataclass
class Tenants:
    server: RunningServer
    tokens: TokenStore
    clock: FakeClock
    alice: Storage
    bob: Storage
    alice_catalog: Storage
    token: dict[str, str]

    def client(self, name: str) -> Storage:
        return self.server.client(token=self.token[name])

    def set_quota(self, namespace: str, **limits: int | float | None) -> None:
        self.server.engine.index.submit(lambda txn: quotas.set_override(txn, namespace, **limits)).result()

    def stub(self, name: str) -> tuple[pb_grpc.StorageStub, tuple[tuple[str, str], ...]]:
        channel = grpc.insecure_channel(self.server.address)
        self._channels.append(channel)
        return pb_grpc.StorageStub(channel), (("authorization", f"Bearer {self.token[name]}"),)

    _channels: list[grpc.Channel] = dataclasses.field(default_factory=list)


@pytest.fixture
def tenants(tmp_path: Path, clock: FakeClock) -> Iterator[Tenants]:
    running = start_server(tmp_path / "data", clock=clock, http_port=0)
    store = TokenStore(running.engine.index, clock=clock)
    token = {
        "alice": store.create("alice")[0],
        "bob": store.create("bob")[0],
        "alice-catalog": store.create("alice", ["catalog"])[0],
        "bob-catalog": store.create("bob", ["catalog"])[0],
    }
    tenants = Tenants(
        running,
        store,
        clock,
        alice=running.client(token=token["alice"]),
        bob=running.client(token=token["bob"]),
        alice_catalog=running.client(token=token["alice-catalog"]),
        token=token,
    )
    yield tenants
    for client in (tenants.alice, tenants.bob, tenants.alice_catalog):
        client.close()
    for channel in tenants._channels:
        channel.close()
    stop_server(running)


def outcome(call: Callable[[], Any]) -> tuple[str, str, str]:
    """What a caller can learn from a call: status, message, reason (or the result)."""
    try:
        result = call()
    except StorageError as exc:
        return exc.code.name, exc.message, exc.reason
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", ""
    return "OK", repr(result), ""


def big_value(seed: int, size: int = 3 * MiB) -> bytes:
    return bytes([seed % 256]) * (size // 2) + bytes([(seed + 1) % 256]) * (size - size // 2)


# ---------------------------------------------------------------------- authentication


def test_requests_without_a_valid_token_are_unauthenticated(tenants: Tenants, tmp_path: Path) -> None:
    tenants.alice.set("k", b"v")
    anonymous = tenants.server.client()
    forged = tenants.server.client(token="bst_" + "A" * 43)
    source = tmp_path / "f"
    source.write_bytes(b"x" * 100)
    for client in (anonymous, forged):
        calls: list[Callable[[], object]] = [
            partial(client.get, "k"),
            partial(client.set, "k", b"v"),
            partial(client.set_file, "k", source),
            partial(client.get_file, "k", io.BytesIO()),
            partial(client.stat, "k"),
            partial(client.delete, "k"),
            partial(client.list),
            partial(client.limits),
        ]
        for call in calls:
            with pytest.raises(AuthenticationError):
                call()
        client.close()
    with pytest.raises(AuthenticationError, match="requires a bearer token"):
        tenants.server.client().stat("k")
    assert tenants.alice.get("k") == b"v"


def test_a_revoked_token_stops_working_at_once(tenants: Tenants) -> None:
    carol_token, info = tenants.tokens.create("carol")
    with tenants.server.client(token=carol_token) as carol:
        carol.set("k", b"v")
        tenants.tokens.revoke(info.id)
        with pytest.raises(AuthenticationError, match="unknown or revoked"):
            carol.get("k")


def test_the_token_comes_from_the_environment(tenants: Tenants, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOBSTORE_TOKEN", tenants.token["bob"])
    with Storage(tenants.server.address) as from_env:
        assert from_env.limits().namespace == "bob"


# ---------------------------------------------------------------------- isolation


def test_no_call_with_alices_token_learns_anything_about_bobs_keys(tenants: Tenants) -> None:
    alice, bob = tenants.alice, tenants.bob
    stub, metadata = tenants.stub("alice")

    def observe() -> list[tuple[str, str, str]]:
        seen = []
        for t in ("data", "tmp", "result", "logs", "products"):
            seen += [
                outcome(partial(alice.get, "secret", t)),
                outcome(partial(alice.stat, "secret", t)),
                outcome(partial(alice.exists, "secret", t)),
                outcome(partial(alice.delete, "secret", t)),
                outcome(partial(alice.get_file, "big", io.BytesIO(), t)),
                outcome(partial(alice.list, "sec", t)),
                outcome(partial(alice.list_prefixes, "", "/", t)),
                outcome(partial(alice.set, "secret", b"mine", t, if_generation_match=generation)),
            ]
        seen += [
            outcome(lambda: alice.delete("secret", if_generation_match=generation)),
            outcome(lambda: stub.Get(pb.GetRequest(key="secret", generation=generation), metadata=metadata)),
            outcome(lambda: list(stub.Download(pb.DownloadRequest(key="big", read_offset=MiB), metadata=metadata))),
            outcome(lambda: (alice.limits().namespace, alice.limits().bytes, alice.limits().objects)),
            outcome(lambda: stub.BatchGet(pb.BatchGetRequest(keys=["secret", "big"]), metadata=metadata)),
            outcome(lambda: stub.QueryUpload(pb.QueryUploadRequest(upload_id=bob_upload_id), metadata=metadata)),
            outcome(lambda: stub.CancelUpload(pb.CancelUploadRequest(upload_id=bob_upload_id), metadata=metadata)),
        ]
        return seen

    generation = 0
    bob_upload_id = "no-such-session"
    for storage_type in ("data", "tmp", "result", "logs", "products"):
        generation = bob.set("secret", b"bob's", storage_type).generation
        bob.set_file("big", io.BytesIO(big_value(1)), storage_type)
    bob_stub, bob_metadata = tenants.stub("bob")
    try:
        request = pb.StartUploadRequest(spec=pb.UploadSpec(key="s"))
        bob_upload_id = bob_stub.StartUpload(request, metadata=bob_metadata).upload_id
    except grpc.RpcError as exc:  # a build without sessions
        assert exc.code() == grpc.StatusCode.UNIMPLEMENTED

    while_bob_has_them = observe()
    for storage_type in ("data", "tmp", "result", "logs"):
        bob.delete("secret", storage_type)
        bob.delete("big", storage_type)
    with tenants.server.client(token=tenants.token["bob-catalog"]) as bob_catalog:
        bob_catalog.delete("secret", "products")
        bob_catalog.delete("big", "products")
    after_bob_deleted_them = observe()

    assert while_bob_has_them == after_bob_deleted_them
    codes = {code for code, _, _ in while_bob_has_them}
    assert "OK" in codes and "NOT_FOUND" in codes and "FAILED_PRECONDITION" in codes
    assert not any("bob" in message for _, message, _ in while_bob_has_them)
    assert tenants.server.engine.usage("alice").objects == 0


def test_writes_with_alices_token_never_touch_bobs_keys(tenants: Tenants) -> None:
    alice, bob = tenants.alice, tenants.bob
    bob.set("shared-name", b"bob's value")
    bob.set_file("shared-big", io.BytesIO(big_value(7)))
    alice.set("shared-name", b"alice's value", if_generation_match=0)  # it does not exist for her
    alice.set_file("shared-big", io.BytesIO(big_value(9)))
    assert bob.get("shared-name") == b"bob's value"
    assert bob.get("shared-big") == big_value(7)
    assert alice.get("shared-big") == big_value(9)
    alice.delete("shared-name")
    alice.delete("shared-big")
    assert bob.get("shared-name") == b"bob's value"
    assert bob.list() == ["shared-big", "shared-name"]
    assert alice.list() == []
    assert alice.limits().objects.used == 0
    assert bob.limits().bytes.used == len(b"bob's value") + 3 * MiB


def test_signed_urls_are_bound_to_the_namespace_that_made_them(tenants: Tenants) -> None:
    alice, bob = tenants.alice, tenants.bob
    bob.set("secret", b"bob's")
    alice_get = requests.get(alice.get_signed_url("secret"), timeout=30)
    never = requests.get(alice.get_signed_url("never-existed"), timeout=30)
    assert alice_get.status_code == 404
    assert (alice_get.status_code, alice_get.text.replace("secret", "never-existed")) == (never.status_code, never.text)
    assert requests.head(alice.get_signed_url("secret"), timeout=30).status_code == 404
    assert requests.put(alice.get_upload_url("secret"), data=b"alice's", timeout=30).ok
    assert bob.get("secret") == b"bob's"
    assert alice.get("secret") == b"alice's"
    assert requests.get(bob.get_signed_url("secret"), timeout=30).content == b"bob's"
    # Moving a URL into another namespace breaks its signature.
    forged = bob.get_signed_url("secret").replace("ns=bob", "ns=alice")
    assert forged != bob.get_signed_url("secret")
    assert requests.get(forged, timeout=30).status_code == 403


def test_upload_sessions_are_bound_to_their_namespace(tenants: Tenants) -> None:
    stub, metadata = tenants.stub("alice")
    bob_stub, bob_metadata = tenants.stub("bob")
    started = outcome(lambda: stub.StartUpload(pb.StartUploadRequest(spec=pb.UploadSpec(key="s")), metadata=metadata))
    if started[0] == "UNIMPLEMENTED":
        pytest.skip("resumable upload sessions are not in this build")
    upload_id = stub.StartUpload(pb.StartUploadRequest(spec=pb.UploadSpec(key="s")), metadata=metadata).upload_id
    missing = "x" * len(upload_id)
    for probe in (upload_id, missing):
        with pytest.raises(grpc.RpcError) as query:
            bob_stub.QueryUpload(pb.QueryUploadRequest(upload_id=probe), metadata=bob_metadata)
        assert query.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as cancel:
            bob_stub.CancelUpload(pb.CancelUploadRequest(upload_id=probe), metadata=bob_metadata)
        assert cancel.value.code() == grpc.StatusCode.NOT_FOUND
        resume = iter([pb.UploadRequest(upload_id=probe, data=b"bob", finish_write=True)])
        with pytest.raises(grpc.RpcError) as upload:
            bob_stub.Upload(resume, metadata=bob_metadata)
        assert upload.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.QueryUpload(pb.QueryUploadRequest(upload_id=upload_id), metadata=metadata).persisted_size == 0
    assert tenants.bob.list() == []


def test_batch_calls_stay_in_the_callers_namespace(tenants: Tenants) -> None:
    stub, metadata = tenants.stub("alice")
    tenants.bob.set("secret", b"bob's")
    entries = [pb.BatchSetEntry(key="secret", value=b"alice's"), pb.BatchSetEntry(key="other", value=b"x")]
    try:
        stub.BatchSet(pb.BatchSetRequest(entries=entries), metadata=metadata)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        pytest.skip("batch calls are not in this build")
    assert tenants.bob.get("secret") == b"bob's"
    assert tenants.bob.list() == ["secret"]
    got = stub.BatchGet(pb.BatchGetRequest(keys=["secret", "other"]), metadata=metadata)
    assert [result.value for result in got.results] == [b"alice's", b"x"]


# ---------------------------------------------------------------------- storage types


def test_products_for_a_user_and_for_the_catalog(tenants: Tenants, tmp_path: Path) -> None:
    alice, catalog = tenants.alice, tenants.alice_catalog
    raster = tmp_path / "scene.tif"
    raster.write_bytes(big_value(3))
    alice.set("small.tif", b"tiny raster", "products")
    alice.set_file("scene.tif", raster, "products")
    assert alice.stat("scene.tif", "products").size == 3 * MiB
    assert alice.list(storage_type="products") == ["scene.tif", "small.tif"]
    for call in (
        lambda: alice.get("small.tif", "products"),
        lambda: alice.get_file("scene.tif", io.BytesIO(), "products"),
        lambda: alice.delete("small.tif", "products"),
    ):
        with pytest.raises(PreconditionError, match="read and removed through the catalog") as refused:
            call()
        assert refused.value.reason == "FORBIDDEN_BY_STORAGE_TYPE"

    assert catalog.get("small.tif", "products") == b"tiny raster"
    out = io.BytesIO()
    catalog.get_file("scene.tif", out, "products")
    assert out.getvalue() == big_value(3)
    catalog.delete("small.tif", "products")
    assert not alice.exists("small.tif", "products")
    # A catalog token acts in its own namespace only.
    with tenants.server.client(token=tenants.token["bob-catalog"]) as bob_catalog, pytest.raises(NotFoundError):
        bob_catalog.get("scene.tif", "products")


def test_signed_get_of_products_needs_the_catalog_role(tenants: Tenants) -> None:
    put_url = tenants.alice.get_upload_url("p.tif", "products")
    assert requests.put(put_url, data=b"raster", timeout=30).ok
    with pytest.raises(PreconditionError, match="read and removed through the catalog") as refused:
        tenants.alice.get_signed_url("p.tif", "products")
    assert refused.value.reason == "FORBIDDEN_BY_STORAGE_TYPE"
    catalog_url = tenants.alice_catalog.get_signed_url("p.tif", "products")
    assert requests.get(catalog_url, timeout=30).content == b"raster"


def test_tmp_objects_expire_on_the_servers_clock(tenants: Tenants) -> None:
    alice = tenants.alice
    info = alice.set("scratch", b"temporary", "tmp")
    alice.set_file("scratch-big", io.BytesIO(big_value(5)), "tmp")
    assert info.expires is not None and info.updated is not None
    assert (info.expires - info.updated).total_seconds() == 7 * DAY
    tenants.clock.advance(7 * DAY)
    with pytest.raises(NotFoundError):
        alice.get("scratch", "tmp")
    with pytest.raises(NotFoundError):
        alice.get_file("scratch-big", io.BytesIO(), "tmp")
    assert alice.list(storage_type="tmp") == []
    engine = tenants.server.engine
    assert tenants.server.loop.call(engine.reap_expired()) == 2
    assert alice.limits().objects.used == 0


def test_an_unknown_storage_type_is_invalid_and_lists_the_valid_ones(tenants: Tenants) -> None:
    stub, metadata = tenants.stub("alice")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Set(pb.SetRequest(key="k", storage_type=42, value=b"v"), metadata=metadata)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data, tmp, products, result, logs" in (caught.value.details() or "")
    with pytest.raises(InvalidArgumentError, match="valid storage types"):
        tenants.alice.set("k", b"v", "scratch")


# ---------------------------------------------------------------------- quotas and limits


def test_byte_quota_hit_leaves_nothing_behind_and_recovers(tenants: Tenants, tmp_path: Path) -> None:
    tenants.set_quota("alice", max_bytes=2 * MiB + 100)
    alice = tenants.alice
    alice.set("small", b"x" * 100)
    too_big = tmp_path / "too-big"
    too_big.write_bytes(big_value(11, 4 * MiB))
    with pytest.raises(ResourceExhaustedError, match="max_bytes") as caught:
        alice.set_file("big", too_big)
    assert caught.value.reason == "QUOTA_EXCEEDED"
    assert not alice.exists("big")
    assert list(tenants.server.engine.chunks.iter_digests()) == []
    put = requests.put(alice.get_upload_url("big"), data=too_big.read_bytes(), timeout=30)
    assert put.status_code == 507 and "max_bytes" in put.text
    assert not alice.exists("big")
    assert list(tenants.server.engine.chunks.iter_digests()) == []
    alice.set_file("big", io.BytesIO(big_value(12, 2 * MiB)))  # exactly to the limit
    with pytest.raises(ResourceExhaustedError, match="max_bytes"):
        alice.set("one-more", b"!")
    tenants.bob.set("one-more", b"!")  # bob's quota is his own
    alice.delete("small")
    alice.set("one-more", b"!")
    assert alice.limits().bytes.used == 2 * MiB + 1


def test_object_quota_hit_and_recovered(tenants: Tenants) -> None:
    tenants.set_quota("alice", max_objects=2)
    alice = tenants.alice
    alice.set("a", b"1")
    alice.set("b", b"2", "logs")
    with pytest.raises(ResourceExhaustedError, match="max_objects"):
        alice.set("c", b"3")
    with pytest.raises(ResourceExhaustedError, match="max_objects"):
        alice.set_file("c", io.BytesIO(big_value(2)))
    alice.set("a", b"overwrite adds no object")
    alice.delete("b", "logs")
    alice.set("c", b"3")
    assert sorted(alice.list()) == ["a", "c"]


def test_open_upload_session_quota_hit_and_recovered(tenants: Tenants) -> None:
    stub, metadata = tenants.stub("alice")

    def start(key: str) -> Any:
        return stub.StartUpload(pb.StartUploadRequest(spec=pb.UploadSpec(key=key)), metadata=metadata)

    if outcome(lambda: start("probe"))[0] == "UNIMPLEMENTED":
        pytest.skip("resumable upload sessions are not in this build")
    tenants.set_quota("alice", max_open_uploads=2)
    first = start("one").upload_id
    with pytest.raises(grpc.RpcError) as caught:
        start("two")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_open_uploads" in (caught.value.details() or "")
    stub.CancelUpload(pb.CancelUploadRequest(upload_id=first), metadata=metadata)
    start("two")
    assert tenants.alice.limits().open_uploads.used == 2


def test_request_rate_hit_and_recovered(tenants: Tenants) -> None:
    tenants.set_quota("alice", requests_per_second=2, burst=3)
    alice = tenants.alice
    for _ in range(3):
        alice.exists("k")
    with pytest.raises(ResourceExhaustedError, match="requests_per_second") as caught:
        alice.exists("k")
    assert caught.value.reason == "RATE_LIMITED"
    tenants.bob.exists("k")  # bob has a bucket of his own
    tenants.clock.advance(0.5)
    alice.exists("k")
    with pytest.raises(ResourceExhaustedError):
        alice.exists("k")


def test_limits_report_the_quotas_and_their_use(tenants: Tenants) -> None:
    tenants.set_quota("alice", max_bytes=10 * MiB, max_objects=0, requests_per_second=50)
    tenants.alice.set("a", b"x" * 1000)
    tenants.alice.set("b", b"x" * 24, "tmp")
    limits = tenants.alice.limits()
    assert limits.namespace == "alice"
    assert (limits.bytes.limit, limits.bytes.used, limits.bytes.remaining) == (10 * MiB, 1024, 10 * MiB - 1024)
    assert (limits.objects.limit, limits.objects.used, limits.objects.remaining) == (None, 2, None)
    assert limits.open_uploads.limit == quotas.QuotaConfig().max_open_uploads
    assert limits.requests_per_second == 50
    assert limits.max_unary_value_bytes == 1 << 20
    bob = tenants.bob.limits()
    assert (bob.namespace, bob.bytes.limit, bob.bytes.used) == ("bob", quotas.QuotaConfig().max_bytes, 0)

    async def from_async_client() -> Limits:
        async with AsyncStorage(tenants.server.address, token=tenants.token["alice"]) as storage:
            return await storage.limits()

    assert asyncio.run(from_async_client()) == limits


# ---------------------------------------------------------------------- open servers


def test_an_open_server_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    from blobstore.server.auth import OpenBindRefused

    with pytest.raises(OpenBindRefused, match="--allow-anonymous"):
        start_server(tmp_path / "data", host="0.0.0.0")
    running = start_server(tmp_path / "data", host="0.0.0.0", allow_anonymous=True)
    try:
        with Storage(f"127.0.0.1:{running.server.ports['grpc']}") as anonymous:
            anonymous.set("k", b"v")
            assert anonymous.limits().namespace == "default"
    finally:
        stop_server(running)


@pytest.mark.file_store
def test_a_server_with_tokens_may_bind_any_address(tmp_path: Path) -> None:
    from blobstore.server.index import LmdbIndex

    index = LmdbIndex(str(tmp_path / "data" / "index"))
    token, _ = TokenStore(index).create("alice")
    index.close()
    running = start_server(tmp_path / "data", host="0.0.0.0")
    try:
        address = f"127.0.0.1:{running.server.ports['grpc']}"
        with Storage(address) as anonymous, pytest.raises(AuthenticationError):
            anonymous.set("k", b"v")
        with Storage(address, token=token) as alice:
            alice.set("k", b"v")
    finally:
        stop_server(running)


def test_loopback_servers_run_open_on_the_default_namespace(storage: Storage) -> None:
    storage.set("k", b"v")
    assert storage.limits().namespace == "default"
