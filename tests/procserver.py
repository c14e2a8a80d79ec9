"""A blobstore server in a child process, for tests that kill it (SIGKILL) and start it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """`blobstore serve` as a subprocess on port 0 (then the same port on every restart)."""

    def __init__(self, data_dir: Path, *, chunk_size: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = 0
        if chunk_size is not None:
            extra_args = ("--set", f"engine.chunk_size={chunk_size}", *extra_args)
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._port_file = data_dir.parent / f"{data_dir.name}.port"
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        assert self.process is None, "already running"
        self._port_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "blobstore.client.cli", "serve",
            "--data-dir", str(self.data_dir), "--port", str(self.port),
            "--http-port", "0", "--set", f"port_file={self._port_file}", "--log-level", "warning", *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start; its log:\n{self.log_tail()}")
            time.sleep(0.02)
        self.port = int(self._port_file.read_text())
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or a power cut of the process."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
