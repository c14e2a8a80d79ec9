"""TLS for the server's listeners, from one PEM certificate chain and its private key.

The gRPC listener takes grpc.ServerCredentials, the HTTP listener an
ssl.SSLContext; both come from the same two files (ServerConfig.tls_cert and
tls_key), so the two ports always present the same certificate.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc


class TlsConfigError(ValueError):
    """The certificate or key is missing, unreadable or not a pair."""


@dataclass(frozen=True)
class TlsFiles:
    cert_path: str
    key_path: str

    @classmethod
    def from_paths(cls, cert_path: str | None, key_path: str | None) -> TlsFiles | None:
        """None when neither is given; an error when only one is."""
        if not cert_path and not key_path:
            return None
        if not cert_path or not key_path:
            raise TlsConfigError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        return cls(cert_path, key_path)

    def read(self) -> tuple[bytes, bytes]:
        """(certificate chain, private key), PEM."""
        pems = []
        for what, path in (("certificate", self.cert_path), ("private key", self.key_path)):
            try:
                with open(path, "rb") as fobj:
                    pems.append(fobj.read())
            except OSError as exc:
                raise TlsConfigError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None
        return pems[0], pems[1]

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context (TLS 1.2 or later) for the HTTP listener."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load the TLS certificate and key: {exc}") from None
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        # Loading them into an SSLContext first gives a clear error for a bad pair,
        # where gRPC would only fail to bind.
        self.ssl_context()
        cert, key = self.read()
        return grpc.ssl_server_credentials([(key, cert)])
