"""Bit rot: a flipped byte in a chunk file is answered with DATA_LOSS, and scrub names what it hurts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobstore.client import DataLossError, Storage
from blobstore.server.scrub import ScrubReport, scrub
from tests.conftest import RunningServer

# Chunk files, a small file system and server subprocesses on their own data dir: the file-lmdb pass only.
pytestmark = pytest.mark.file_store

KiB = 1 << 10


def _scrub_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`blobstore scrub` in its own process, as an operator runs it beside the live server."""
    command = [sys.executable, "-m", "blobstore.client.cli", "scrub", "--data-dir", str(data_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _scrub(server: RunningServer) -> ScrubReport:
    return scrub(server.engine.index, server.engine.chunks)


def _chunk_paths(data_dir: Path) -> list[Path]:
    return sorted(Path(root) / name for root, _, names in os.walk(data_dir / "store" / "chunks") for name in names)


def _flip_a_byte(path: Path, position: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_corrupt_chunk_is_data_loss_over_grpc_and_scrub_reports_it(server: RunningServer, storage: Storage) -> None:
    value = os.urandom(200 * KiB)  # above the inline threshold: stored as a chunk file
    storage.set("victim", value)
    storage.set("bystander", os.urandom(300 * KiB))
    storage.set("small", b"inline values live in the index")
    before = set(_chunk_paths(server.data_dir))
    storage.set("victim", value)  # deduplicated: no new chunk
    assert set(_chunk_paths(server.data_dir)) == before
    victim_chunk = server.data_dir / "store" / "chunks"
    digest = storage.stat("victim").sha256  # one chunk: the chunk's name is the object's SHA-256
    victim_chunk = victim_chunk / digest[:2] / digest[2:4] / digest
    assert _scrub(server).ok

    _flip_a_byte(victim_chunk)

    with pytest.raises(DataLossError):
        storage.get("victim")
    with pytest.raises(DataLossError):
        storage.get_file("victim", str(server.data_dir.parent / "out.bin"))
    assert not (server.data_dir.parent / "out.bin").exists()
    assert len(storage.get("bystander")) == 300 * KiB
    report = _scrub(server)
    assert not report.ok
    assert report.corrupt == [digest]
    assert report.affected_keys() == ["default/data/victim"]
    result = _scrub_cli(server.data_dir)
    assert result.returncode == 9, result.stdout  # the CLI's exit code for data loss
    assert f"corrupt chunk {digest}, used by: default/data/victim" in result.stdout


def test_scrub_reports_a_missing_chunk_and_passes_on_an_intact_store(server: RunningServer, storage: Storage) -> None:
    storage.set("a/one", os.urandom(100 * KiB))
    storage.set("a/two", os.urandom(100 * KiB))
    clean = _scrub_cli(server.data_dir)
    assert clean.returncode == 0, clean.stdout
    assert "checked 2 chunks" in clean.stdout
    digest = storage.stat("a/two").sha256
    path = server.data_dir / "store" / "chunks" / digest[:2] / digest[2:4] / digest
    path.unlink()
    with pytest.raises(DataLossError, match="missing"):
        storage.get("a/two")
    result = _scrub_cli(server.data_dir, "--json")
    assert result.returncode == 9
    report = json.loads(result.stdout)
    assert report["missing"] == [digest]
    assert report["affected"] == {digest: ["default/data/a/two"]}
