"""`make bench`: every case as a ratio against a reference measured in the same run.

Environment knobs (defaults in brackets):
  BENCH_QUICK=1         small sizes for a two-minute smoke run; writes build/bench/benchmarks-quick.md
  BENCH_LARGE_MB        size of the large transfers [1024]
  BENCH_REPEAT          runs of every case; the table shows medians [3]
  BENCH_SECONDS         measuring window of each small-value run [3]
  BENCH_SCALE           key counts of the scale case [10000,100000,1000000]
  BENCH_CLIENT_PROCS    client processes the 16 concurrent clients are spread over [4]
  BENCH_CASES           which cases: upload,download,signed,small,batch,scale [all]
  BENCH_PROFILE=1       py-spy profiles of the blobstore server into build/bench/profiles/
  BENCH_DIR, BENCH_OUT  work folder [build/bench] and report [docs/benchmarks.md]
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import env, etcd, limits, procs
from bench.load import Load, measure, preload
from bench.procs import PYTHON, Service
from blobstore.client.storage import CHUNK_SIZE

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
ALL_CASES = ("upload", "download", "signed", "small", "batch", "scale")


@dataclass
class Config:
    quick: bool
    large_bytes: int
    repeat: int
    seconds: float
    scale: list[int]
    client_procs: int
    cases: list[str]
    profile: bool
    workdir: Path
    out: Path

    @classmethod
    def from_env(cls) -> Config:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        get = os.environ.get
        cases = [c.strip() for c in get("BENCH_CASES", ",".join(ALL_CASES)).split(",") if c.strip()]
        unknown = set(cases) - set(ALL_CASES)
        if unknown:
            raise SystemExit(f"unknown BENCH_CASES {sorted(unknown)}; choose from {', '.join(ALL_CASES)}")
        default_out = ROOT / ("build/bench/benchmarks-quick.md" if quick else "docs/benchmarks.md")
        return cls(
            quick=quick,
            large_bytes=int(get("BENCH_LARGE_MB", "64" if quick else "1024")) * MiB,
            repeat=int(get("BENCH_REPEAT", "1" if quick else "3")),
            seconds=float(get("BENCH_SECONDS", "1" if quick else "3")),
            scale=[int(n) for n in get("BENCH_SCALE", "2000,10000" if quick else "10000,100000,1000000").split(",")],
            client_procs=int(get("BENCH_CLIENT_PROCS", "4")),
            cases=cases,
            profile=get("BENCH_PROFILE", "") not in ("", "0"),
            workdir=Path(get("BENCH_DIR", str(ROOT / "build/bench"))).resolve(),
            out=Path(get("BENCH_OUT", str(default_out))).resolve(),
        )


@dataclass
class Row:
    case: str
    ours: float
    reference_name: str
    reference: float
    unit: str
    target: str
    check: Callable[[float], bool] | None
    ratio: float | None = None
    note: str = ""

    @property
    def met(self) -> str:
        if self.check is None or self.ratio is None:
            return "report"
        return "yes" if self.check(self.ratio) else "NO"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def sample(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio_row(self, case: str, ours: str, reference: str, reference_name: str, unit: str, target: float) -> None:
        ours_value, reference_value = self.median(ours), self.median(reference)
        ratio = ours_value / reference_value if reference_value else None
        self.rows.append(
            Row(case, ours_value, reference_name, reference_value, unit, f">= {target}x", lambda r: r >= target, ratio)
        )

    def report_row(self, case: str, ours: str, reference: str, reference_name: str, unit: str) -> None:
        ours_value, reference_value = self.median(ours), self.median(reference)
        ratio = ours_value / reference_value if reference_value else None
        self.rows.append(Row(case, ours_value, reference_name, reference_value, unit, "report", None, ratio))

    def limit_row(self, case: str, name: str, limit: float, unit: str) -> None:
        value = max(self.samples[name])
        self.rows.append(
            Row(case, value, "limit", limit, unit, f"< {limit:g} {unit}", lambda r: r < 1.0, value / limit, "worst run")
        )


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


@contextlib.contextmanager
def profiled(cfg: Config, service: Service, name: str) -> Iterator[None]:
    """py-spy record of the server while the block runs (BENCH_PROFILE=1)."""
    if not cfg.profile:
        yield
        return
    out = cfg.workdir / "profiles" / f"{name}.svg"
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(procs.BIN / "py-spy"), "record", "--pid", str(service.pid), "--output", str(out), "--rate", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
        log(f"profile written to {out}")


def cpu_detail(res: Results, case: str, who: tuple[str, ...]) -> str:
    """CPU seconds per GiB moved, server and client: steadier than throughput on a shared machine."""
    parts = [
        f"{name} {res.median(f'cpu.{case}.{name}.server'):.2f} + {res.median(f'cpu.{case}.{name}.client'):.2f}"
        for name in who
    ]
    return f"{case} CPU seconds per GiB (median, server + client): " + ", ".join(parts)


def record_cpu(res: Results, key: str, rate: dict[str, float]) -> None:
    res.sample(f"cpu.{key}.client", rate["client_us_per_value"])
    res.sample(f"cpu.{key}.server", rate["server_us_per_value"])


def cpu_per_value_detail(res: Results, title: str, key: str, targets: tuple[str, ...]) -> str:
    """CPU microseconds per value, client processes and server: which side a gap comes from."""
    parts = [
        f"{t} {res.median(f'cpu.{key}.{t}.client'):.0f} + {res.median(f'cpu.{key}.{t}.server'):.0f}" for t in targets
    ]
    return f"{title}: CPU us per value (median, client + server): " + ", ".join(parts)


def measured_transfer(
    res: Results, sample: str, service: Service, mode: str, path: Path, size: int
) -> dict[str, float]:
    """One large transfer with `service` (key "big"): its rate under `sample`, and the CPU per GiB
    of the service and the client under cpu.SAMPLE.server / cpu.SAMPLE.client."""
    cpu = service.cpu_seconds()
    done = transfer(mode, service.address, path)
    res.sample(sample, mb_per_s(size, done["seconds"]))
    res.sample(f"cpu.{sample}.server", (service.cpu_seconds() - cpu) * GiB / size)
    res.sample(f"cpu.{sample}.client", done["client_cpu"] * GiB / size)
    return done


def transfer(mode: str, address: str, path: Path, key: str = "big") -> dict[str, float]:
    return procs.run_json([PYTHON, "-m", "bench.transfer", mode, address, str(path), key])


def make_source(cfg: Config) -> Path:
    source = cfg.workdir / "big.bin"
    if source.exists() and source.stat().st_size == cfg.large_bytes:
        return source
    log(f"writing {cfg.large_bytes // MiB} MiB of random bytes to {source}")
    with open(source, "wb") as f:
        for _ in range(cfg.large_bytes // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
        f.write(os.urandom(cfg.large_bytes % (4 * MiB)))
    return source


# ---------------------------------------------------------------------------------------------- cases


def case_upload(cfg: Config, res: Results, source: Path) -> None:
    size = cfg.large_bytes
    work = cfg.workdir / "upload"
    for rep in range(cfg.repeat):
        log(f"upload {rep + 1}/{cfg.repeat}: dd conv=fdatasync")
        target = work / "dd.out"
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        subprocess.run(["dd", f"if={source}", f"of={target}", "bs=1M", "conv=fdatasync", "status=none"], check=True)
        res.sample("upload.dd", mb_per_s(size, time.perf_counter() - started))
        target.unlink()

        # The bare servicer receives our client's stream, and 1 MiB messages, at which it does
        # best (docs/benchmarks.md, item 23): the faster of the two is its limit.
        for sample, mode in (("upload.bare", "bare-upload"), ("upload.bare-1mib", "bare-upload-1mib")):
            log(f"upload {rep + 1}/{cfg.repeat}: bare aio servicer, {mode}")
            bare = procs.start_bare(work / "bare", "aio")
            try:
                measured_transfer(res, sample, bare, mode, source, size)
            finally:
                bare.stop()
                (work / "bare" / "upload.bin").unlink(missing_ok=True)

        log(f"upload {rep + 1}/{cfg.repeat}: blobstore set_file, then the same bytes again")
        server = procs.start_blobstore(work / "blobstore")
        try:
            server.reset_peak_rss()
            with profiled(cfg, server, "upload") if rep == 0 else contextlib.nullcontext():
                done = measured_transfer(res, "upload.ours", server, "ours-upload", source, size)
            res.sample("rss.upload.server", server.peak_rss_mb())
            res.sample("rss.upload.client", done["client_peak_rss_mb"])
            again = transfer("ours-upload", server.address, source, "big-again")
            res.sample("upload.dedup", mb_per_s(size, again["seconds"]))
        finally:
            server.stop()
            shutil.rmtree(work / "blobstore" / "data", ignore_errors=True)
    res.samples["upload.limit"] = [
        min(dd, max(bare, bare_1mib))
        for dd, bare, bare_1mib in zip(
            res.samples["upload.dd"], res.samples["upload.bare"], res.samples["upload.bare-1mib"], strict=True
        )
    ]
    limit_name = "min(dd fdatasync, bare aio)"
    res.ratio_row(f"upload {size // MiB} MiB, set_file", "upload.ours", "upload.limit", limit_name, "MiB/s", 0.8)
    res.ratio_row("re-upload of identical bytes (dedup)", "upload.dedup", "upload.limit", limit_name, "MiB/s", 1.0)
    res.details.append(
        f"upload references (MiB/s, median): dd conv=fdatasync {res.median('upload.dd'):.0f}, "
        f"bare aio servicer with fdatasync {res.median('upload.bare'):.0f} "
        f"(our client's {CHUNK_SIZE >> 20} MiB messages), "
        f"{res.median('upload.bare-1mib'):.0f} (1 MiB messages)"
    )
    res.details.append(cpu_detail(res, "upload", ("ours", "bare", "bare-1mib")))
    res.limit_row("peak RSS, server, during upload", "rss.upload.server", 150, "MB")
    res.limit_row("peak RSS, client, during upload", "rss.upload.client", 150, "MB")


def case_download(cfg: Config, res: Results, source: Path) -> None:
    size = cfg.large_bytes
    work = cfg.workdir / "download"
    server = procs.start_blobstore(work / "blobstore")
    bare_sync = procs.start_bare(work / "bare-sync", "sync", blob=source)
    bare_aio = procs.start_bare(work / "bare-aio", "aio", blob=source)
    target = work / "download.out"
    try:
        transfer("ours-upload", server.address, source, "big")
        # The bare servicers stream from memory; ours reads chunk files, which the upload wrote
        # past the page cache (O_DIRECT). One untimed download puts them where the bare ones
        # keep their bytes, so the timed ones compare hot object with hot object.
        transfer("ours-download", server.address, target, "big")
        target.unlink()
        for rep in range(cfg.repeat):
            log(f"download {rep + 1}/{cfg.repeat}: blobstore get_file, bare sync, bare aio")
            server.reset_peak_rss()
            with profiled(cfg, server, "download") if rep == 0 else contextlib.nullcontext():
                done = measured_transfer(res, "download.ours", server, "ours-download", target, size)
            res.sample("rss.download.server", server.peak_rss_mb())
            res.sample("rss.download.client", done["client_peak_rss_mb"])
            target.unlink()
            for name, bare in (("sync", bare_sync), ("aio", bare_aio)):
                measured_transfer(res, f"download.bare-{name}", bare, "bare-download", target, size)
                target.unlink()
    finally:
        for service in (server, bare_sync, bare_aio):
            service.stop()
        shutil.rmtree(work / "blobstore" / "data", ignore_errors=True)
    res.samples["download.limit"] = [
        max(s, a) for s, a in zip(res.samples["download.bare-sync"], res.samples["download.bare-aio"], strict=True)
    ]
    res.ratio_row(
        f"download {size // MiB} MiB, get_file",
        "download.ours",
        "download.limit",
        "max(bare sync, bare aio)",
        "MiB/s",
        0.8,
    )
    res.details.append(
        f"download references (MiB/s, median): bare sync servicer {res.median('download.bare-sync'):.0f}, "
        f"bare aio servicer {res.median('download.bare-aio'):.0f}"
    )
    res.details.append(cpu_detail(res, "download", ("ours", "bare-sync", "bare-aio")))
    res.limit_row("peak RSS, server, during download", "rss.download.server", 150, "MB")
    res.limit_row("peak RSS, client, during download", "rss.download.client", 150, "MB")


def case_signed(cfg: Config, res: Results, source: Path) -> None:
    from blobstore.client import Storage

    if not hasattr(Storage, "get_signed_url"):
        res.skipped.append("signed-URL download: Storage.get_signed_url does not exist yet (issue 3); case skipped")
        log(res.skipped[-1])
        return
    size = cfg.large_bytes
    work = cfg.workdir / "signed"
    root = work / "nginx-root"
    root.mkdir(parents=True, exist_ok=True)
    served = root / "big.bin"
    served.unlink(missing_ok=True)
    os.link(source, served)
    help_text = subprocess.run(
        [str(procs.BIN / "blobstore"), "serve", "--help"], capture_output=True, text=True, check=False
    ).stdout
    extra = ["--http-port", str(procs.free_port())] if "--http-port" in help_text else []
    server = procs.start_blobstore(work / "blobstore", extra)
    nginx = procs.start_nginx(work, root)
    try:
        transfer("ours-upload", server.address, source, "big")
        with Storage(server.address) as storage:
            url = storage.get_signed_url("big")  # type: ignore[attr-defined]
        nginx_url = f"http://127.0.0.1:{nginx.port}/big.bin"
        # One untimed read of each first: nginx's file was just written through the page cache,
        # our chunks past it (O_DIRECT), and both should be served hot.
        for address in (url, nginx_url):
            subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", address], check=True)
        for rep in range(cfg.repeat):
            log(f"signed URL {rep + 1}/{cfg.repeat}: curl from blobstore, curl from nginx")
            for name, address in (("ours", url), ("nginx", nginx_url)):
                done = subprocess.run(
                    ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", address],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds, downloaded = done.stdout.split()
                if int(float(downloaded)) != size:
                    raise RuntimeError(f"curl got {downloaded} bytes from {name}, expected {size}")
                res.sample(f"signed.{name}", mb_per_s(size, float(seconds)))
    finally:
        server.stop()
        nginx.stop()
        shutil.rmtree(work / "blobstore" / "data", ignore_errors=True)
    res.ratio_row(f"signed-URL download {size // MiB} MiB, curl", "signed.ours", "signed.nginx", "nginx", "MiB/s", 0.7)


SMALL_SIZES = (100, 10 << 10)


def _size_label(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size >> 10} KiB"


def _start_small_targets(cfg: Config, work: Path) -> tuple[dict[str, Service], str]:
    stub_dir = etcd.generate(str(work / "etcd-stubs"))
    services = {
        "blobstore": procs.start_blobstore(work / "blobstore"),
        "bare": procs.start_bare(work / "bare", "aio"),
        "etcd": procs.start_etcd(work),
    }
    return services, stub_dir


def case_small(cfg: Config, res: Results) -> None:
    work = cfg.workdir / "small"
    (work / "etcd-stubs").mkdir(parents=True, exist_ok=True)
    services, stub_dir = _start_small_targets(cfg, work)
    try:
        for size in SMALL_SIZES:
            for target, service in services.items():
                preload(Load(target, service.address, "get", size, f"s{size}", stub_dir))
            for op in ("set", "get"):
                for clients in (1, 16):
                    for rep in range(cfg.repeat):
                        log(f"small {op} {_size_label(size)} x{clients} clients {rep + 1}/{cfg.repeat}")
                        for target, service in services.items():
                            load = Load(target, service.address, op, size, f"s{size}", stub_dir)
                            profile = cfg.profile and rep == 0 and target == "blobstore" and clients == 16
                            with profiled(cfg, service, f"small-{op}-{size}") if profile else contextlib.nullcontext():
                                rate = measure(load, clients, cfg.client_procs, cfg.seconds, service.cpu_seconds)
                            res.sample(f"small.{op}.{size}.{clients}.{target}", rate["calls_per_s"])
                            record_cpu(res, f"small.{op}.{size}.{clients}.{target}", rate)
                    name = f"{op.capitalize()} {_size_label(size)}, " + (
                        "sequential" if clients == 1 else f"{clients} clients / {cfg.client_procs} processes"
                    )
                    key = f"small.{op}.{size}.{clients}"
                    res.details.append(cpu_per_value_detail(res, name, key, tuple(services)))
                    res.ratio_row(name, f"{key}.blobstore", f"{key}.bare", "bare aio servicer", "calls/s", 0.8)
                    res.report_row(
                        name,
                        f"{key}.blobstore",
                        f"{key}.etcd",
                        "etcd v3 " + ("Put" if op == "set" else "Range"),
                        "calls/s",
                    )
    finally:
        for service in services.values():
            service.stop()
        shutil.rmtree(work / "blobstore" / "data", ignore_errors=True)


def case_batch(cfg: Config, res: Results) -> None:
    work = cfg.workdir / "batch"
    (work / "etcd-stubs").mkdir(parents=True, exist_ok=True)
    stub_dir = etcd.generate(str(work / "etcd-stubs"))
    services = {"blobstore": procs.start_blobstore(work / "blobstore"), "etcd": procs.start_etcd(work)}
    clients = 16
    try:
        for size in SMALL_SIZES:
            for target, service in services.items():
                preload(Load(target, service.address, "get", size, f"b{size}", stub_dir))
            for op in ("batch-set", "batch-get"):
                for rep in range(cfg.repeat):
                    log(f"batch {op} {_size_label(size)} {rep + 1}/{cfg.repeat}")
                    for target, service in services.items():
                        load = Load(target, service.address, op, size, f"b{size}", stub_dir)
                        rate = measure(load, clients, cfg.client_procs, cfg.seconds, service.cpu_seconds)
                        res.sample(f"{op}.{size}.{target}", rate["values_per_s"])
                        record_cpu(res, f"{op}.{size}.{target}", rate)
                verb = "set_many" if op == "batch-set" else "get_many"
                etcd_op = "Puts" if op == "batch-set" else "Ranges"
                title = f"{verb} 100 x {_size_label(size)}"
                ours, theirs = (
                    {side: res.median(f"cpu.{op}.{size}.{target}.{side}") for side in ("client", "server")}
                    for target in ("blobstore", "etcd")
                )
                # Clients and servers share the machine's cores: with every core busy, values/s
                # follow the CPU both ends spend per value, and our client's share alone bounds ours.
                res.details.append(
                    cpu_per_value_detail(res, title, f"{op}.{size}", tuple(services))
                    + f"; if CPU alone set the rates: {sum(theirs.values()) / sum(ours.values()):.2f}x etcd, "
                    f"and {sum(theirs.values()) / ours['client']:.2f}x with a server that cost nothing"
                )
                res.ratio_row(
                    f"{verb} 100 x {_size_label(size)}, {clients} clients",
                    f"{op}.{size}.blobstore",
                    f"{op}.{size}.etcd",
                    f"etcd Txn of 100 {etcd_op}",
                    "values/s",
                    1.5,
                )
    finally:
        for service in services.values():
            service.stop()
        shutil.rmtree(work / "blobstore" / "data", ignore_errors=True)


def _load_scale_range(address: str, start: int, end: int) -> None:
    from blobstore.client import Storage

    value = b"v" * 100
    with Storage(address) as storage:
        for first in range(start, end, 1000):
            storage.set_many({f"scale/{i:08d}": value for i in range(first, min(end, first + 1000))})


def scale_level_order(levels: list[int], rep: int) -> list[int]:
    """The order in which repetition `rep` measures the scale levels: low to high, rotated one
    place further each time, so that over as many repetitions as there are levels each level is
    measured once in every place, and no level always meets the machine fresher or more tired."""
    ordered = sorted(levels)
    shift = rep % len(ordered)
    return ordered[shift:] + ordered[:shift]


def _load_scale_level(address: str, level: int) -> float:
    """Loads keys 0..level into the server at `address` with two loader processes; values/s."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    loaders = 2
    bounds = [level * i // loaders for i in range(loaders + 1)]
    workers = [
        context.Process(target=_load_scale_range, args=(address, bounds[i], bounds[i + 1])) for i in range(loaders)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError("a scale loader failed")
    return level / (time.perf_counter() - started)


def _measure_scale_level(cfg: Config, res: Results, address: str, level: int, rep: int) -> None:
    """Sequential Set and Get rates on random keys of the level's key space, and the median
    latency of List pages at ten random places in it."""
    from blobstore.client import Storage
    from blobstore.v1 import storage_pb2 as pb

    for op in ("set", "get"):
        load = Load("blobstore", address, op, 100, "scale", keyspace=level)
        res.sample(f"scale.{op}.{level}", measure(load, 1, 1, cfg.seconds)["calls_per_s"])
    with Storage(address) as storage:
        # Pages anywhere in the key space, not only at its start: scale/NNNNN covers
        # the 1,000 keys scale/NNNNN000..scale/NNNNN999.
        places = random.Random(f"{level}/{rep}")
        latencies = []
        for _ in range(10):
            region = places.randrange(max(1, level // 1000))
            request = pb.ListRequest(prefix=f"scale/{region:05d}", page_size=1000)
            started = time.perf_counter()
            response = storage._stub.List(request)
            latencies.append(time.perf_counter() - started)
            assert len(response.objects) == min(1000, level), "a region of the key space was not loaded"
    res.sample(f"scale.list.{level}", statistics.median(latencies) * 1000)


def case_scale(cfg: Config, res: Results) -> None:
    """Every level in its own server, all loaded first and running together, then measured in
    turns (scale_level_order): a level measured after all the others would measure the disk's
    state at that hour, not its key count (docs/benchmarks.md)."""
    work = cfg.workdir / "scale"
    levels = sorted(set(cfg.scale))
    servers: dict[int, Service] = {}
    try:
        for level in levels:
            servers[level] = procs.start_blobstore(work / f"blobstore-{level}")
        for level in levels:
            log(f"scale: loading {level:,} keys with set_many into their own server")
            res.sample(f"scale.load.{level}", _load_scale_level(servers[level].address, level))
        for rep in range(cfg.repeat):
            for level in scale_level_order(levels, rep):
                log(f"scale {rep + 1}/{cfg.repeat}, {level:,} keys: Set, Get, List pages")
                _measure_scale_level(cfg, res, servers[level].address, level, rep)
    finally:
        for level, server in servers.items():
            server.stop()
            shutil.rmtree(work / f"blobstore-{level}" / "data", ignore_errors=True)
    low, high = levels[0], levels[-1]
    for op in ("set", "get"):
        res.ratio_row(
            f"{op.capitalize()} rate at {high:,} keys vs {low:,}",
            f"scale.{op}.{high}",
            f"scale.{op}.{low}",
            f"same at {low:,} keys",
            "calls/s",
            round(1 / 1.5, 2),
        )
    # Latency: smaller is better, so the ratio is low/high (1M no more than 1.5x slower than 10k).
    at_low, at_high = res.median(f"scale.list.{low}"), res.median(f"scale.list.{high}")
    res.rows.append(
        Row(
            f"List page (1000 keys) latency at {high:,} keys vs {low:,}",
            at_high,
            f"same at {low:,} keys",
            at_low,
            "ms",
            ">= 0.67x (latency low/high)",
            lambda r: r >= 1 / 1.5,
            at_low / at_high,
        )
    )
    lines = [
        "| keys | load with set_many (values/s) | Set (calls/s) | Get (calls/s) | List page (ms) |",
        "|---|---|---|---|---|",
    ]
    for level in levels:
        lines.append(
            f"| {level:,} | {res.median(f'scale.load.{level}'):,.0f} | {res.median(f'scale.set.{level}'):,.0f} | "
            f"{res.median(f'scale.get.{level}'):,.0f} | {res.median(f'scale.list.{level}'):.2f} |"
        )
    res.details.append("Scale (medians):\n\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(res: Results) -> list[str]:
    lines = [
        "| case | blobstore | reference | reference value | unit | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in res.rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(
            f"| {row.case} | {fmt(row.ours)} | {row.reference_name} | {fmt(row.reference)} | {row.unit} | "
            f"{ratio} | {row.target} | {row.met} |"
        )
    return lines


BEGIN, END = "<!-- bench:begin (generated by make bench) -->", "<!-- bench:end -->"


def write_report(cfg: Config, res: Results, machine: dict[str, str], versions: dict[str, str], took: float) -> None:
    body = [
        BEGIN,
        "",
        f"Generated by `make bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {took / 60:.1f} minutes",
    ]
    body.append(
        f"(repeats: {cfg.repeat}, large transfers: {cfg.large_bytes // MiB} MiB, "
        f"small-value window: {cfg.seconds:g} s, "
        f"scale: {', '.join(f'{n:,}' for n in cfg.scale)} keys{', QUICK smoke run' if cfg.quick else ''}).\n"
    )
    body += ["### Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()]
    body += ["", "### Versions", ""] + [f"- {k}: {v}" for k, v in versions.items()]
    body += ["", "### Results (medians)", "", *table(res)]
    if res.skipped:
        body += ["", "Skipped:", ""] + [f"- {s}" for s in res.skipped]
    if res.details:
        body += ["", "### Details", ""] + [f"{d}\n" for d in res.details]
    body += ["", "### Every run", "", "| sample | runs |", "|---|---|"]
    body += [f"| {name} | {', '.join(fmt(v) for v in values)} |" for name, values in res.samples.items()]
    body += ["", END]
    generated = "\n".join(body)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.out.exists() and BEGIN in (text := cfg.out.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        cfg.out.write_text(head + generated + tail)
    else:
        cfg.out.write_text("# Benchmarks\n\n" + generated + "\n")
    log(f"report written to {cfg.out}")


def main() -> None:
    cfg = Config.from_env()
    began = time.perf_counter()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    missing = env.ensure_tools()
    if cfg.profile and not (procs.BIN / "py-spy").exists():
        subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "py-spy"], check=False)
    machine = env.machine(cfg.workdir)
    # The disk's sync latency and a thread hand-off bound every small write; both drift, so
    # they are measured at the start and again at the end of the run.
    log("machine limits: fdatasync latency, thread round trip")
    machine.update(measured := limits.machine_limits(cfg.workdir, "at start"))
    log("; ".join(f"{name}: {value}" for name, value in measured.items()))
    versions = env.versions()
    res = Results()
    source = make_source(cfg) if {"upload", "download", "signed"} & set(cfg.cases) else None
    runners: dict[str, Callable[[], None]] = {
        "upload": lambda: case_upload(cfg, res, source),  # type: ignore[arg-type]
        "download": lambda: case_download(cfg, res, source),  # type: ignore[arg-type]
        "signed": lambda: case_signed(cfg, res, source),  # type: ignore[arg-type]
        "small": lambda: case_small(cfg, res),
        "batch": lambda: case_batch(cfg, res),
        "scale": lambda: case_scale(cfg, res),
    }
    needs = {"signed": ["nginx", "curl"], "small": ["etcd"], "batch": ["etcd"]}
    for case in cfg.cases:
        absent = [tool for tool in needs.get(case, []) if tool in missing]
        if absent:
            res.skipped.append(f"{case}: {', '.join(absent)} could not be installed; case skipped")
            log(res.skipped[-1])
            continue
        log(f"case {case}")
        runners[case]()
    if source is not None:
        source.unlink(missing_ok=True)
    log("machine limits again: fdatasync latency, thread round trip")
    machine.update(measured := limits.machine_limits(cfg.workdir, "at end"))
    log("; ".join(f"{name}: {value}" for name, value in measured.items()))
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("\n".join(table(res)))
    for skipped in res.skipped:
        print(f"skipped: {skipped}")
    write_report(cfg, res, machine, versions, time.perf_counter() - began)


if __name__ == "__main__":
    main()
