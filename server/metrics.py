"""Prometheus metrics and the wrapper that records them for every RPC method, with a request id per RPC.

RPC metrics follow the names of go-grpc-prometheus (grpc_server_handled_total,
grpc_server_handling_seconds, ...) so that existing dashboards work. Store
gauges (objects, bytes, chunks, dedup ratio, open uploads) are read from the
index at scrape time. Each server has its own CollectorRegistry, so several
servers in one process (tests) never share counters.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from blobstore.server.engine import Engine
from blobstore.server.handlers import handler_kind, rebuild
from blobstore.server.index import GroupStats
from blobstore.server.logs import new_request_id, request_id

REQUEST_ID_HEADER = "x-request-id"
# From a cache hit to a multi-gigabyte stream.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

RPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")
HANDLED_LABELS = (*RPC_LABELS, "grpc_code")


class Metrics:
    """Every metric of one server, in a registry of its own."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpcs = RpcCollector()
        r.register(self.rpcs)
        self.http_handled = Counter(
            "blobstore_http_requests", "HTTP requests completed, by status.", ("method", "route", "code"), registry=r
        )
        self.http_latency = Histogram(
            "blobstore_http_request_duration_seconds",
            "Time from an HTTP request's arrival to the end of its response.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_received_bytes = Counter(
            "blobstore_http_received_bytes", "Bytes of HTTP request bodies received.", ("method",), registry=r
        )
        self.http_sent_bytes = Counter(
            "blobstore_http_sent_bytes", "Bytes of HTTP response bodies sent.", ("method",), registry=r
        )
        r.register(StoreCollector(engine, self.rpcs))
        r.register(CommitCollector(engine.index.group_stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StoreCollector:
    """Gauges read from the index at scrape time."""

    def __init__(self, engine: Engine, rpcs: RpcCollector) -> None:
        self.engine = engine
        self.rpcs = rpcs

    def describe(self) -> Iterable[Metric]:
        # Tells the registry the names without scanning the index at registration.
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.store_stats()
        families = self._families()
        families["objects"].add_metric([], stats.objects)
        families["logical"].add_metric([], stats.logical_bytes)
        families["chunks"].add_metric([], stats.chunks)
        families["chunk_bytes"].add_metric([], stats.chunk_bytes)
        families["dedup"].add_metric([], stats.referenced_chunk_bytes / stats.chunk_bytes if stats.chunk_bytes else 1.0)
        streaming = sum(stats.in_progress() for stats in self.rpcs.methods if stats.labels[1] == "Upload")
        families["uploads"].add_metric(["stream"], streaming)
        families["uploads"].add_metric(["session"], stats.open_uploads)
        return families.values()

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            "objects": GaugeMetricFamily("blobstore_objects", "Objects stored (all namespaces and storage types)."),
            "logical": GaugeMetricFamily("blobstore_logical_bytes", "Sum of the sizes of the stored objects."),
            "chunks": GaugeMetricFamily("blobstore_chunks", "Distinct chunks in the chunk store."),
            "chunk_bytes": GaugeMetricFamily("blobstore_chunk_bytes", "Bytes in the chunk store, after dedup."),
            "dedup": GaugeMetricFamily(
                "blobstore_dedup_ratio",
                "Chunk bytes referenced by objects and sessions over chunk bytes stored (1: no sharing).",
            ),
            "uploads": GaugeMetricFamily(
                "blobstore_open_uploads",
                "Uploads in progress: streams running now, resumable sessions open.",
                labels=("kind",),
            ),
        }


class CommitCollector:
    """The index writer's group commits, read at scrape time from numbers it keeps per group."""

    def __init__(self, stats: GroupStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterable[Metric]:
        return self._families(empty=False)

    def _families(self, *, empty: bool) -> list[Metric]:
        stats = self.stats
        counts = [0] * len(stats.counts) if empty else list(stats.counts)
        buckets = cumulative_buckets(_GROUP_SIZE_LABELS, counts)
        return [
            HistogramMetricFamily(
                "blobstore_index_commit_group_size",
                "Write requests committed together in one index transaction (and its fsyncs).",
                buckets=buckets,
                sum_value=0 if empty else stats.jobs,
            ),
            CounterMetricFamily(
                "blobstore_index_commit_gathers",
                "Index commits that waited briefly for more writes to join them, because writes overlapped.",
                value=0 if empty else stats.gathers,
            ),
            CounterMetricFamily(
                "blobstore_index_commit_regroups",
                "Index commits run again job by job because one of their jobs failed.",
                value=0 if empty else stats.regroups,
            ),
        ]


class RpcStats:
    """The RPC metrics of one method, as plain numbers.

    prometheus_client's Counter, Gauge and Histogram take a lock and several Python calls per
    update; the seven updates of every call cost about 43k instructions, a quarter of a whole
    small Get in process (python -m bench.call_cpu --instructions). Every call of a server runs
    on its event loop (grpc.aio runs the handlers and the (de)serializers there), so these
    numbers change on that one thread only and need no lock; RpcCollector reads them at scrape
    time, from copies where a read could race a change of size.
    """

    __slots__ = ("buckets", "handled", "labels", "latency_sum", "received_bytes", "sent_bytes", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels  # service, method, RPC type
        self.started = 0
        self.handled: dict[str, int] = {}  # by status code name
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # calls by latency bucket (not cumulative); last: +Inf
        self.latency_sum = 0.0
        self.received_bytes = 0
        self.sent_bytes = 0

    def in_progress(self) -> int:
        handled = sum(dict(self.handled).values())  # first: every call handled was started before
        return self.started - handled


class RpcCollector:
    """go-grpc-prometheus's families (and our message byte counters) from every method's RpcStats."""

    def __init__(self) -> None:
        self.methods: list[RpcStats] = []

    def add(self, labels: tuple[str, str, str]) -> RpcStats:
        stats = RpcStats(labels)
        self.methods.append(stats)
        return stats

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        started, handled, latency, in_progress, received, sent = families = self._families()
        received_by_method: collections.Counter[str] = collections.Counter()
        sent_by_method: collections.Counter[str] = collections.Counter()
        for stats in list(self.methods):
            labels = list(stats.labels)
            handled_by_code = dict(stats.handled)  # first: every call handled was started before
            started_count = stats.started
            started.add_metric(labels, started_count)
            for code, count in sorted(handled_by_code.items()):
                handled.add_metric([*labels, code], count)
            in_progress.add_metric(labels, started_count - sum(handled_by_code.values()))
            latency.add_metric(labels, cumulative_buckets(_LATENCY_LABELS, list(stats.buckets)), stats.latency_sum)
            received_by_method[stats.labels[1]] += stats.received_bytes
            sent_by_method[stats.labels[1]] += stats.sent_bytes
        for method, count in received_by_method.items():
            received.add_metric([method], count)
        for method, count in sent_by_method.items():
            sent.add_metric([method], count)
        return families

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        CounterMetricFamily,
        HistogramMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
    ]:
        return (
            CounterMetricFamily("grpc_server_started", "RPCs started.", labels=RPC_LABELS),
            CounterMetricFamily("grpc_server_handled", "RPCs completed, by status code.", labels=HANDLED_LABELS),
            HistogramMetricFamily(
                "grpc_server_handling_seconds", "Time from the start of an RPC to its end.", labels=RPC_LABELS
            ),
            GaugeMetricFamily("grpc_server_in_progress", "RPCs running now.", labels=RPC_LABELS),
            CounterMetricFamily(
                "blobstore_received_bytes", "Bytes of request messages received.", labels=("grpc_method",)
            ),
            CounterMetricFamily("blobstore_sent_bytes", "Bytes of response messages sent.", labels=("grpc_method",)),
        )


def bucket_labels(bounds: Iterable[float]) -> list[str]:
    """A histogram's `le` labels for these upper bounds, as prometheus_client writes them, then +Inf."""
    return [*(floatToGoString(bound) for bound in bounds), "+Inf"]  # type: ignore[no-untyped-call]


def cumulative_buckets(labels: list[str], counts: list[int]) -> list[tuple[str, float]]:
    """A histogram's buckets as exposed (each counts everything up to its bound) from
    per-bucket counts kept as plain numbers."""
    return list(zip(labels, itertools.accumulate(counts), strict=True))


_LATENCY_LABELS = bucket_labels(LATENCY_BUCKETS)
_GROUP_SIZE_LABELS = bucket_labels(GroupStats.BOUNDS)

RPC_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


def instrument(
    metrics: Metrics, service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` that sets the request id and records the RPC metrics: wrap it around the error mapping,
    so that the status code it records is the one the client gets.

    Message bytes are counted in the (de)serializers: exact wire sizes at no extra cost.
    """
    kind = handler_kind(handler)
    stats = metrics.rpcs.add((service, method, RPC_TYPES[kind]))
    observer = _Observer(stats)
    behavior = getattr(handler, kind)
    # Streaming handlers that write through context.write (health Watch) are plain coroutines.
    wrapped = observer.stream(behavior) if inspect.isasyncgenfunction(behavior) else observer.unary(behavior)
    return rebuild(
        handler,
        wrapped,
        _counting(handler.request_deserializer, stats),
        _counting_out(handler.response_serializer, stats),
    )


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == REQUEST_ID_HEADER and value:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return new_request_id()


def _counting(deserializer: Callable[[bytes], Any] | None, stats: RpcStats) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        stats.received_bytes += len(raw)
        return deserializer(raw) if deserializer is not None else raw

    return deserialize


def _counting_out(serializer: Callable[[Any], bytes] | None, stats: RpcStats) -> Callable[[Any], bytes]:
    def serialize(message: Any) -> bytes:
        # A method may yield messages it encoded itself (Download does, to save copies).
        raw = message if serializer is None or type(message) is bytes else serializer(message)
        stats.sent_bytes += len(raw)
        return raw

    return serialize


class _Observer:
    """Times the RPCs of one method and counts them under their final status codes."""

    def __init__(self, stats: RpcStats) -> None:
        self.stats = stats

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        # Each RPC runs in its own task: the id stays with this request's log lines.
        request_id.set(_request_id(context))
        self.stats.started += 1
        return time.perf_counter()

    def _end(self, began: float, context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> None:
        elapsed = time.perf_counter() - began
        stats = self.stats
        # The first bucket whose bound is at least the latency (Prometheus's "le").
        stats.buckets[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        stats.latency_sum += elapsed
        code = _status_name(context, failure)
        stats.handled[code] = stats.handled.get(code, 0) + 1

    def unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            began, failure = self._begin(context), None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(began, context, failure)

        return wrapper

    def stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            began, failure = self._begin(context), None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(began, context, failure)

        return wrapper


# A context's code() is a grpc.StatusCode or, from grpc.aio, the number of one (0 for a call not
# aborted): one dictionary look-up instead of a walk over the enum on every call.
_CODE_NAMES: dict[Any, str] = {
    **{code: code.name for code in grpc.StatusCode},
    **{code.value[0]: code.name for code in grpc.StatusCode},
}


def _status_name(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> str:
    name = _CODE_NAMES.get(context.code())
    if name is not None:
        return name
    if isinstance(failure, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name
    if failure is not None:
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


METRICS_KEY: web.AppKey[Metrics] = web.AppKey("blobstore_metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text exposition; the app must hold the server's Metrics under METRICS_KEY."""
    metrics = request.app[METRICS_KEY]
    # Scraping reads the index: keep it off the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def instrument_http_app(app: web.Application, metrics: Metrics) -> None:
    """Serves GET /metrics from `app` (the server's HTTP listener) and measures its requests.

    Call before the app starts: the telemetry middleware goes first, outside the
    app's own error handling, so that it sees the status that was sent.
    """
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_handler)
    app.middlewares.insert(0, _http_telemetry)


@web.middleware
async def _http_telemetry(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    request_id.set(request.headers.get(REQUEST_ID_HEADER) or new_request_id())
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    began = time.perf_counter()
    status, sent = 500, 0
    try:
        response = await handler(request)
        # Body bytes as declared: downloads go out with sendfile, which aiohttp does not count.
        status = response.status
        sent = response.content_length if response.content_length is not None else response.body_length
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.http_latency.labels(request.method, route).observe(time.perf_counter() - began)
        metrics.http_handled.labels(request.method, route, str(status)).inc()
        metrics.http_received_bytes.labels(request.method).inc(request.content.total_bytes)
        metrics.http_sent_bytes.labels(request.method).inc(sent)
