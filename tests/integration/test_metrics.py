"""/metrics scraped over HTTP and parsed as Prometheus would."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from blobstore.client import NotFoundError, Storage
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server, stop_server


def scrape(running: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(f"http://127.0.0.1:{running.server.ports['http']}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def rpc(method: str, code: str = "OK", kind: str = "unary") -> tuple[tuple[str, str], ...]:
    labels = {"grpc_service": "blobstore.v1.Storage", "grpc_method": method, "grpc_type": kind, "grpc_code": code}
    return tuple(sorted(labels.items()))


def test_metrics_count_requests_bytes_latency_and_store(server: RunningServer, storage: Storage) -> None:
    blob = os.urandom(3 << 20)
    storage.set("small", b"tiny")
    assert storage.get("small") == b"tiny"
    with pytest.raises(NotFoundError):
        storage.get("missing")
    storage.set_file("copy-1", _reader(blob))
    storage.set_file("copy-2", _reader(blob))  # the same chunks: stored once
    assert storage.get("copy-1") == blob

    samples = scrape(server)
    assert samples[("grpc_server_handled_total", rpc("Set"))] == 1
    assert samples[("grpc_server_handled_total", rpc("Get", "NOT_FOUND"))] == 1
    # The first Get of copy-1 fails FAILED_PRECONDITION (too large for unary) and the client streams it.
    assert samples[("grpc_server_handled_total", rpc("Get", "FAILED_PRECONDITION"))] == 1
    assert samples[("grpc_server_handled_total", rpc("Upload", kind="client_stream"))] == 2
    assert samples[("grpc_server_handled_total", rpc("Download", kind="server_stream"))] == 1
    latency = tuple(
        sorted({"grpc_service": "blobstore.v1.Storage", "grpc_method": "Get", "grpc_type": "unary"}.items())
    )
    assert samples[("grpc_server_handling_seconds_count", latency)] == 3
    assert samples[("grpc_server_handling_seconds_bucket", (*latency, ("le", "+Inf")))] == 3

    assert samples[("blobstore_received_bytes_total", (("grpc_method", "Upload"),))] > 2 * len(blob)
    assert samples[("blobstore_sent_bytes_total", (("grpc_method", "Download"),))] > len(blob)
    assert samples[("blobstore_sent_bytes_total", (("grpc_method", "Download"),))] < 1.01 * len(blob)

    assert samples[("blobstore_objects", ())] == 3
    assert samples[("blobstore_logical_bytes", ())] == 2 * len(blob) + 4
    assert samples[("blobstore_chunks", ())] == -(-len(blob) // server.engine.config.chunk_size)
    assert samples[("blobstore_chunk_bytes", ())] == len(blob)
    assert samples[("blobstore_dedup_ratio", ())] == 2.0
    assert samples[("blobstore_open_uploads", (("kind", "stream"),))] == 0


def test_health_and_reflection_calls_are_counted_like_storage_calls(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        with pytest.raises(grpc.RpcError) as unknown:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "blobstore.v1.Storage" in ProtoReflectionDescriptorDatabase(channel).get_services()

    def handled(service: str, method: str) -> dict[str, float]:
        """Count by status code of the RPCs of one method."""
        counts = {}
        for (name, labels), value in scrape(server).items():
            fields = dict(labels)
            if name == "grpc_server_handled_total" and (fields["grpc_service"], fields["grpc_method"]) == (
                service,
                method,
            ):
                counts[fields["grpc_code"]] = value
        return counts

    assert handled("grpc.health.v1.Health", "Check") == {"OK": 1, "NOT_FOUND": 1}
    # The reflection stream ends on the server once the client's channel has closed it: not at once.
    deadline = time.monotonic() + 30
    while not (streams := handled("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo")):
        assert time.monotonic() < deadline, "the reflection stream was never counted"
        time.sleep(0.05)
    assert sum(streams.values()) == 1


def test_signed_url_requests_are_counted(server: RunningServer, storage: Storage) -> None:
    body = os.urandom(2 << 20)
    assert requests.put(storage.get_upload_url("over/http"), data=body, timeout=60).ok
    assert requests.get(storage.get_signed_url("over/http"), timeout=60).content == body
    assert requests.get(storage.get_signed_url("absent"), timeout=60).status_code == 404

    samples = scrape(server)
    route = "/v1/objects/{storage_type}/{key}"

    def handled(method: str) -> dict[str, float]:
        return {
            dict(labels)["code"]: value
            for (name, labels), value in samples.items()
            if name == "blobstore_http_requests_total" and ("method", method) in labels and ("route", route) in labels
        }

    assert sum(handled("PUT").values()) == 1 and all(code.startswith("2") for code in handled("PUT"))
    assert handled("GET") == {"200": 1, "404": 1}
    assert samples[("blobstore_http_received_bytes_total", (("method", "PUT"),))] == len(body)
    assert len(body) <= samples[("blobstore_http_sent_bytes_total", (("method", "GET"),))] < len(body) + 1024


def test_open_upload_streams_are_counted(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.StorageStub(channel)
        started = _Gate()
        call = stub.Upload.future(started.messages())
        started.wait_sent()
        try:
            # The first message is on its way; the server counts the stream once its handler runs.
            deadline = time.monotonic() + 60
            while scrape(server)[("blobstore_open_uploads", (("kind", "stream"),))] != 1:
                assert time.monotonic() < deadline, "the open upload stream was never counted"
                time.sleep(0.05)
        finally:
            started.release()
        assert call.result(60).object.size == 5
    assert scrape(server)[("blobstore_open_uploads", (("kind", "stream"),))] == 0


def test_each_server_has_its_own_registry(server: RunningServer, storage: Storage, tmp_path) -> None:
    storage.set("one", b"1")
    other = start_server(tmp_path / "other")
    try:
        assert ("grpc_server_handled_total", rpc("Set")) not in scrape(other)
        assert scrape(server)[("grpc_server_handled_total", rpc("Set"))] == 1
    finally:
        stop_server(other)


def _reader(blob: bytes) -> io.BytesIO:
    return io.BytesIO(blob)


class _Gate:
    """An Upload request stream that holds its last message until released."""

    def __init__(self) -> None:
        self._sent = threading.Event()
        self._go = threading.Event()

    def messages(self) -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(spec=pb.UploadSpec(key="held"), write_offset=0, data=b"hello")
        self._sent.set()
        self._go.wait(60)
        yield pb.UploadRequest(write_offset=5, finish_write=True)

    def wait_sent(self) -> None:
        assert self._sent.wait(60)

    def release(self) -> None:
        self._go.set()


def test_index_commit_group_sizes_are_exported(server: RunningServer, storage: Storage) -> None:
    for number in range(5):
        storage.set(f"key-{number}", b"v")
    samples = scrape(server)
    stats = server.engine.index.group_stats
    assert samples[("blobstore_index_commit_group_size_sum", ())] == stats.jobs >= 5
    assert samples[("blobstore_index_commit_group_size_count", ())] == stats.groups >= 1
    assert samples[("blobstore_index_commit_group_size_bucket", (("le", "+Inf"),))] == stats.groups
    assert samples[("blobstore_index_commit_group_size_bucket", (("le", "1.0"),))] == stats.counts[0]
    assert samples[("blobstore_index_commit_gathers_total", ())] == stats.gathers
    assert samples[("blobstore_index_commit_regroups_total", ())] == 0
