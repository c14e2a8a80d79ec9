"""RpcCollector: the plain per-method numbers come out as go-grpc-prometheus's families."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blobstore.server.metrics import LATENCY_BUCKETS, RpcCollector


def test_counts_in_progress_and_cumulative_latency_buckets() -> None:
    collector = RpcCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    stats = collector.add(("blobstore.v1.Storage", "Set", "unary"))
    collector.add(("grpc.health.v1.Health", "Set", "unary")).received_bytes = 5
    stats.started = 4
    stats.handled = {"OK": 2, "NOT_FOUND": 1}
    stats.buckets[0] = 1  # <= 0.0005 s
    stats.buckets[2] = 1  # <= 0.0025 s
    stats.buckets[-1] = 1  # past the last bound
    stats.latency_sum = 400.0
    stats.received_bytes = 10

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    labels = (("grpc_method", "Set"), ("grpc_service", "blobstore.v1.Storage"), ("grpc_type", "unary"))
    assert samples[("grpc_server_started_total", labels)] == 4
    assert samples[("grpc_server_handled_total", (("grpc_code", "OK"), *labels))] == 2
    assert samples[("grpc_server_handled_total", (("grpc_code", "NOT_FOUND"), *labels))] == 1
    assert samples[("grpc_server_in_progress", labels)] == 1
    cumulative = [1, 1, 2] + [2] * (len(LATENCY_BUCKETS) - 3) + [3]
    bounds = [*(str(float(bound)) for bound in LATENCY_BUCKETS), "+Inf"]
    assert [samples[("grpc_server_handling_seconds_bucket", (*labels, ("le", b)))] for b in bounds] == cumulative
    assert samples[("grpc_server_handling_seconds_count", labels)] == 3
    assert samples[("grpc_server_handling_seconds_sum", labels)] == 400.0
    # Message bytes are counted by method name, across services.
    assert samples[("blobstore_received_bytes_total", (("grpc_method", "Set"),))] == 15
    assert stats.in_progress() == 1
