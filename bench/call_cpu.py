"""The server's own work per unary Set / Get, in process: every layer the server runs, no transport.

    python -m bench.call_cpu                         # CPU us per call, 16 calls at a time
    python -m bench.call_cpu set --concurrency 1     # one call at a time
    python -m bench.call_cpu --instructions          # instructions per call under valgrind

Each call deserializes a request through the method handler exactly as the server registers
it (telemetry, error mapping, caller resolution with its index reads and rate limit, the
servicer, the engine with real LMDB and its fsyncs) and serializes the response: everything
of a call but gRPC's transport (bench.thread_cpu measures that part too, on a real server).
CPU time moves with the machine's load; `--instructions` counts every thread's user-space
instructions with valgrind (cachegrind) instead, as the difference between runs of 100 and
400 calls made one at a time, which repeats to about 1% and is what to compare two trees by.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

import grpc

from bench import procs
from blobstore.server.app import BlobstoreServer, ServerConfig
from blobstore.server.engine import EngineConfig
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc

KEYS = 1000
SERVICE = "blobstore.v1.Storage"


class _Context:
    """The little of a grpc.aio context the wrapped handlers read."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def code(self) -> None:
        return None


class _Handlers:
    """Collects a servicer's method handlers, as the gRPC server would receive them."""

    def __init__(self) -> None:
        self.by_name: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.by_name.update(handlers)


async def _run(op: str, size: int, calls: int, rounds: int, concurrency: int) -> list[float]:
    value = os.urandom(size)
    with tempfile.TemporaryDirectory() as data_dir:
        # A small map: valgrind cannot reserve the default terabyte of address space.
        server = BlobstoreServer(ServerConfig(data_dir=data_dir, port=0, engine=EngineConfig(index_map_size=1 << 30)))
        generated = _Handlers()
        pb_grpc.add_StorageServicer_to_server(server.servicer, generated)  # type: ignore[arg-type]
        handlers = {name: server._wrap_handler(SERVICE, name, handler) for name, handler in generated.by_name.items()}
        sets = [pb.SetRequest(key=f"bench/{i:04d}", value=value).SerializeToString() for i in range(KEYS)]
        gets = [pb.GetRequest(key=f"bench/{i:04d}").SerializeToString() for i in range(KEYS)]
        context: Any = _Context()
        handler: Any = handlers["Set"]
        for raw in sets:  # every key exists: the measured sets overwrite, as in make bench
            handler.response_serializer(await handler.unary_unary(handler.request_deserializer(raw), context))
        handler = handlers["Set" if op == "set" else "Get"]
        requests = sets if op == "set" else gets

        async def client(offset: int, count: int) -> None:
            for call in range(count):
                request = handler.request_deserializer(requests[(offset + call * 7) % KEYS])
                handler.response_serializer(await handler.unary_unary(request, context))

        per_call = []
        for _ in range(rounds):
            started = time.process_time()
            await asyncio.gather(*(client(101 * n, calls // concurrency) for n in range(concurrency)))
            per_call.append(1e6 * (time.process_time() - started) / (calls // concurrency * concurrency))
        await asyncio.get_running_loop().run_in_executor(None, server.engine.close)
        return per_call


def main() -> None:
    args, ops = procs.set_get_options(__doc__, calls=3200, concurrency=16)
    for op in ops:
        if args.instructions:
            extra = ("--concurrency", "1")
            per_call = procs.instructions_per_call("bench.call_cpu", op, args.size, 100, 400, *extra)
            print(f"{op.title()} {args.size} B: {per_call / 1e3:.1f}k instructions per call (one at a time)")
            continue
        rounds = asyncio.run(_run(op, args.size, args.calls, args.rounds, args.concurrency))
        print(
            f"{op.title()} {args.size} B, {args.concurrency} at a time: median {statistics.median(rounds):.0f} us "
            f"CPU per call ({' / '.join(f'{us:.0f}' for us in rounds)})"
        )


if __name__ == "__main__":
    main()
