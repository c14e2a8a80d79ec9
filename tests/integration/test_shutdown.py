"""Graceful shutdown: in-flight transfers finish or get UNAVAILABLE; nothing is half-committed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from blobstore.client import Storage
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import start_server, stop_server

MiB = 1 << 20


def slow_upload(key: str, pieces: int, pause: float) -> Iterator[pb.UploadRequest]:
    for i in range(pieces):
        data = b"x" * MiB if key == "short" else os.urandom(MiB)
        message = pb.UploadRequest(write_offset=i * MiB, data=data)
        if i == 0:
            message.spec.CopyFrom(pb.UploadSpec(key=key))
        yield message
        time.sleep(pause)
    yield pb.UploadRequest(write_offset=pieces * MiB, finish_write=True)


def test_stop_lets_short_transfers_finish_and_cuts_long_ones_with_unavailable(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data", shutdown_grace_s=1.0)
    stub = pb_grpc.StorageStub(grpc.insecure_channel(running.address))
    outcomes: dict[str, object] = {}

    def upload(key: str, pieces: int, pause: float) -> None:
        try:
            outcomes[key] = stub.Upload(slow_upload(key, pieces, pause)).object.size
        except grpc.RpcError as exc:
            outcomes[key] = exc.code()

    short = threading.Thread(target=upload, args=("short", 3, 0.1))
    endless = threading.Thread(target=upload, args=("endless", 1000, 0.05))
    short.start()
    endless.start()
    time.sleep(0.2)
    stop_server(running, grace=1.0)
    short.join(10)
    endless.join(10)
    assert outcomes["short"] == 3 * MiB
    assert outcomes["endless"] == grpc.StatusCode.UNAVAILABLE

    again = start_server(tmp_path / "data")
    try:
        with again.client() as storage:
            assert storage.stat("short").size == 3 * MiB
            assert not storage.exists("endless")
        # The cut-off upload left none of its chunks behind: only the one chunk "short" repeats.
        assert len(set(again.engine.chunks.iter_digests())) == 1
    finally:
        stop_server(again)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_process_shuts_down_cleanly_on_signals(tmp_path: Path, signum: int) -> None:
    port = free_port()
    process = subprocess.Popen(
        # Both ports free: the HTTP default (50052) may be taken on a shared machine.
        [
            sys.executable,
            "-m",
            "blobstore.client.cli",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--port",
            str(port),
            "--http-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Storage(f"127.0.0.1:{port}", timeout=2) as storage:
                    storage.set("k", b"v")
                    break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert "stopped" in output
