"""A Node.js client made from storage.proto alone talks to a live server (skipped without node)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from blobstore.client import Storage
from tests.conftest import RunningServer

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parents[1] / "protos"
SIZE_MIB = 50

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """Installs the locked npm packages (@grpc/grpc-js, @grpc/proto-loader) once."""
    modules = HERE / "node_modules"
    lock = HERE / "package-lock.json"
    stamp = modules / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True, timeout=600)
    return modules


def test_node_client_sets_gets_streams_and_lists(node_modules: Path, server: RunningServer, storage: Storage) -> None:
    result = subprocess.run(
        ["node", str(HERE / "client.js"), server.address, str(PROTOS), str(SIZE_MIB)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    assert report["uploaded_bytes"] == SIZE_MIB << 20
    assert report["keys"] == ["node/big", "node/hello"]
    # What Node uploaded is what Python reads back.
    assert storage.get("node/hello") == b"Hello from Node.js"
    big = storage.stat("node/big")
    assert big.size == SIZE_MIB << 20
    assert big.sha256 == report["sha256"]
    assert big.crc32c == report["crc32c"]
