"""Small-value load: client threads spread over client processes, counting calls in a fixed window.

One Python client process tops out near a few thousand calls/s on two cores, so
16 concurrent clients run as threads in several processes. Every target is
driven by the same loop; only the call inside it differs.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from blobstore.client import Storage

PRELOADED_KEYS = 1000
BATCH = 100


@dataclass(frozen=True)
class Load:
    target: str  # "blobstore", "bare" or "etcd"
    address: str
    op: str  # "set", "get", "batch-set", "batch-get"
    size: int
    prefix: str
    stub_dir: str = ""  # etcd stubs, see bench/etcd.py
    keyspace: int = 0  # > 0: set and get random keys of the scale case's scale/NNNNNNNN


def preload_keys(load: Load) -> list[str]:
    return [f"{load.prefix}/pre/{i:05d}" for i in range(PRELOADED_KEYS)]


def _one(_: object) -> int:
    return 1


def make_call(load: Load, worker: str) -> tuple[Callable[[], int], Callable[[], None]]:
    """(call, close): `call` does one request and returns how many values it moved."""
    value = os.urandom(load.size)
    keys = preload_keys(load)
    rng = random.Random(worker)
    counter = iter(range(1 << 62))

    def own_key() -> str:
        return f"{load.prefix}/{worker}/{next(counter) % 1000:04d}"

    if load.target == "etcd":
        from bench import etcd

        epb, egrpc = etcd.load(load.stub_dir)
        channel = grpc.insecure_channel(load.address)
        kv = egrpc.KVStub(channel)
        if load.op == "set":
            return lambda: _one(kv.Put(epb.PutRequest(key=own_key().encode(), value=value))), channel.close
        if load.op == "get":
            return lambda: _one(kv.Range(epb.RangeRequest(key=rng.choice(keys).encode()))), channel.close
        if load.op == "batch-set":

            def txn_put() -> int:
                ops = [
                    epb.RequestOp(request_put=epb.PutRequest(key=own_key().encode(), value=value)) for _ in range(BATCH)
                ]
                kv.Txn(epb.TxnRequest(success=ops))
                return BATCH

            return txn_put, channel.close

        def txn_range() -> int:
            ops = [epb.RequestOp(request_range=epb.RangeRequest(key=key.encode())) for key in rng.sample(keys, BATCH)]
            response = kv.Txn(epb.TxnRequest(success=ops))
            assert len(response.responses) == BATCH
            return BATCH

        return txn_range, channel.close

    storage = Storage(load.address)
    if load.keyspace:
        if load.op == "set":
            return lambda: _one(storage.set(f"scale/{rng.randrange(load.keyspace):08d}", value)), storage.close
        return lambda: _one(storage.get(f"scale/{rng.randrange(load.keyspace):08d}")), storage.close
    if load.op == "set":
        return lambda: _one(storage.set(own_key(), value)), storage.close
    if load.op == "get":
        return lambda: _one(storage.get(rng.choice(keys))), storage.close
    if load.op == "batch-set":
        return lambda: len(storage.set_many({own_key(): value for _ in range(BATCH)})), storage.close

    def get_many() -> int:
        got = storage.get_many(rng.sample(keys, BATCH))
        assert len(got) == BATCH
        return BATCH

    return get_many, storage.close


def preload(load: Load) -> None:
    """Stores the keys the get loads read, with values of the load's size."""
    value = os.urandom(load.size)
    keys = preload_keys(load)
    if load.target == "etcd":
        from bench import etcd

        epb, egrpc = etcd.load(load.stub_dir)
        with grpc.insecure_channel(load.address) as channel:
            kv = egrpc.KVStub(channel)
            for start in range(0, len(keys), BATCH):
                ops = [
                    epb.RequestOp(request_put=epb.PutRequest(key=k.encode(), value=value))
                    for k in keys[start : start + BATCH]
                ]
                kv.Txn(epb.TxnRequest(success=ops))
        return
    with Storage(load.address) as storage:
        if load.target == "blobstore":
            storage.set_many(dict.fromkeys(keys, value))
        else:
            for key in keys:
                storage.set(key, value)


def _process(load: Load, threads: int, index: int, seconds: float, ready_q: Any, go: Any, out: Any) -> None:
    counts = [0] * threads
    calls = [0] * threads
    failures: list[str] = []
    warmed = threading.Barrier(threads + 1)
    window: list[float] = []
    opened = threading.Event()

    def run(slot: int) -> None:
        call, close = make_call(load, f"p{index}t{slot}")
        try:
            call()  # warm the connection before the window opens
            warmed.wait()
            opened.wait()
            start, end = window
            while time.time() < start:
                time.sleep(0.0005)
            while time.time() < end:
                counts[slot] += call()
                calls[slot] += 1
        except Exception as exc:
            failures.append(repr(exc))
            try:
                warmed.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            close()

    workers = [threading.Thread(target=run, args=(slot,), daemon=True) for slot in range(threads)]
    for worker in workers:
        worker.start()
    try:
        warmed.wait()
    except threading.BrokenBarrierError:
        pass
    ready_q.put(index)
    go.wait()
    window.extend([go.start, go.start + seconds])
    cpu_before = os.times()
    opened.set()
    for worker in workers:
        worker.join()
    cpu_after = os.times()
    cpu = cpu_after.user - cpu_before.user + cpu_after.system - cpu_before.system
    out.put((sum(counts), sum(calls), failures, cpu))


class _Go:
    """The window's opening, shared with every client process."""

    def __init__(self, context: Any) -> None:
        self._event = context.Event()
        self._start = context.Value("d", 0.0)

    def open(self, start: float) -> None:
        self._start.value = start
        self._event.set()

    def wait(self) -> None:
        self._event.wait()

    @property
    def start(self) -> float:
        return float(self._start.value)


def measure(
    load: Load, clients: int, processes: int, seconds: float, server_cpu: Callable[[], float] | None = None
) -> dict[str, float]:
    """Runs `clients` client threads over `processes` processes for `seconds`; values/s and calls/s,
    and the CPU microseconds per value the client processes spent and, given `server_cpu` (the
    server's CPU seconds so far), the server. Both include the calls still running when the
    window closed, a few of thousands."""
    processes = max(1, min(processes, clients))
    context = multiprocessing.get_context("spawn")
    ready_q, out = context.Queue(), context.Queue()
    go = _Go(context)
    per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    children = [
        context.Process(target=_process, args=(load, threads, index, seconds, ready_q, go, out), daemon=True)
        for index, threads in enumerate(per_process)
    ]
    for child in children:
        child.start()
    for _ in children:
        ready_q.get(timeout=120)
    server_before = server_cpu() if server_cpu is not None else 0.0
    go.open(time.time() + 0.2)
    results = [out.get(timeout=seconds + 120) for _ in children]
    server_spent = server_cpu() - server_before if server_cpu is not None else float("nan")
    for child in children:
        child.join(30)
    failures = [failure for _, _, failed, _ in results for failure in failed]
    if failures:
        raise RuntimeError(f"{load.target} {load.op}: {failures[0]}")
    values = sum(count for count, _, _, _ in results)
    calls = sum(count for _, count, _, _ in results)
    client_spent = sum(cpu for _, _, _, cpu in results)
    return {
        "values_per_s": values / seconds,
        "calls_per_s": calls / seconds,
        "client_us_per_value": 1e6 * client_spent / max(1, values),
        "server_us_per_value": 1e6 * server_spent / max(1, values),
    }
