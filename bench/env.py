"""What the benchmark needs on the machine, and what the machine is."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

DEBIAN_PACKAGES = {"etcd": "etcd-server", "etcdctl": "etcd-client", "nginx": "nginx", "curl": "curl"}
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def ensure_tools() -> list[str]:
    """Installs etcd, nginx and curl from Debian's packages when missing; returns what is still missing."""
    missing = [package for tool, package in DEBIAN_PACKAGES.items() if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"installing {' '.join(missing)} from Debian's packages", flush=True)
        # Installing nginx must not start a system nginx on port 80: keep services down while apt runs.
        added_policy = not POLICY_RC.exists()
        if added_policy:
            POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
            POLICY_RC.chmod(0o755)
        try:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=False, env=env
            )
        finally:
            if added_policy:
                POLICY_RC.unlink()
    return [tool for tool in DEBIAN_PACKAGES if shutil.which(tool) is None]


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine(workdir: Path) -> dict[str, str]:
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = _first_line(["sh", "-c", f"df -hT {workdir} | tail -1"])
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "disk (bench data)": " ".join(disk.split()),
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for package in ("grpcio", "protobuf", "lmdb", "google-crc32c"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["etcd"] = _first_line(["etcd", "--version"])
    found["nginx"] = _first_line(["nginx", "-v"])
    found["curl"] = _first_line(["curl", "--version"])
    return found
