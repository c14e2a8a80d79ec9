"""CPU per set_many / get_many call, on the client and on the server, one call at a time.

    python -m bench.batch_cpu                      # starts this tree's server; 100 values of 100 B
    python -m bench.batch_cpu --size 10240 --calls 200 --rounds 5
    python -m bench.batch_cpu --address HOST:PORT --server-pid PID   # a server already running

Throughput on the shared two cores follows the CPU both ends spend per batch, and CPU
seconds per call move far less with the machine's load than calls per second do. The
client's CPU is this process's (time.process_time: every thread, gRPC's own included);
the server's is read from /proc/PID/stat (10 ms ticks: keep calls x CPU per call well
above that). Prints one JSON line per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench import procs
from blobstore.client import Storage

PRELOADED = 1000


def _server_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(storage: Storage, op: str, calls: int, batch: int, value: bytes, pid: int | None) -> dict[str, float]:
    rng = __import__("random").Random(op)
    preloaded = [f"cpu/pre/{i:05d}" for i in range(PRELOADED)]
    counter = 0

    def one() -> None:
        nonlocal counter
        if op == "set":
            keys = [f"cpu/own/{(counter + i) % 1000:04d}" for i in range(batch)]
            counter += batch
            storage.set_many(dict.fromkeys(keys, value))
        else:
            got = storage.get_many(rng.sample(preloaded, batch))
            assert len(got) == batch

    for _ in range(max(3, calls // 10)):
        one()  # warm caches, the connection, the server's pages
    server_before, client_before, wall_before = _server_cpu(pid), time.process_time(), time.perf_counter()
    for _ in range(calls):
        one()
    wall = time.perf_counter() - wall_before
    client = time.process_time() - client_before
    server = _server_cpu(pid) - server_before
    return {
        "client_ms": 1000 * client / calls,
        "server_ms": 1000 * server / calls,
        "wall_ms": 1000 * wall / calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", default="set,get")
    parser.add_argument("--address", help="a server already running (default: start this tree's)")
    parser.add_argument("--server-pid", type=int, help="with --address: the server's pid, for its CPU")
    args = parser.parse_args()
    server = None
    if args.address:
        address, pid = args.address, args.server_pid
    else:
        server = procs.start_blobstore(procs.ROOT / "build/bench/batch_cpu")
        address, pid = server.address, server.pid
    value = os.urandom(args.size)
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        with Storage(address) as storage:
            preloaded = [f"cpu/pre/{i:05d}" for i in range(PRELOADED)]
            for start in range(0, PRELOADED, args.batch):
                storage.set_many(dict.fromkeys(preloaded[start : start + args.batch], value))
            for round_number in range(args.rounds):
                for op in args.ops.split(","):
                    row = _measure(storage, op, args.calls, args.batch, value, pid)
                    rows.setdefault(op, []).append(row)
                    print(json.dumps({"round": round_number, "op": f"batch-{op}", "size": args.size, **row}))
    finally:
        if server is not None:
            server.stop()
    for op, results in rows.items():
        summary = {
            name: round(statistics.median(row[name] for row in results), 3) for name in ("client_ms", "server_ms")
        }
        print(json.dumps({"median": f"batch-{op}", "size": args.size, **summary}))


if __name__ == "__main__":
    main()
