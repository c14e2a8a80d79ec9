"""`blobstore token` and `blobstore quota` as a user runs them: subprocesses against a live server's data dir."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.client import AuthenticationError, ResourceExhaustedError
from blobstore.client.cli import EXIT_CONFIG, serve, tenant_settings
from blobstore.server.app import ServerConfig
from blobstore.server.config import load_config
from tests.conftest import RunningServer, start_server, stop_server


def blobstore(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "blobstore.client.cli", *args], capture_output=True, text=True, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"blobstore {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.fixture
def live(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path / "data")
    yield running
    stop_server(running)


@pytest.mark.file_store
def test_token_create_list_revoke_against_a_running_server(live: RunningServer) -> None:
    data_dir = str(live.data_dir)
    created = blobstore("token", "create", "--data-dir", data_dir, "--namespace", "carol", "--description", "laptop")
    token = created.stdout.strip()
    assert token.startswith("bst_") and "\n" not in token
    assert "carol" in created.stderr

    with live.client(token=token) as carol:
        carol.set("k", b"v")
        assert carol.limits().namespace == "carol"
        with live.client() as anonymous, pytest.raises(AuthenticationError):
            anonymous.get("k")  # the first token closed the open server

        listing = blobstore("token", "list", "--data-dir", data_dir).stdout
        assert "carol" in listing and "laptop" in listing and "user" in listing
        assert token not in listing and token[4:20] not in listing
        token_id = next(line.split()[0] for line in listing.splitlines() if "carol" in line)

        blobstore("token", "revoke", "--data-dir", data_dir, token_id[:8])
        with pytest.raises(AuthenticationError):
            carol.get("k")
    assert "carol" not in blobstore("token", "list", "--data-dir", data_dir).stdout


def test_token_commands_refuse_bad_input_with_one_line(live: RunningServer) -> None:
    data_dir = str(live.data_dir)
    bad_namespace = blobstore("token", "create", "--data-dir", data_dir, "--namespace", "a b", check=False)
    assert bad_namespace.returncode == 5 and "namespace 'a b' is not valid" in bad_namespace.stderr
    bad_role = blobstore("token", "create", "--data-dir", data_dir, "--namespace", "a", "--role", "root", check=False)
    assert bad_role.returncode == 2 and "root" in bad_role.stderr
    unknown = blobstore("token", "revoke", "--data-dir", data_dir, "deadbeef", check=False)
    assert unknown.returncode == 3 and "no token with id" in unknown.stderr
    assert blobstore("token", "list", "--data-dir", data_dir).stdout.count("\n") == 1  # the header alone


@pytest.mark.file_store
def test_quota_set_takes_effect_on_a_running_server(live: RunningServer) -> None:
    data_dir = str(live.data_dir)
    token = blobstore("token", "create", "--data-dir", data_dir, "--namespace", "dave").stdout.strip()
    shown = blobstore("quota", "set", "--data-dir", data_dir, "dave", "--max-objects", "1", "--max-bytes", "1MiB")
    assert "1048576" in shown.stdout
    with live.client(token=token) as dave:
        dave.set("a", b"1")
        with pytest.raises(ResourceExhaustedError, match="max_objects"):
            dave.set("b", b"2")
        assert (dave.limits().objects.limit, dave.limits().bytes.limit) == (1, 1 << 20)
        blobstore("quota", "set", "--data-dir", data_dir, "dave", "--reset")
        dave.set("b", b"2")
        assert "objects              2 of 10000000" in blobstore("quota", "show", "--data-dir", data_dir, "dave").stdout


def test_serve_refuses_an_open_non_loopback_bind(tmp_path: Path) -> None:
    refused = blobstore("serve", "--data-dir", str(tmp_path / "data"), "--host", "0.0.0.0", "--port", "0", check=False)
    assert refused.returncode == EXIT_CONFIG
    assert "refusing to serve without authentication" in refused.stderr
    assert "--allow-anonymous" in refused.stderr


def test_serve_flags_reach_the_server_configuration(tmp_path: Path) -> None:
    def configured(*args: str, file: str | None = None) -> ServerConfig:
        flags = serve.make_context("serve", list(args)).params
        flags = {name: value for name, value in flags.items() if name not in ("config_file", "assignments")}
        return load_config(ServerConfig, file=file, env={}, overrides=tenant_settings(flags))

    config = configured(
        "--tmp-ttl", "12h", "--quota-bytes", "10GiB", "--quota-objects", "500", "--quota-uploads", "3",
        "--rate-limit", "7.5", "--allow-anonymous",
    )  # fmt: skip
    assert config.engine.tmp_ttl_ns == 12 * 3600 * 10**9
    quotas = config.engine.quotas
    assert (quotas.max_bytes, quotas.max_objects, quotas.max_open_uploads) == (10 << 30, 500, 3)
    assert quotas.requests_per_second == 7.5
    assert config.allow_anonymous
    assert configured() == ServerConfig()
    # An absent flag leaves the file's setting alone.
    toml = tmp_path / "blobstore.toml"
    toml.write_text("allow_anonymous = true\n[engine]\ntmp_ttl_ns = 5\n[engine.quotas]\nmax_objects = 9\n")
    from_file = configured(file=str(toml))
    assert (from_file.allow_anonymous, from_file.engine.tmp_ttl_ns, from_file.engine.quotas.max_objects) == (True, 5, 9)
    assert configured("--quota-objects", "4", file=str(toml)).engine.quotas.max_objects == 4
