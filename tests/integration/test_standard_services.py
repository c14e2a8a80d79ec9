"""Health checking and reflection through plain gRPC clients, as probes and grpcurl use them."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import RunningServer, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_reports_serving_for_the_server_and_the_storage_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "blobstore.v1.Storage"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING
        try:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("an unknown service must be NOT_FOUND")


def test_health_turns_not_serving_when_the_server_shuts_down(tmp_path) -> None:
    running = start_server(tmp_path / "data", shutdown_grace_s=20.0)
    try:
        with grpc.insecure_channel(running.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == SERVING
            stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop.loop)
            assert next(watch).status == NOT_SERVING
            # Then the watch ends by itself instead of holding the shutdown for its grace period.
            assert list(watch) == []
            stopping.result(60)
    finally:
        running.loop.close()


def test_reflection_describes_every_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"blobstore.v1.Storage", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        storage = DescriptorPool(database).FindServiceByName("blobstore.v1.Storage")
        methods = {method.name: method for method in storage.methods}
        assert {"Set", "Get", "Upload", "Download", "List", "Stat", "Delete", "GetLimits"} <= set(methods)
        upload = methods["Upload"]
        assert upload.client_streaming and not upload.server_streaming
        assert upload.input_type.fields_by_name["write_offset"].number == 3
