"""Upload and download through blobstore on S3 + PostgreSQL against boto3 moving the same bytes
straight to the same S3 gateway.

    .venv/bin/python -m bench.s3pg [--files 4] [--size-mib 64] [--rounds 3] [--parallel 2]

Starts PostgreSQL (fsync on) and Ceph's RADOS Gateway on loopback (tests/infra/services.py:
installed with apt-get when missing), and a blobstore server as a subprocess on that pair.
Each round writes fresh random files (so blobstore's deduplication saves nothing), then
alternates: blobstore set_file / boto3 upload_file of every file, then blobstore get_file /
boto3 download_file, `--parallel` files at a time, each tool with its default settings.
Reports the median throughput of the rounds and the ratio blobstore / boto3 (target >= 0.8),
and, for scale, the same client against a blobstore on the embedded file + lmdb pair.
Everything runs on this machine: the numbers include the servers' CPU, shared with the client.
So it also reports the CPU seconds per GiB moved that each party spent (the blobstore server,
the gateway's Ceph daemons, PostgreSQL, the client process): on a loaded machine throughput
swings 2-3x between runs, while CPU per GiB says where a gap comes from and stays put.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from bench import procs
from blobstore.client import Storage
from tests.infra.services import CephRgw, Postgres

MiB = 1 << 20
BUCKET_DIRECT = "bench-direct"
BUCKET_BLOBSTORE = "bench-blobstore"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_blobstore(workdir: Path, ceph: CephRgw | None, pg: Postgres | None) -> tuple[subprocess.Popen[bytes], str]:
    """A server on s3 + postgres, or on the embedded file + lmdb pair when ceph and pg are None."""
    port = free_port()
    env = dict(os.environ)
    if ceph is not None and pg is not None:
        env |= _shared_pair(ceph, pg)
    data = workdir / ("data" if ceph is not None else "data-local")
    log = open(workdir / "blobstore.log", "ab")  # noqa: SIM115 - the child keeps it
    args = [sys.executable, "-m", "blobstore.client.cli", "serve", "--data-dir", str(data)]
    args += ["--port", str(port), "--http-port", str(free_port()), "--log-level", "warning"]
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with Storage(f"127.0.0.1:{port}", timeout=5) as storage:
                storage.exists("warm-up")
            return process, f"127.0.0.1:{port}"
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"blobstore did not start; see {workdir / 'blobstore.log'}") from None
            time.sleep(0.2)


def _shared_pair(ceph: CephRgw, pg: Postgres) -> dict[str, str]:
    return {
        **os.environ,
        "BLOBSTORE_CHUNK_STORE": "s3",
        "BLOBSTORE_INDEX": "postgres",
        "BLOBSTORE_S3_ENDPOINT": ceph.endpoint,
        "BLOBSTORE_S3_BUCKET": BUCKET_BLOBSTORE,
        "BLOBSTORE_S3_REGION": ceph.region,
        "BLOBSTORE_S3_ACCESS_KEY": ceph.access_key,
        "BLOBSTORE_S3_SECRET_KEY": ceph.secret_key,
        "BLOBSTORE_POSTGRES_DSN": pg.dsn,
        "BLOBSTORE_URL_SIGNING_SECRETS": '["bench-secret-shared-by-replicas"]',
    }


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and its descendants (those alive, and the exited ones they reaped)."""
    fields_of: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        fields_of[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in fields_of:
            ticks += sum(int(f) for f in fields_of[pid][11:15])  # utime stime cutime cstime
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds each party spends during one timed phase."""

    def __init__(self, parties: dict[str, list[int]]) -> None:
        self.parties = parties

    def snapshot(self) -> dict[str, float]:
        seconds = {name: sum(tree_cpu_seconds(pid) for pid in pids) for name, pids in self.parties.items()}
        seconds["client"] = own_cpu_seconds()
        return seconds


def timed(parallel: int, work: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(work, range(count)))
    return time.perf_counter() - start


def _start_profiler(folder: Path | None, key: str, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy on the server for one phase; the rounds of a phase add up in one file of collapsed stacks."""
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{key}-{time.monotonic_ns()}.txt"
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    spy = subprocess.Popen(
        [
            *(py_spy, "record", "--pid", str(pid), "--output", str(out)),
            *("--format", "raw", "--rate", "250", "--threads", "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # attaching takes a moment
    return spy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument(
        "--profile", type=Path, help="record the blobstore server with py-spy during its phases into this folder"
    )
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="blobstore-bench-s3pg-"))
    pg = Postgres(durable=True).start()
    ceph = CephRgw(memstore_bytes=16 << 30).start()
    server: subprocess.Popen[bytes] | None = None
    local: subprocess.Popen[bytes] | None = None
    try:
        server, address = start_blobstore(workdir, ceph, pg)
        # The same client against the embedded pair: how fast the client and gRPC path goes at all.
        local, local_address = start_blobstore(workdir, None, None)
        local_storage = Storage(local_address)
        s3 = boto3.client(
            "s3",
            endpoint_url=ceph.endpoint,
            region_name=ceph.region,
            aws_access_key_id=ceph.access_key,
            aws_secret_access_key=ceph.secret_key,
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32),
        )
        s3.create_bucket(Bucket=BUCKET_DIRECT)
        transfer = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads per file
        storage = Storage(address)
        total = options.files * options.size_mib * MiB
        results: dict[str, list[float]] = {
            f"{d}_{n}": [] for d in ("up", "down") for n in ("blobstore", "boto3", "local")
        }
        meter = CpuMeter(
            {
                "server": [server.pid],
                "gateway": [process.pid for process in ceph.processes],
                "postgres": [pg.process.pid] if pg.process is not None else [],
            }
        )
        cpu_used: dict[str, dict[str, float]] = {key: {} for key in results}
        peak_rss: dict[str, list[float]] = {"up_blobstore": [], "down_blobstore": []}

        def measure(key: str, parallel: int, work: Callable[[int], object]) -> None:
            spy = _start_profiler(options.profile, key, server.pid) if key.endswith("_blobstore") else None
            watch_rss = key in peak_rss and procs.reset_peak_rss(server.pid)
            before = meter.snapshot()
            results[key].append(total / timed(parallel, work, options.files) / 1e6)
            after = meter.snapshot()
            if watch_rss:
                peak_rss[key].append(procs.peak_rss_mb(server.pid))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            for party, seconds in after.items():
                cpu_used[key][party] = cpu_used[key].get(party, 0.0) + seconds - before[party]

        for round_number in range(options.rounds):
            files = []
            for i in range(options.files):
                path = workdir / f"in{i}"
                path.write_bytes(os.urandom(options.size_mib * MiB))
                files.append(path)
            keys = [f"r{round_number}/f{i}" for i in range(options.files)]
            out = workdir / "out"
            out.mkdir(exist_ok=True)

            def up_blobstore(i: int, keys: list[str] = keys, files: list[Path] = files) -> object:
                return storage.set_file(keys[i], files[i])

            def up_boto3(i: int, keys: list[str] = keys, files: list[Path] = files) -> None:
                s3.upload_file(str(files[i]), BUCKET_DIRECT, keys[i], Config=transfer)

            def down_blobstore(i: int, keys: list[str] = keys, out: Path = out) -> object:
                return storage.get_file(keys[i], out / f"b{i}")

            def up_local(i: int, keys: list[str] = keys, files: list[Path] = files) -> object:
                return local_storage.set_file(keys[i], files[i])

            def down_local(i: int, keys: list[str] = keys, out: Path = out) -> object:
                return local_storage.get_file(keys[i], out / f"l{i}")

            def down_boto3(i: int, keys: list[str] = keys, out: Path = out) -> None:
                s3.download_file(BUCKET_DIRECT, keys[i], str(out / f"s{i}"), Config=transfer)

            # Alternate which goes first, so neither always meets a freshly busy gateway.
            order = [
                ("blobstore", up_blobstore, down_blobstore),
                ("boto3", up_boto3, down_boto3),
                ("local", up_local, down_local),
            ]
            if round_number % 2:
                order.reverse()
            for name, up, _ in order:
                measure(f"up_{name}", options.parallel, up)
            for name, _, down in order:
                measure(f"down_{name}", options.parallel, down)
            for i in range(options.files):
                if (out / f"b{i}").read_bytes() != files[i].read_bytes():
                    raise SystemExit(f"blobstore returned different bytes for {keys[i]}")
                storage.delete(keys[i])
                local_storage.delete(keys[i])
                s3.delete_object(Bucket=BUCKET_DIRECT, Key=keys[i])
            shutil.rmtree(out)
        storage.close()
        local_storage.close()
        median = {name: statistics.median(values) for name, values in results.items()}
        print(
            f"{options.rounds} rounds of {options.files} x {options.size_mib} MiB, {options.parallel} at a time "
            "(median MB/s; client, blobstore, PostgreSQL and Ceph share this machine):"
        )
        for direction in ("up", "down"):
            ours, theirs = median[f"{direction}_blobstore"], median[f"{direction}_boto3"]
            label = "upload  " if direction == "up" else "download"
            local_median = median[f"{direction}_local"]
            print(
                f"  {label} blobstore on s3+pg {ours:7.1f}   boto3 straight to RGW {theirs:7.1f}"
                f"   ratio {ours / theirs:.2f}   (blobstore on file+lmdb, same client: {local_median:.1f})"
            )
            for name in ("blobstore", "boto3", "local"):
                values = ", ".join(f"{v:.0f}" for v in results[f"{direction}_{name}"])
                print(f"      rounds {name:9} {values}")
            for name in ("blobstore", "boto3"):
                gib = options.rounds * total / (1 << 30)
                used = {party: seconds / gib for party, seconds in cpu_used[f"{direction}_{name}"].items()}
                parts = "  ".join(f"{party} {seconds:.2f}" for party, seconds in used.items())
                print(f"      CPU s/GiB {name:9} {parts}  = {sum(used.values()):.2f}")
            peaks = peak_rss[f"{direction}_blobstore"]
            if peaks:
                print(f"      peak RSS of the blobstore server (MB, per round) {', '.join(f'{p:.0f}' for p in peaks)}")
    finally:
        for process in (server, local):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)
        ceph.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
