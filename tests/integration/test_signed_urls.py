"""Signed URLs driven the way their users drive them: requests, curl, and a raw socket."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from click.testing import CliRunner

from blobstore.client import InvalidArgumentError, PreconditionError, Storage
from blobstore.client.cli import main as cli
from blobstore.server.engine import open_engine
from blobstore.server.signing import SECRET_FILE, rotate_secret
from tests.conftest import FakeClock, RunningServer, start_server, stop_server

MiB = 1 << 20

if shutil.which("curl") is None:  # pragma: no cover - the CI image has curl (.ci/run installs it)
    pytest.skip("curl is not installed: apt-get install -y curl", allow_module_level=True)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=300)


def chunk_files(running: RunningServer) -> list[Path]:
    return sorted(p for p in (running.data_dir / "store" / "chunks").rglob("*") if p.is_file())


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    """Waits for the server to get somewhere (not a timing assertion: only the end state is checked)."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{path}?{parts.query}"


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(pair.split("=", 1) for pair in parts.query.split("&"))
    query.update(changes)
    return f"{parts.scheme}://{parts.netloc}{parts.path}?" + "&".join(f"{k}={v}" for k, v in query.items())


def refusal(response: requests.Response) -> tuple[int, str]:
    return response.status_code, response.headers.get("x-blobstore-error", "")


# ---------------------------------------------------------------------- round trips


def test_300_mib_put_from_a_file_object_reads_back_byte_identical(
    server: RunningServer, storage: Storage, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    expected = hashlib.sha256()
    with open(source, "wb") as f:
        for _ in range(300):
            block = os.urandom(MiB)
            expected.update(block)
            f.write(block)
    url = storage.get_upload_url("big/file.bin")
    with open(source, "rb") as f:
        response = requests.put(url, data=f, headers={"Content-Type": "application/x-test"})
    assert response.status_code == 200, response.text
    assert response.json()["sha256"] == expected.hexdigest()
    assert response.json()["size"] == 300 * MiB

    got = hashlib.sha256()
    with requests.get(storage.get_signed_url("big/file.bin"), stream=True) as download:
        assert download.status_code == 200
        assert download.headers["Content-Length"] == str(300 * MiB)
        assert download.headers["Content-Type"] == "application/x-test"
        for block in download.iter_content(MiB):
            got.update(block)
    assert got.hexdigest() == expected.hexdigest()

    # The same object through gRPC: an upload by URL is an ordinary object.
    info = storage.stat("big/file.bin")
    assert (info.size, info.sha256, info.content_type) == (300 * MiB, expected.hexdigest(), "application/x-test")


def test_curl_upload_and_download_with_awkward_keys(storage: Storage, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 17)
    source = tmp_path / "in.bin"
    source.write_bytes(payload)
    for key in ["dir/with space/ünïcødé.bin", "a/../b", "./x", "q?x#y%z+&=", "a//b/", "~;,@!$'()*"]:
        put = curl("-T", str(source), "-w", "%{http_code}", "-o", "/dev/null", storage.get_upload_url(key))
        assert put.stdout == "200", (key, put)
        out = tmp_path / "out.bin"
        get = curl("-f", "-o", str(out), storage.get_signed_url(key))
        assert get.returncode == 0, (key, get.stderr)
        assert out.read_bytes() == payload, key
        assert storage.get(key) == payload
        # requests rewrites %2E to '.', but still reaches the same key.
        assert requests.get(storage.get_signed_url(key)).content == payload, key
    assert sorted(storage.list()) == sorted(
        ["dir/with space/ünïcødé.bin", "a/../b", "./x", "q?x#y%z+&=", "a//b/", "~;,@!$'()*"]
    )


def test_ranges_head_and_headers(storage: Storage, tmp_path: Path) -> None:
    payload = os.urandom(2 * MiB + 100)
    storage.set("ranged", payload, content_type="image/tiff")
    url = storage.get_signed_url("ranged")
    info = storage.stat("ranged")

    whole = requests.get(url)
    assert whole.status_code == 200 and whole.content == payload
    assert whole.headers["ETag"] == f'"{info.sha256}"'
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Type"] == "image/tiff"

    # Across a chunk boundary.
    part = requests.get(url, headers={"Range": f"bytes={MiB - 10}-{MiB + 9}"})
    assert part.status_code == 206
    assert part.content == payload[MiB - 10 : MiB + 10]
    assert part.headers["Content-Range"] == f"bytes {MiB - 10}-{MiB + 9}/{len(payload)}"
    assert part.headers["Content-Length"] == "20"
    assert part.headers["ETag"] == f'"{info.sha256}"'
    assert "x-checksum-sha256" not in part.headers  # it describes the whole object, not the part
    assert whole.headers["x-checksum-sha256"] == info.sha256

    tail = requests.get(url, headers={"Range": "bytes=-50"})
    assert (tail.status_code, tail.content) == (206, payload[-50:])
    rest = requests.get(url, headers={"Range": f"bytes={2 * MiB}-"})
    assert (rest.status_code, rest.content) == (206, payload[2 * MiB :])
    past = requests.get(url, headers={"Range": f"bytes={len(payload) - 1}-{len(payload) + 1000}"})
    assert (past.status_code, past.content) == (206, payload[-1:])

    unsatisfiable = requests.get(url, headers={"Range": f"bytes={len(payload)}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(payload)}"

    head = requests.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(payload))
    assert head.headers["ETag"] == whole.headers["ETag"]

    ranged_curl = curl("-f", "-r", "100-199", url, "-o", str(tmp_path / "r.bin"))
    assert ranged_curl.returncode == 0, ranged_curl.stderr
    assert (tmp_path / "r.bin").read_bytes() == payload[100:200]
    head_curl = curl("-I", url)
    assert "content-length: " + str(len(payload)) in head_curl.stdout.lower()

    # Small values live inline in the index: the same answers without chunk files.
    storage.set("text", "héllo")
    text = requests.get(storage.get_signed_url("text"))
    assert (text.headers["Content-Type"], text.text) == ("text/plain; charset=utf-8", "héllo")
    storage.set("tiny", b"0123456789")
    assert requests.head(storage.get_signed_url("tiny")).headers["Content-Type"] == "application/octet-stream"
    tiny = storage.get_signed_url("tiny")
    assert requests.get(tiny).content == b"0123456789"
    assert requests.get(tiny, headers={"Range": "bytes=2-4"}).content == b"234"
    storage.set("empty", b"")
    empty = requests.get(storage.get_signed_url("empty"))
    assert (empty.status_code, empty.content) == (200, b"")


def test_chunked_put_with_requests_and_curl(storage: Storage, tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in (1, 700_000, MiB, 3, 2 * MiB + 5)]

    def body() -> Iterator[bytes]:
        yield from pieces

    response = requests.put(storage.get_upload_url("chunked"), data=body())
    assert response.status_code == 200, response.text
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert storage.get("chunked") == b"".join(pieces)

    source = tmp_path / "c.bin"
    source.write_bytes(b"".join(reversed(pieces)))
    put = curl("-f", "-H", "Transfer-Encoding: chunked", "-T", str(source), storage.get_upload_url("chunked-curl"))
    assert put.returncode == 0, put.stderr
    assert storage.get("chunked-curl") == source.read_bytes()


def test_uploads_by_url_deduplicate_with_grpc_uploads(server: RunningServer, storage: Storage) -> None:
    payload = os.urandom(4 * MiB)
    storage.set("by-grpc", payload)
    before = chunk_files(server)
    assert requests.put(storage.get_upload_url("by-url"), data=payload).status_code == 200
    assert chunk_files(server) == before
    assert storage.get("by-url") == payload


# ---------------------------------------------------------------------- checksums and cut-off uploads


def test_checksum_headers_are_verified_and_a_mismatch_commits_nothing(server: RunningServer, storage: Storage) -> None:
    payload = os.urandom(MiB + 3)
    md5 = base64.b64encode(hashlib.md5(payload).digest()).decode()
    sha = hashlib.sha256(payload).digest()
    import google_crc32c

    crc = int(google_crc32c.value(payload))
    storage.set("checked", b"old value")
    baseline = chunk_files(server)
    url = storage.get_upload_url("checked")
    wrong = {
        "Content-MD5": base64.b64encode(hashlib.md5(b"other").digest()).decode(),
        "x-checksum-crc32c": f"{crc ^ 1:08x}",
        "x-checksum-sha256": hashlib.sha256(b"other").hexdigest(),
    }
    for name, value in wrong.items():
        response = requests.put(url, data=payload, headers={name: value})
        assert refusal(response) == (400, "CHECKSUM_MISMATCH"), (name, response.text)
        assert storage.get("checked") == b"old value"
    malformed = requests.put(url, data=payload, headers={"x-checksum-sha256": "nothex"})
    assert malformed.status_code == 400
    wait_for(lambda: chunk_files(server) == baseline, "the refused uploads' chunks to be freed")

    good = {
        "Content-MD5": md5,
        "x-checksum-crc32c": base64.b64encode(crc.to_bytes(4, "big")).decode(),
        "x-checksum-sha256": base64.b64encode(sha).decode(),
    }
    response = requests.put(url, data=payload, headers=good)
    assert response.status_code == 200, response.text
    assert storage.get("checked") == payload
    hex_sha = requests.put(
        url, data=payload, headers={"x-checksum-sha256": sha.hex(), "x-checksum-crc32c": f"{crc:08x}"}
    )
    assert hex_sha.status_code == 200, hex_sha.text


def _send_truncated(url: str, head: str, body: bytes) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n".encode() + body)
        sock.shutdown(socket.SHUT_WR)
        try:
            sock.recv(65536)  # the server's answer, if any, or the close
        except ConnectionResetError:
            pass


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_put_cut_off_midway_commits_nothing_and_keeps_the_old_value(
    server: RunningServer, storage: Storage, framing: str
) -> None:
    old = os.urandom(2 * MiB)
    storage.set("victim", old)
    baseline = chunk_files(server)
    url = storage.get_upload_url("victim")
    sent = os.urandom(3 * MiB)  # three whole chunks reach the chunk store before the cut
    if framing == "content-length":
        _send_truncated(url, f"Content-Length: {8 * MiB}\r\n", sent)
    else:
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(sent[i : i + 65536]), sent[i : i + 65536]) for i in range(0, len(sent), 65536)
        )
        _send_truncated(url, "Transfer-Encoding: chunked\r\n", framed)  # no final 0-chunk
    # The aborted upload frees the chunks it stored; until then it could still commit.
    wait_for(lambda: chunk_files(server) == baseline, "the cut-off upload to be thrown away")
    assert storage.get("victim") == old
    assert storage.stat("victim").generation == 1


# ---------------------------------------------------------------------- refusals


def test_altered_wrong_method_key_and_storage_type_urls_are_refused(storage: Storage) -> None:
    storage.set("mine", b"secret bytes")
    storage.set("other", b"not for you")
    storage.set("mine", b"tmp copy", storage_type="tmp")
    get_url = storage.get_signed_url("mine")
    put_url = storage.get_upload_url("mine")
    path = urlsplit(get_url).path
    assert requests.get(get_url).content == b"secret bytes"  # the control: the URL itself works

    assert refusal(requests.get(put_url)) == (403, "URL_WRONG_METHOD")
    assert refusal(requests.head(put_url)) == (403, "URL_WRONG_METHOD")
    assert refusal(requests.put(get_url, data=b"overwrite")) == (403, "URL_WRONG_METHOD")
    assert refusal(requests.get(with_path(get_url, path.replace("/mine", "/other")))) == (403, "URL_SIGNATURE_MISMATCH")
    assert refusal(requests.get(with_path(get_url, path.replace("/data/", "/tmp/")))) == (403, "URL_SIGNATURE_MISMATCH")
    assert refusal(requests.get(with_path(get_url, path.replace("/data/", "/bogus/")))) == (
        403,
        "URL_SIGNATURE_MISMATCH",
    )
    assert refusal(requests.get(with_query(get_url, ns="someone-else"))) == (403, "URL_SIGNATURE_MISMATCH")
    expires = int(dict(p.split("=") for p in urlsplit(get_url).query.split("&"))["expires"])
    assert refusal(requests.get(with_query(get_url, expires=str(expires + 3600)))) == (403, "URL_SIGNATURE_MISMATCH")
    sig = dict(p.split("=") for p in urlsplit(get_url).query.split("&"))["sig"]
    forged = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    assert refusal(requests.get(with_query(get_url, sig=forged))) == (403, "URL_SIGNATURE_MISMATCH")
    assert refusal(requests.get(with_query(get_url, expires="soon"))) == (403, "URL_MALFORMED")
    unsigned = get_url.split("?")[0]
    response = requests.get(unsigned)
    assert refusal(response) == (403, "URL_NOT_SIGNED")
    assert "not signed" in response.text

    # curl sees the same refusal, with the reason in the body.
    refused = curl("-w", "%{http_code}", put_url)
    assert refused.stdout.startswith("URL_WRONG_METHOD") and refused.stdout.endswith("403")

    # Nothing was changed by the refused PUT.
    assert storage.get("mine") == b"secret bytes"
    assert storage.get("mine", storage_type="tmp") == b"tmp copy"


def test_a_refused_put_is_refused_before_curl_sends_its_body(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "body.bin"
    source.write_bytes(os.urandom(4 * MiB))  # large enough that curl asks "Expect: 100-continue"
    get_url = storage.get_signed_url("never")
    refused = curl("-v", "-T", str(source), "-w", "%{http_code}", get_url)
    assert refused.stdout.endswith("403")
    assert "Expect: 100-continue" in refused.stderr
    assert not storage.exists("never")


def test_expired_urls_are_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    running = start_server(tmp_path / "data", engine=open_engine(str(tmp_path / "data"), clock=clock))
    try:
        with running.client() as storage:
            storage.set("k", b"v")
            url = storage.get_signed_url("k", expires_in=60)
            put_url = storage.get_upload_url("k", expires_in=60)
            clock.advance(59)
            assert requests.get(url).content == b"v"
            clock.advance(1)
            response = requests.get(url)
            assert refusal(response) == (403, "URL_EXPIRED")
            assert refusal(requests.put(put_url, data=b"late")) == (403, "URL_EXPIRED")
            assert storage.get("k") == b"v"
    finally:
        stop_server(running)


def test_missing_key_is_404_and_a_url_made_before_a_delete_stops_serving(storage: Storage) -> None:
    response = requests.get(storage.get_signed_url("nothing/here"))
    assert refusal(response) == (404, "NOT_FOUND")
    assert requests.head(storage.get_signed_url("nothing/here")).status_code == 404
    storage.set("short-lived", b"x")
    url = storage.get_signed_url("short-lived")
    storage.delete("short-lived")
    assert requests.get(url).status_code == 404


def test_url_requests_are_validated_when_created(storage: Storage) -> None:
    with pytest.raises(InvalidArgumentError, match="seven days"):
        storage.get_signed_url("k", expires_in=7 * 86_400 + 1)
    with pytest.raises(InvalidArgumentError, match="seven days"):
        storage.get_upload_url("k", expires_in=-1)
    with pytest.raises(InvalidArgumentError):
        storage.get_signed_url("")
    with pytest.raises(InvalidArgumentError, match="storage type"):
        storage.get_signed_url("k", storage_type="nope")
    # products: users may upload, but only the catalog reads.
    with pytest.raises(PreconditionError, match="catalog"):
        storage.get_signed_url("raster.tif", storage_type="products")
    upload = storage.get_upload_url("raster.tif", storage_type="products")
    assert "/v1/objects/products/raster.tif?" in upload
    assert requests.put(upload, data=b"raster").status_code == 200
    assert storage.stat("raster.tif", storage_type="products").size == 6


# ---------------------------------------------------------------------- corruption


@pytest.mark.file_store
def test_a_corrupt_chunk_is_never_served(server: RunningServer, storage: Storage, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB)
    storage.set("fragile", payload)
    files = {path.name: path for path in chunk_files(server)}
    digests = [hashlib.sha256(payload[i : i + MiB]).hexdigest() for i in range(0, len(payload), MiB)]
    url = storage.get_signed_url("fragile")

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    flip(files[digests[0]])
    first = requests.get(url)
    assert refusal(first) == (500, "DATA_LOSS")
    assert payload[: MiB // 2] not in first.content
    assert curl("-f", "-o", "/dev/null", url).returncode != 0
    flip(files[digests[0]])  # repaired

    flip(files[digests[2]])
    # The headers went out before the third chunk was checked: the body is cut short instead.
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url).content  # noqa: B018
    out = tmp_path / "cut.bin"
    cut = curl("-o", str(out), url)
    assert cut.returncode != 0
    assert len(out.read_bytes()) < len(payload)
    # A range that avoids the bad chunk is still served, verified.
    part = requests.get(url, headers={"Range": f"bytes=0-{2 * MiB - 1}"})
    assert (part.status_code, part.content) == (206, payload[: 2 * MiB])


# ---------------------------------------------------------------------- secrets and the command line


@pytest.mark.file_store
def test_the_secret_survives_restarts_and_rotation_keeps_old_urls_working(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    running = start_server(data_dir)
    try:
        with running.client() as storage:
            storage.set("k", b"v")
            old_url = storage.get_signed_url("k")
    finally:
        stop_server(running)
    assert (os.stat(data_dir / SECRET_FILE).st_mode & 0o777) == 0o600

    def fetch(url: str, running: RunningServer) -> requests.Response:
        port = urlsplit(url).port
        return requests.get(url.replace(f":{port}/", f":{running.server.ports['http']}/"))

    running = start_server(data_dir)
    try:
        assert fetch(old_url, running).content == b"v"
    finally:
        stop_server(running)

    rotate_secret(str(data_dir))
    running = start_server(data_dir)
    try:
        with running.client() as storage:
            new_url = storage.get_signed_url("k")
        assert new_url.split("sig=")[1] != old_url.split("sig=")[1]
        assert fetch(old_url, running).content == b"v"
        assert fetch(new_url, running).content == b"v"
    finally:
        stop_server(running)

    rotate_secret(str(data_dir))  # the first secret is gone now
    running = start_server(data_dir)
    try:
        assert refusal(fetch(old_url, running)) == (403, "URL_SIGNATURE_MISMATCH")
        assert fetch(new_url, running).content == b"v"
    finally:
        stop_server(running)


def test_replicas_configured_with_one_secret_accept_each_others_urls(tmp_path: Path) -> None:
    shared = (b"s" * 32,)
    first = start_server(tmp_path / "a", url_signing_secrets=shared, public_url="https://blobs.example.com/base/")
    second = start_server(tmp_path / "b", url_signing_secrets=shared)
    stranger = start_server(tmp_path / "c")
    try:
        with first.client() as storage:
            url = storage.get_upload_url("k")
        assert url.startswith("https://blobs.example.com/base/v1/objects/data/k?")
        assert not (tmp_path / "a" / SECRET_FILE).exists()
        path_and_query = url.removeprefix("https://blobs.example.com/base")
        assert requests.put(f"http://127.0.0.1:{second.server.ports['http']}{path_and_query}", data=b"v").ok
        with second.client() as storage:
            assert storage.get("k") == b"v"
        refused = requests.put(f"http://127.0.0.1:{stranger.server.ports['http']}{path_and_query}", data=b"v")
        assert refusal(refused) == (403, "URL_SIGNATURE_MISMATCH")
    finally:
        for running in (first, second, stranger):
            stop_server(running)


def test_cli_url_prints_working_urls(server: RunningServer, storage: Storage, tmp_path: Path) -> None:
    runner = CliRunner()
    put = runner.invoke(cli, ["url", "from/cli.txt", "--upload", "--expires", "120", "--address", server.address])
    assert put.exit_code == 0, put.output
    source = tmp_path / "in.txt"
    source.write_bytes(b"uploaded with curl")
    assert curl("-f", "-T", str(source), put.output.strip()).returncode == 0
    get = runner.invoke(cli, ["url", "from/cli.txt", "--address", server.address])
    assert get.exit_code == 0, get.output
    assert curl("-f", get.output.strip()).stdout == "uploaded with curl"
    bad = runner.invoke(cli, ["url", "x", "--storage-type", "products", "--address", server.address])
    assert bad.exit_code != 0 and "catalog" in bad.output


@pytest.mark.file_store
def test_stop_throws_away_a_put_still_in_flight(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data", shutdown_grace_s=1.0)
    with running.client() as storage:
        storage.set("kept", os.urandom(2 * MiB))
        url = storage.get_upload_url("kept")
    before = chunk_files(running)
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {8 * MiB}\r\n\r\n"
        sock.sendall(head.encode() + os.urandom(3 * MiB))
        wait_for(lambda: len(chunk_files(running)) > len(before), "the upload's first chunks to be stored")
        stop_server(running)  # the client is still connected, 5 MiB short
    assert chunk_files(running) == before  # the cancelled upload freed its chunks before the store closed
    again = start_server(tmp_path / "data")
    try:
        with again.client() as storage:
            assert storage.stat("kept").generation == 1
    finally:
        stop_server(again)


def _two_free_ports() -> int:
    """A port P with P + 1 also free (at the time of asking)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def test_the_http_port_defaults_to_the_grpc_port_plus_one(tmp_path: Path) -> None:
    # Two servers started with two --port values and nothing else must not fight over one HTTP port.
    port = _two_free_ports()
    running = start_server(tmp_path / "data", port=port)
    try:
        assert running.server.ports["grpc"] == port
        assert running.server.ports["http"] == port + 1
        with running.client() as storage:
            storage.set("k", b"v")
            url = storage.get_signed_url("k")
        assert urlsplit(url).port == port + 1
        assert requests.get(url, timeout=10).content == b"v"
    finally:
        stop_server(running)
