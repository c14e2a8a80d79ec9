"""Starting, watching and stopping the processes a case measures."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

PYTHON = sys.executable
BIN = Path(PYTHON).parent
ROOT = Path(__file__).resolve().parent.parent
# Children run in their own work folders and still import bench.*.
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Service:
    """A server subprocess we started, with its own log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    extra_ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def reset_peak_rss(self) -> bool:
        return reset_peak_rss(self.pid)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def reset_peak_rss(pid: int) -> bool:
    """Resets the process's VmHWM (Linux 4.0+); False where the kernel will not."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM") / 1024


def _status_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def start(name: str, argv: list[str], workdir: Path, port: int, ready: Callable[[Service], bool]) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=CHILD_ENV)
    service = Service(name, process, port, workdir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {workdir / (name + '.log')}")
        try:
            if ready(service):
                return service
        except Exception:
            pass
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"{name} did not become ready in 60 s; see {workdir / (name + '.log')}")


def grpc_ready(service: Service) -> bool:
    with grpc.insecure_channel(service.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=1)
    return True


def start_blobstore(workdir: Path, extra_args: list[str] | None = None) -> Service:
    data = workdir / "data"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    argv = [str(BIN / "blobstore"), "serve", "--data-dir", str(data), "--port", str(port), "--log-level", "warning"]
    return start("blobstore", argv + (extra_args or []), workdir, port, grpc_ready)


def start_bare(workdir: Path, mode: str, blob: Path | None = None, chunk_size: int = 1 << 20) -> Service:
    port = free_port()
    argv = [PYTHON, "-m", "bench.bare", "--mode", mode, "--port", str(port), "--data-dir", str(workdir)]
    if blob is not None:
        argv += ["--blob", str(blob), "--chunk-size", str(chunk_size)]
    return start(f"bare-{mode}", argv, workdir, port, grpc_ready)


def start_etcd(workdir: Path) -> Service:
    data = workdir / "etcd-data"
    shutil.rmtree(data, ignore_errors=True)
    port, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    argv = [
        "etcd",
        "--name=bench",
        f"--data-dir={data}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=bench={peer_url}",
        "--quota-backend-bytes=8589934592",
        "--log-level=warn",
    ]
    return start("etcd", argv, workdir, port, grpc_ready)


def start_nginx(workdir: Path, root: Path) -> Service:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"""daemon off;
worker_processes 1;
error_log {workdir}/nginx-error.log;
pid {workdir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {workdir}/nginx-tmp;
    proxy_temp_path {workdir}/nginx-tmp;
    fastcgi_temp_path {workdir}/nginx-tmp;
    uwsgi_temp_path {workdir}/nginx-tmp;
    scgi_temp_path {workdir}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
    )

    def ready(service: Service) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    return start("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)], workdir, port, ready)


def run_json(argv: list[str], timeout: float = 1800) -> dict[str, float]:
    """Runs a measuring child (`python -m bench.transfer ...`) and returns the JSON it prints."""
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, env=CHILD_ENV)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def instructions(module_argv: list[str]) -> int:
    """Instructions that `python -m MODULE_ARGV...` executes, counted by valgrind (cachegrind):
    unlike CPU time, the same from run to run on a shared machine."""
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    argv += [sys.executable, "-m", *module_argv]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def instructions_per_call(module: str, op: str, size: int, few: int, many: int, *extra: str) -> float:
    """Instructions per call of a per-call benchmark (`python -m MODULE OP --size ... --calls N
    --rounds 1 EXTRA...`): the difference between runs of `few` and `many` calls, so that
    start-up and set-up cancel out."""

    def count(calls: int) -> int:
        return instructions([module, op, "--size", str(size), "--calls", str(calls), "--rounds", "1", *extra])

    return (count(many) - count(few)) / (many - few)


def set_get_options(description: str | None, calls: int, **more: int) -> tuple[argparse.Namespace, list[str]]:
    """The options of a per-call benchmark of Set and Get: the operations (both by default),
    --size, --calls per round, --rounds, --instructions, and `more` integer options with their
    defaults. Returns them and the operations chosen."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="*", help="set, get or both (the default)")
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--calls", type=int, default=calls)
    parser.add_argument("--rounds", type=int, default=5)
    for name, default in more.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--instructions", action="store_true", help="count instructions with valgrind")
    args = parser.parse_args()
    ops = args.ops or ["set", "get"]
    if not set(ops) <= {"set", "get"}:
        parser.error("operations are set and get")
    return args, ops
