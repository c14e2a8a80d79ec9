"""Profiles the blobstore server under one small-value load with py-spy, and prints where it spends time.

    python -m bench.profile batch-set 100 --clients 16 --seconds 8
    python -m bench.profile upload          # one large upload (BENCH_LARGE_MB, default 256)

Writes the raw collapsed stacks to build/bench/profiles/ and prints the
hottest functions by own time and by inclusive time.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import time
from pathlib import Path

from bench import procs
from bench.load import Load, measure, preload

MiB = 1 << 20


def summarize(raw: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples")
    print("--- own time")
    for frame, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}% {frame}")
    print("--- inclusive time")
    for frame, n in inclusive.most_common(top * 2):
        print(f"{100 * n / total:5.1f}% {frame}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["set", "get", "batch-set", "batch-get", "upload", "download"])
    parser.add_argument("size", type=int, nargs="?", default=100)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--idle", action="store_true", help="include threads waiting (I/O, locks), not only CPU")
    args = parser.parse_args()
    work = procs.ROOT / "build/bench/profile"
    out = procs.ROOT / "build/bench/profiles" / f"{args.op}-{args.size}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (procs.BIN / "py-spy").exists():
        subprocess.run([procs.PYTHON, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    server = procs.start_blobstore(work)
    source = work / "big.bin"
    try:
        if args.op in ("upload", "download"):
            with open(source, "wb") as f:
                for _ in range(int(os.environ.get("BENCH_LARGE_MB", "256")) // 4):
                    f.write(os.urandom(4 * MiB))
            if args.op == "download":
                procs.run_json([procs.PYTHON, "-m", "bench.transfer", "ours-upload", server.address, str(source)])
        else:
            preload(Load("blobstore", server.address, "get", args.size, "p"))
        spy = subprocess.Popen(
            [str(procs.BIN / "py-spy"), "record", "--pid", str(server.pid), "--output", str(out)]
            + ["--format", "raw", "--rate", "250", "--threads", "--nonblocking"]
            + (["--idle"] if args.idle else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        cpu = server.cpu_seconds()
        started = time.perf_counter()
        if args.op in ("upload", "download"):
            mode = f"ours-{args.op}"
            target = source if args.op == "upload" else work / "download.out"
            print(procs.run_json([procs.PYTHON, "-m", "bench.transfer", mode, server.address, str(target)]))
        else:
            load = Load("blobstore", server.address, args.op, args.size, "p")
            rate = measure(load, args.clients, args.processes, args.seconds)
            print(rate)
        elapsed = time.perf_counter() - started
        used = server.cpu_seconds() - cpu
        print(f"server CPU: {used / elapsed:.2f} cores over {elapsed:.1f} s")
        if args.op not in ("upload", "download"):
            # The window is args.seconds of the elapsed time; process start-up is idle for the server.
            print(f"server CPU per call: {used / (rate['calls_per_s'] * args.seconds) * 1000:.2f} ms")
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    finally:
        server.stop()
        source.unlink(missing_ok=True)
    summarize(out, args.top)


if __name__ == "__main__":
    main()
