"""TLS on the gRPC listener, and the SSLContext the HTTP listener takes, from a self-signed certificate."""

from __future__ import annotations

import datetime
import io
import ipaddress
import ssl
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from blobstore.client import Storage, UnavailableError
from blobstore.server.app import ServerConfig
from blobstore.server.tls import TlsConfigError
from tests.conftest import start_server, stop_server


def self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for `name` and 127.0.0.1, signed by its own key; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_grpc_over_tls_with_the_servers_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path / "tls")
    running = start_server(tmp_path / "data", tls_cert=str(cert), tls_key=str(key))
    try:
        with running.client(root_certificates=cert.read_bytes()) as secure:
            secure.set("k", b"over tls")
            secure.set_file("big", io.BytesIO(b"z" * (3 << 20)))
            assert secure.get("k") == b"over tls"
            assert secure.get("big") == b"z" * (3 << 20)
        with monkeypatch.context() as env:
            env.setenv("BLOBSTORE_CA_CERT", str(cert))
            with running.client() as from_env:
                assert from_env.get("k") == b"over tls"
        with Storage(running.address, timeout=5, retries=0) as plaintext, pytest.raises(UnavailableError):
            plaintext.get("k")
        stranger, _ = self_signed(tmp_path / "other")
        untrusting = running.client(root_certificates=stranger.read_bytes(), timeout=5)
        with untrusting, pytest.raises(UnavailableError):
            untrusting.get("k")
    finally:
        stop_server(running)


def test_signed_urls_are_served_over_https_with_the_same_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "tls")
    running = start_server(tmp_path / "data", tls_cert=str(cert), tls_key=str(key), http_port=0)
    try:
        with running.client(root_certificates=cert.read_bytes()) as secure:
            upload_url = secure.get_upload_url("via-https")
            assert upload_url.startswith("https://")
            assert requests.put(upload_url, data=b"over https", verify=str(cert), timeout=30).ok
            download_url = secure.get_signed_url("via-https")
        assert requests.get(download_url, verify=str(cert), timeout=30).content == b"over https"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(download_url, timeout=30)  # not signed by a CA the system trusts
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(download_url.replace("https://", "http://"), timeout=30)
    finally:
        stop_server(running)
    assert ServerConfig().ssl_context() is None
    assert isinstance(ServerConfig(tls_cert=str(cert), tls_key=str(key)).ssl_context(), ssl.SSLContext)


def test_broken_tls_settings_fail_at_start(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path / "one")
    _, other_key = self_signed(tmp_path / "two")
    with pytest.raises(TlsConfigError, match="both"):
        start_server(tmp_path / "data", tls_cert=str(cert))
    with pytest.raises(TlsConfigError, match="cannot load"):
        start_server(tmp_path / "data", tls_cert=str(cert), tls_key=str(other_key))
    with pytest.raises(TlsConfigError, match="cannot"):
        start_server(tmp_path / "data", tls_cert=str(cert), tls_key=str(tmp_path / "missing.pem"))
