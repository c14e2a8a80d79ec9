"""Real PostgreSQL and Ceph RADOS Gateway on loopback, installed and started by the tests themselves.

Each service lives in one temp folder (config, data, sockets, logs) and runs as
foreground processes in the background of this process, stopped by their PIDs.
Nothing is written under /etc or /var. Missing Debian packages are installed with
apt-get when we are root; when that is impossible, `Unavailable` says why, so
the caller can skip loudly instead of failing.

Run by hand (for the benchmark or a look around):
    python -m tests.infra.services        # starts both, prints their settings, waits for Ctrl-C
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PG_PACKAGES = ("postgresql",)
CEPH_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
# The OSD picks free ports inside this range (it takes several); the mon and the
# gateway get ports of their own from the OS.
CEPH_PORT_MIN = int(os.environ.get("BLOBSTORE_CEPH_PORT_MIN", "51850"))
CEPH_PORT_MAX = int(os.environ.get("BLOBSTORE_CEPH_PORT_MAX", "51899"))

S3_ACCESS_KEY = "blobstoretest"
S3_SECRET_KEY = "blobstoretestsecret"  # a loopback test cluster with no data worth a real secret


class Unavailable(RuntimeError):
    """The service cannot run on this machine; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}; see {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port} after {timeout}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_packages(binaries: tuple[str, ...], packages: tuple[str, ...]) -> None:
    if all(_which(b) for b in binaries):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(packages)} not installed, and apt-get is impossible here (not root or no apt)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "env": env}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", *packages]
    done = subprocess.run(install, check=False, **quiet)  # type: ignore[call-overload]
    if done.returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update"], check=False, **quiet)  # type: ignore[call-overload]
        done = subprocess.run(install, check=False, **quiet)  # type: ignore[call-overload]
    if done.returncode != 0 or not all(_which(b) for b in binaries):
        raise Unavailable(f"apt-get install {' '.join(packages)} failed: {done.stderr.decode(errors='replace')[-800:]}")


def _which(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    # Debian keeps PostgreSQL's server programs out of PATH.
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in versions:
        if (folder / binary).exists():
            return str(folder / binary)
    return None


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster owned by the `postgres` user, on 127.0.0.1."""

    durable: bool = False  # fsync off for tests: a crash of the test machine loses nothing of value
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="blobstore-pg-")))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> Postgres:
        ensure_packages(("initdb", "postgres"), PG_PACKAGES)
        data = self.root / "data"
        as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            shutil.chown(self.root, "postgres", "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        log = self.root / "postgres.log"
        subprocess.run(
            [*as_user, _which("initdb") or "initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.port = _free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "300",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "shared_buffers": "64MB",
        }
        args = [*as_user, _which("postgres") or "postgres", "-D", str(data)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, 60, self.process, log)
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                [_which("pg_isready") or "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
                stdout=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not become ready; see {log}:\n{_tail(log)}")
            time.sleep(0.1)

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = {port_min}
ms bind port max = {port_max}
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
paxos propose interval = 0.01
paxos min wait = 0.01
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data = {root}/mon/$cluster-$id
osd data = {root}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
keyring = {root}/keyring
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
rgw gc obj min wait = 60
rgw gc processor period = 60

[client.rgw.gw]
# tcp_nodelay: without it a small GET (one chunk under about 1 MiB) waits 40 ms for the
# client's delayed ACK before the body's last segment leaves (Nagle): measured 44-48 ms
# against 1-3 ms for a 1-byte object.
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {root}/rgw
rgw thread pool size = 64
"""


@dataclass
class CephRgw:
    """A one-node Ceph cluster (mon, memstore OSD) with a RADOS Gateway: a real S3 endpoint."""

    memstore_bytes: int = 4 << 30  # a limit, not an allocation: objects take RAM as they arrive
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="blobstore-ceph-")))
    rgw_port: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    def _ceph(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [*args[:1], "-c", str(self.conf), *args[1:]],
            check=False,
            capture_output=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.decode(errors='replace')[-1500:]}")
        return done.stdout.decode()

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            process = subprocess.Popen(
                [*args[:1], "-c", str(self.conf), *args[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def start(self) -> CephRgw:
        ensure_packages(("ceph-mon", "ceph-osd", "radosgw", "monmaptool", "ceph-authtool"), CEPH_PACKAGES)
        for sub in ("mon", "osd", "run", "log", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_v2, mon_v1, self.rgw_port = _free_port(), _free_port(), _free_port()
        self.conf.write_text(
            _CEPH_CONF.format(
                fsid=fsid,
                root=self.root,
                mon_v2=mon_v2,
                mon_v1=mon_v1,
                rgw_port=self.rgw_port,
                port_min=CEPH_PORT_MIN,
                port_max=CEPH_PORT_MAX,
                memstore_bytes=self.memstore_bytes,
            )
        )
        keyring = str(self.root / "keyring")
        self._ceph("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        monmap = str(self.root / "monmap")
        self._ceph(
            "monmaptool",
            "--create",
            "--fsid",
            fsid,
            "--addv",
            "a",
            f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]",
            monmap,
        )
        self._ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        mon = self._spawn("mon", "ceph-mon", "-i", "a", "-f")
        _wait_port(mon_v2, 30, mon, self.root / "log" / "mon.out")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("ceph", "osd", "new", osd_uuid).strip()
        (self.root / "osd" / f"ceph-{osd_id}").mkdir(parents=True, exist_ok=True)
        self._ceph("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        osd = self._spawn("osd", "ceph-osd", "-i", osd_id, "-f")
        deadline = time.monotonic() + 60
        while f"osd.{osd_id} up" not in self._ceph("ceph", "osd", "dump"):
            if osd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the OSD did not come up:\n{_tail(self.root / 'log' / 'osd.out')}")
            time.sleep(0.1)
        rgw = self._spawn("rgw", "radosgw", "-n", "client.rgw.gw", "-f")
        _wait_port(self.rgw_port, 120, rgw, self.root / "log" / "rgw.out")
        self._ceph(
            "radosgw-admin",
            "user",
            "create",
            "--uid=blobstore",
            "--display-name=blobstore tests",
            f"--access-key={self.access_key}",
            f"--secret-key={self.secret_key}",
        )
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):  # radosgw, osd, mon
            _stop(process)
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:
    pg = Postgres(durable=True).start()
    try:
        ceph = CephRgw().start()
        try:
            print("export BLOBSTORE_CHUNK_STORE=s3 BLOBSTORE_INDEX=postgres BLOBSTORE_S3_BUCKET=blobstore")
            print(f"export BLOBSTORE_POSTGRES_DSN='{pg.dsn}' BLOBSTORE_S3_ENDPOINT={ceph.endpoint}")
            print(f"export BLOBSTORE_S3_ACCESS_KEY={ceph.access_key} BLOBSTORE_S3_SECRET_KEY={ceph.secret_key}")
            print("export BLOBSTORE_URL_SIGNING_SECRETS='[\"a secret the replicas share\"]'", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            ceph.stop()
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
