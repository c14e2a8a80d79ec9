"""Signed URLs: a capability for one method on one key, until a deadline.

A URL looks like

    {public_url}/v1/objects/{storage_type}/{key}?ns={namespace}&expires={unix seconds}&sig={signature}

where the key keeps its '/' separators and every other character is
percent-encoded (so spaces, '?', '#', '%' and non-ASCII survive), and a '.' or
'..' segment is written %2E / %2E%2E so that no client collapses it (and a
trailing '/' is %2F, or `curl -T` would append a file name). The
signature is HMAC-SHA256 over (method, namespace, storage type, key, expiry):
changing any of them, or using a PUT URL for a GET, breaks it. HEAD rides on a
GET signature.

The secret lives in the data dir (created on first start, mode 0600), or comes
from the server's configuration when several replicas must share it. During a
rotation the previous secret stays valid for verification only, so URLs
already handed out keep working until they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from blobstore.server import errors
from blobstore.server.model import StorageType

log = logging.getLogger(__name__)

DEFAULT_EXPIRES_IN_S = 3600
MAX_EXPIRES_IN_S = 7 * 86_400
SECRET_FILE = "url-signing.key"
PREVIOUS_SECRET_FILE = "url-signing.key.previous"
SECRET_BYTES = 32
URL_PATH_PREFIX = "/v1/objects/"
# Bumped if the signed fields ever change, so old and new signatures never collide.
SIGNATURE_VERSION = "blobstore-url-v1"

METHODS = ("GET", "PUT")


@dataclass(frozen=True)
class Grant:
    """What a verified URL allows: one method on one key of one namespace."""

    method: str
    namespace: str
    storage_type: StorageType
    key: str
    expires_s: int


def quote_key(key: str) -> str:
    quoted = "/".join("%2E" * len(part) if part in (".", "..") else quote(part, safe="") for part in key.split("/"))
    # A URL ending in '/' makes `curl -T file` append the file's name: escape a trailing slash.
    return quoted[:-1] + "%2F" if quoted.endswith("/") else quoted


def validate_expires_in(seconds: int) -> int:
    """The lifetime to use for a request's `expires_in` (0 means the default)."""
    if seconds == 0:
        return DEFAULT_EXPIRES_IN_S
    if seconds < 0 or seconds > MAX_EXPIRES_IN_S:
        raise errors.InvalidArgument(
            f"expires_in is {seconds} s; signed URLs live 1 s to {MAX_EXPIRES_IN_S} s (seven days)"
        )
    return seconds


class UrlSigner:
    """Signs and verifies URLs with the first secret; older secrets only verify."""

    def __init__(
        self,
        secrets: Sequence[bytes],
        *,
        clock: Callable[[], int] = time.time_ns,
        base_url: str = "",
    ) -> None:
        if not secrets or any(len(secret) < 16 for secret in secrets):
            raise ValueError("URL signing needs at least one secret of 16 bytes or more")
        self._secrets = list(secrets)
        self.clock = clock
        # Set by the server once its HTTP port is known.
        self.base_url = base_url.rstrip("/")

    def _signature(self, secret: bytes, method: str, namespace: str, storage_type: str, key: str, expires: int) -> str:
        # JSON of a list is an unambiguous encoding: no field can bleed into the next.
        message = json.dumps([SIGNATURE_VERSION, method, namespace, storage_type, key, expires], ensure_ascii=False)
        digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(
        self, method: str, namespace: str, storage_type: StorageType, key: str, expires_in_s: int
    ) -> tuple[str, int]:
        """Returns (absolute URL, expiry in unix seconds)."""
        if method not in METHODS:
            raise errors.InvalidArgument(f"signed URLs are for {' or '.join(METHODS)}, not {method!r}")
        if not self.base_url:
            raise errors.Unavailable("the HTTP endpoint for signed URLs is not running")
        expires = self.clock() // 10**9 + validate_expires_in(expires_in_s)
        signature = self._signature(self._secrets[0], method, namespace, storage_type.label, key, expires)
        query = urlencode({"ns": namespace, "expires": expires, "sig": signature})
        return f"{self.base_url}{URL_PATH_PREFIX}{storage_type.label}/{quote_key(key)}?{query}", expires

    def _matches(self, signature: str, method: str, namespace: str, storage_type: str, key: str, expires: int) -> bool:
        # Every secret is tried, so the time taken does not tell which one matched.
        found = False
        for secret in self._secrets:
            expected = self._signature(secret, method, namespace, storage_type, key, expires)
            found |= hmac.compare_digest(expected.encode(), signature.encode())
        return found

    def verify(self, method: str, storage_type: str, key: str, query: Mapping[str, str]) -> Grant:
        """Checks a request against its URL's signature; raises errors.UrlRejected with the reason."""
        namespace, expires_text, signature = query.get("ns"), query.get("expires"), query.get("sig")
        if namespace is None or expires_text is None or not signature:
            raise errors.UrlRejected("the URL is not signed (it needs ns, expires and sig)", reason="URL_NOT_SIGNED")
        if not expires_text.isascii() or not expires_text.isdigit() or not signature.isascii():
            raise errors.UrlRejected("the URL's expires or sig is malformed", reason="URL_MALFORMED")
        expires = int(expires_text)
        signed_method = "GET" if method == "HEAD" else method
        if not self._matches(signature, signed_method, namespace, storage_type, key, expires):
            for other in METHODS:
                if other != signed_method and self._matches(signature, other, namespace, storage_type, key, expires):
                    raise errors.UrlRejected(f"this URL is signed for {other}, not {method}", reason="URL_WRONG_METHOD")
            raise errors.UrlRejected(
                "the signature does not match this URL (altered, or for another key or storage type)",
                reason="URL_SIGNATURE_MISMATCH",
            )
        now = self.clock() // 10**9
        if now >= expires:
            raise errors.UrlRejected(f"this URL expired {now - expires + 1} s ago", reason="URL_EXPIRED")
        return Grant(signed_method, namespace, StorageType.from_label(storage_type), key, expires)


def load_secrets(data_dir: str) -> list[bytes]:
    """The data dir's signing secret (made on first use) followed by the previous one, if kept."""
    os.makedirs(data_dir, exist_ok=True)
    current = os.path.join(data_dir, SECRET_FILE)
    if not os.path.exists(current):
        _create_secret(current)
    found = [_read_secret(current)]
    previous = os.path.join(data_dir, PREVIOUS_SECRET_FILE)
    if os.path.exists(previous):
        found.append(_read_secret(previous))
    return found


def rotate_secret(data_dir: str) -> None:
    """Makes a new signing secret; the old one keeps verifying until the next rotation.

    Restart the server afterwards. URLs signed with the old secret stop working
    at the rotation after this one, so wait at least seven days between two.
    """
    current = os.path.join(data_dir, SECRET_FILE)
    load_secrets(data_dir)
    os.replace(current, os.path.join(data_dir, PREVIOUS_SECRET_FILE))
    _create_secret(current)


def _create_secret(path: str) -> None:
    # Written aside and linked into place: a crash never leaves a short secret,
    # and of two servers starting at once, the second one reads the first one's.
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_secret(path: str) -> bytes:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o): anyone who reads it can sign URLs; chmod 600 it", path, mode)
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"{path} holds no usable secret (it needs at least 16 bytes)")
    return secret
