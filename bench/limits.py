"""Two limits of the machine that every small write pays, measured in the bench's own run.

A sequential Set waits for one commit of the index: a round trip from the event loop to the
index writer thread and back, and LMDB's two syncs of the data folder's disk. The bare
servicer pays neither, so these two numbers explain much of the distance between them, and
they drift with the machine (a shared cloud disk's sync latency moves several-fold within
minutes), so the report gives them from the start and the end of the run.

    python -m bench.limits                      # both, as the report shows them
    python -m bench.limits round-trip [--pin]   # one round-trip measurement, as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from blobstore.server.handback import Handback

SYNC_WRITE = 4096


def fdatasync_latency_us(folder: Path, iterations: int = 300) -> tuple[float, float]:
    """p50 and p90 microseconds of a 4 KiB pwrite plus fdatasync in `folder`, overwriting blocks
    of a file already written and synced (as LMDB overwrites its pages): the data's flush and
    the disk's cache flush, no file-size change to journal."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fdatasync-probe.bin"
    block = os.urandom(SYNC_WRITE)
    blocks = 64
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, block * blocks)
        os.fsync(fd)
        latencies = []
        for i in range(iterations):
            started = time.perf_counter()
            os.pwrite(fd, block, (i % blocks) * SYNC_WRITE)
            os.fdatasync(fd)
            latencies.append((time.perf_counter() - started) * 1e6)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    deciles = statistics.quantiles(latencies, n=10)
    return statistics.median(latencies), deciles[8]


def _noop() -> None:
    return None


def round_trip_us(round_trips: int = 5000, pin: bool = False) -> dict[str, float]:
    """Wall (median) and process CPU (mean: the process's CPU over all round trips, which a
    throughput pays, slow wake-ups included) microseconds of one round trip as the server makes
    it for a commit: the event loop puts a job and a concurrent Future on a SimpleQueue, a
    worker thread runs it and sets the result, and the loop awaits it through a Handback. `pin`
    puts both threads on one core first (the worker inherits the affinity of the thread that
    starts it)."""
    if pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()

    def work() -> None:
        while (job := jobs.get()) is not None:
            call, future = job
            if future.set_running_or_notify_cancel():
                future.set_result(call())

    async def measure() -> tuple[list[float], float]:
        handback = Handback(asyncio.get_running_loop())
        walls = []
        cpu = time.process_time()
        for _ in range(round_trips):
            future: Future[None] = Future()
            wall = time.perf_counter()
            jobs.put((_noop, future))
            await handback.wait(future)
            walls.append(time.perf_counter() - wall)
        return walls, (time.process_time() - cpu) / round_trips

    worker = threading.Thread(target=work, name="round-trip-worker", daemon=True)
    worker.start()
    try:
        walls, cpu_per_trip = asyncio.run(measure())
    finally:
        jobs.put(None)
        worker.join()
    return {"wall_us": statistics.median(walls) * 1e6, "cpu_us": cpu_per_trip * 1e6}


def machine_limits(folder: Path, when: str) -> dict[str, str]:
    """The report's lines for the Machine section. The round trips run in fresh processes, so
    that neither the bench's own threads nor an earlier affinity change touch them."""
    from bench import procs

    p50, p90 = fdatasync_latency_us(folder)
    trips = {
        pinned: procs.run_json(
            [procs.PYTHON, "-m", "bench.limits", "round-trip", *(["--pin"] if pinned else [])], timeout=120
        )
        for pinned in (False, True)
    }
    free, one_core = trips[False], trips[True]
    return {
        f"fdatasync of 4 KiB in the bench data folder, {when}": f"p50 {p50:.0f} us, p90 {p90:.0f} us",
        f"thread round trip (event loop -> worker thread -> Handback), {when}": (
            f"wall {free['wall_us']:.0f} us (median), CPU {free['cpu_us']:.0f} us (mean); "
            f"both threads on one core: wall {one_core['wall_us']:.0f} us, CPU {one_core['cpu_us']:.0f} us "
            "(5,000 round trips each)"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["all", "round-trip"], default="all")
    parser.add_argument("--pin", action="store_true", help="both threads on one core")
    parser.add_argument("--folder", type=Path, default=Path("build/bench"), help="where fdatasync is measured")
    args = parser.parse_args()
    if args.what == "round-trip":
        print(json.dumps(round_trip_us(pin=args.pin)))
        return
    for name, value in machine_limits(args.folder, "now").items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
