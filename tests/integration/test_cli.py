"""The `blobstore` command line, driven as a user would: subprocesses, output, exit codes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import grpc
import pytest

from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc
from tests.conftest import RunningServer

BLOBSTORE = str(Path(sys.executable).with_name("blobstore"))


def cli(
    *args: str, address: str | None = None, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BLOBSTORE_")}
    if address is not None:
        environment["BLOBSTORE_ADDRESS"] = address
    environment.update(env or {})
    return subprocess.run([BLOBSTORE, *args], input=stdin, capture_output=True, env=environment, timeout=120)


def error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_put_ls_stat_get_rm_round_trip(server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(3 << 20))
    a = server.address

    put = cli("put", "runs/one.bin", str(source), "-m", "owner=ana", "--content-type", "application/x-test", address=a)
    assert put.returncode == 0, put.stderr
    assert put.stdout == b""
    assert error_line(put).startswith("stored runs/one.bin (3145728 bytes, generation ")
    assert cli("put", "runs/two.txt", "-", "-q", address=a, stdin=b"hello\n").stderr == b""
    assert cli("put", "other", "-", "-q", address=a, stdin=b"x").returncode == 0

    assert cli("ls", address=a).stdout.decode().splitlines() == ["other", "runs/one.bin", "runs/two.txt"]
    assert cli("ls", "runs/", address=a).stdout.decode().splitlines() == ["runs/one.bin", "runs/two.txt"]
    long_lines = cli("ls", "runs/", "-l", address=a).stdout.decode().splitlines()
    assert [line.split()[0] for line in long_lines] == ["3145728", "6"]
    assert [line.split()[-1] for line in long_lines] == ["runs/one.bin", "runs/two.txt"]

    described = json.loads(cli("stat", "runs/one.bin", "--json", address=a).stdout)
    assert described["size"] == 3 << 20
    assert described["content_type"] == "application/x-test"
    assert described["metadata"] == {"owner": "ana"}
    text = cli("stat", "runs/two.txt", address=a).stdout.decode()
    assert "size:         6" in text

    target = tmp_path / "out.bin"
    got = cli("get", "runs/one.bin", str(target), address=a)
    assert got.returncode == 0 and got.stdout == b"" and got.stderr == b""
    assert target.read_bytes() == source.read_bytes()
    assert cli("get", "runs/two.txt", address=a).stdout == b"hello\n"
    assert cli("get", "runs/two.txt", "-", address=a).stdout == b"hello\n"

    assert cli("rm", "runs/one.bin", "other", address=a).returncode == 0
    assert cli("ls", address=a).stdout.decode().splitlines() == ["runs/two.txt"]


def test_storage_type_selects_the_key_space(server: RunningServer) -> None:
    a = server.address
    assert cli("put", "scratch", "-", "-q", "--storage-type", "tmp", address=a, stdin=b"t").returncode == 0
    assert cli("ls", address=a).stdout == b""
    assert cli("ls", "-t", "tmp", address=a).stdout == b"scratch\n"
    assert cli("get", "scratch", "-t", "tmp", address=a).stdout == b"t"
    expires = json.loads(cli("stat", "scratch", "-t", "tmp", "--json", address=a).stdout)["expires"]
    assert expires is not None


def test_errors_are_one_line_with_an_exit_code_per_class(server: RunningServer, tmp_path: Path) -> None:
    a = server.address
    assert cli("put", "kept", "-", "-q", address=a, stdin=b"v1").returncode == 0

    missing = cli("get", "nope", address=a)
    assert missing.returncode == 3
    assert error_line(missing) == "blobstore: not found: no object 'nope' in storage type data"
    assert cli("rm", "nope", address=a).returncode == 3

    exists = cli("put", "kept", "-", "--if-generation-match", "0", address=a, stdin=b"v2")
    assert exists.returncode == 4
    assert error_line(exists).startswith("blobstore: failed precondition: ")
    assert cli("get", "kept", address=a).stdout == b"v1"

    assert cli("put", "products/x", "-", "-q", "-t", "products", address=a, stdin=b"p").returncode == 0
    forbidden = cli("get", "products/x", "-t", "products", address=a)
    assert forbidden.returncode == 4
    assert "catalog" in error_line(forbidden)

    bad_key = cli("stat", "bad\x01key", address=a)
    assert bad_key.returncode == 5
    assert "control character" in error_line(bad_key)

    nowhere = cli("get", "kept", str(tmp_path / "no-such-dir" / "out"), address=a)
    assert nowhere.returncode == 10
    assert error_line(nowhere).startswith("blobstore: local file error:")

    usage = cli("get", address=a)
    assert usage.returncode == 2
    assert b"Missing argument 'KEY'" in usage.stderr


def test_an_unreachable_server_exits_8(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    result = cli("ls", "--address", f"127.0.0.1:{closed_port}")
    assert result.returncode == 8
    assert error_line(result).startswith("blobstore: unavailable: ")


@pytest.mark.parametrize("command", [[], ["serve"], ["put"], ["get"], ["ls"], ["stat"], ["rm"]])
def test_help_everywhere(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(b"Usage: blobstore")
    if not command:
        assert b"Exit codes:" in result.stdout


def test_progress_bar_only_on_a_terminal(server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 << 20))
    piped = cli("put", "big", str(source), "-q", address=server.address)
    assert piped.returncode == 0 and piped.stderr == b""

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    environment = {**os.environ, "BLOBSTORE_ADDRESS": server.address}
    process = subprocess.Popen([BLOBSTORE, "get", "big", str(tmp_path / "copy.bin")], stderr=terminal, env=environment)
    os.close(terminal)
    drawn = b""
    try:
        while True:
            try:
                piece = os.read(controller, 65536)
            except OSError:  # EIO: the program exited and everything it drew has been read
                break
            if not piece:
                break
            drawn += piece
    finally:
        os.close(controller)
        process.wait(60)
    assert process.returncode == 0
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    # tqdm's bar: a percentage, the byte rate and the time left.
    assert b"100%" in drawn
    assert b"B/s" in drawn
    assert b"<" in drawn


def _read_until(stream: object, needle: str, seen: list[str]) -> str:
    while True:
        line = stream.readline()  # type: ignore[attr-defined]
        assert line, f"server exited before {needle!r}: {seen}"
        seen.append(line)
        if needle in line:
            return str(line)


def test_serve_reads_config_file_env_and_flags_and_logs_json_with_request_ids(tmp_path: Path) -> None:
    config = tmp_path / "blobstore.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nport = 1\nlog_format = "text"\nhttp_port = 0\n'
        "[engine]\nchunk_size = 65536\n"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BLOBSTORE_")}
    # The environment beats the file (port), the flag beats the environment (log format).
    environment.update(BLOBSTORE_PORT="0", BLOBSTORE_LOG_FORMAT="text")
    process = subprocess.Popen(
        [BLOBSTORE, "serve", "--config", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    seen: list[str] = []
    try:
        started = json.loads(_read_until(process.stderr, "serving gRPC on", seen))
        address = started["message"].split(" on ")[1].split()[0]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.StorageStub(channel)
            limits = stub.GetLimits(pb.GetLimitsRequest())
            assert limits.chunk_size_bytes == 65536
            with pytest.raises(grpc.RpcError) as failure:
                stub.Get(pb.GetRequest(key="absent"), metadata=(("x-request-id", "req-7f3a"),))
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
            for _ in range(2):  # no id given: the server makes one per request
                with pytest.raises(grpc.RpcError):
                    stub.Get(pb.GetRequest(key="absent-no-id"))
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 0
    lines = [json.loads(line) for line in seen + rest.splitlines() if line.strip()]
    mine = [line for line in lines if line.get("request_id") == "req-7f3a"]
    assert len(mine) == 1, lines
    assert mine[0]["grpc_code"] == "NOT_FOUND"
    assert mine[0]["grpc_method"] == "/blobstore.v1.Storage/Get"
    assert "absent" in mine[0]["message"]
    made = [line["request_id"] for line in lines if "absent-no-id" in line.get("message", "")]
    assert len(made) == 2 and made[0] != made[1], made
    assert all(re.fullmatch("[0-9a-f]{16}", rid) for rid in made), made


def test_serve_rejects_a_bad_setting_with_exit_11(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("port = 'fifty'\n")
    result = cli("serve", "--config", str(config))
    assert result.returncode == 11
    assert error_line(result) == f"blobstore: configuration: {config}: port: 'fifty' is not a int"
    unknown = cli("serve", "--set", "engine.chunk_sise=5")
    assert unknown.returncode == 11
    assert "unknown setting 'engine.chunk_sise'" in error_line(unknown)
