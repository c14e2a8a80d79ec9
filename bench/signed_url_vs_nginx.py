"""Download throughput of a signed URL against nginx serving the same bytes from the same disk.

    .venv/bin/python bench/signed_url_vs_nginx.py [--size-mib 1024] [--rounds 5] [--workdir DIR]

Writes a random file into WORKDIR/www, uploads it to a blobstore server (a
subprocess, data in WORKDIR/data) through a signed PUT URL with curl, then
downloads it with curl alternately through a signed GET URL and from Debian's
nginx (its own non-daemon process, root WORKDIR/www, sendfile on). One warm-up
download each, so both read from the page cache; the median of the rounds is
reported. Both servers are stopped by PID at the end. Needs curl and nginx
(installed with apt-get when missing and running as root).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


def ensure_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"{name} is missing: apt-get install -y {package}")
    return path


def curl_download(url: str, expected_size: int) -> float:
    """Bytes per second of one download to /dev/null."""
    result = subprocess.run(
        ["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
    )
    size, seconds = result.stdout.split()
    if int(size) != expected_size:
        raise SystemExit(f"{url} gave {size} bytes, expected {expected_size}")
    return expected_size / float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", help="where the file, the data dir and nginx live (default: a temp dir)")
    parser.add_argument("--grpc-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--http-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--nginx-port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()

    ensure_tool("curl", "curl")
    nginx = ensure_tool("nginx", "nginx")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blobstore-bench-"))
    www, prefix = workdir / "www", workdir / "nginx"
    www.mkdir(parents=True, exist_ok=True)
    prefix.mkdir(exist_ok=True)
    size = args.size_mib * MiB
    blob = www / "blob.bin"
    digest = hashlib.sha256()
    with open(blob, "wb") as f:
        for _ in range(args.size_mib):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())

    grpc_port = args.grpc_port or free_port()
    http_port = args.http_port or free_port()
    nginx_port = args.nginx_port or free_port()
    serve = ["serve", "--data-dir", str(workdir / "data"), "--port", str(grpc_port), "--http-port", str(http_port)]
    server = subprocess.Popen([sys.executable, "-m", "blobstore.client.cli", *serve, "--log-level", "warning"])
    (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, port=nginx_port, root=www))
    proxy: subprocess.Popen[bytes] | None = None
    try:
        wait_for_port(http_port, server)
        wait_for_port(grpc_port, server)
        from blobstore.client import Storage

        with Storage(f"127.0.0.1:{grpc_port}") as storage:
            upload_url = storage.get_upload_url("bench/blob.bin")
            started = time.monotonic()
            subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(blob), upload_url], check=True)
            upload_s = time.monotonic() - started
            if storage.stat("bench/blob.bin").sha256 != digest.hexdigest():
                raise SystemExit("the uploaded object's SHA-256 differs from the file's")
            download_url = storage.get_signed_url("bench/blob.bin")

        proxy = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
        wait_for_port(nginx_port, proxy)
        nginx_url = f"http://127.0.0.1:{nginx_port}/blob.bin"

        curl_download(download_url, size)  # warm-up: both read from the page cache afterwards
        curl_download(nginx_url, size)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(curl_download(download_url, size))
            theirs.append(curl_download(nginx_url, size))
    finally:
        for process in (proxy, server):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    print(
        f"object: {args.size_mib} MiB, {args.rounds} rounds after one warm-up each, curl to /dev/null, page cache warm"
    )
    print(f"upload through a signed PUT URL (curl -T, fsync per chunk): {size / upload_s / MiB:8.0f} MiB/s")
    print(
        f"download through a signed GET URL: median {ours_median / MiB:8.0f} MiB/s "
        f"(min {min(ours) / MiB:.0f}, max {max(ours) / MiB:.0f})"
    )
    print(
        f"nginx {subprocess.run([nginx, '-v'], capture_output=True, text=True).stderr.split('/')[-1].strip()}"
        f" (sendfile on):       median {theirs_median / MiB:8.0f} MiB/s "
        f"(min {min(theirs) / MiB:.0f}, max {max(theirs) / MiB:.0f})"
    )
    print(f"ratio blobstore / nginx: {ours_median / theirs_median:.2f}")


if __name__ == "__main__":
    main()
