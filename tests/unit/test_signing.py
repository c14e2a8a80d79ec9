"""URL signing on its own: every signed field matters, keys survive quoting, secrets stay private."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobstore.server import errors
from blobstore.server.model import StorageType
from blobstore.server.signing import (
    MAX_EXPIRES_IN_S,
    PREVIOUS_SECRET_FILE,
    SECRET_FILE,
    UrlSigner,
    load_secrets,
    quote_key,
    rotate_secret,
)
from tests.conftest import FakeClock

keys = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=50)


def _parts(url: str) -> tuple[str, str, dict[str, str]]:
    parts = urlsplit(url)
    storage_type, _, quoted_key = parts.path.removeprefix("/base/v1/objects/").partition("/")
    return storage_type, unquote(quoted_key), dict(parse_qsl(parts.query))


@given(keys)
def test_a_key_comes_back_from_its_url_unchanged(key: str) -> None:
    quoted = quote_key(key)
    assert unquote(quoted) == key
    assert "?" not in quoted and "#" not in quoted and " " not in quoted
    assert not quoted.endswith("/")
    assert all(segment not in (".", "..") for segment in quoted.split("/"))


def test_every_signed_field_is_bound() -> None:
    clock = FakeClock()
    signer = UrlSigner([b"k" * 32], clock=clock, base_url="http://h/base")
    url, expires = signer.sign("GET", "ns1", StorageType.DATA, "a/b", 60)
    storage_type, key, query = _parts(url)
    assert signer.verify("GET", storage_type, key, query).key == "a/b"
    assert signer.verify("HEAD", storage_type, key, query).method == "GET"
    assert expires == clock() // 10**9 + 60

    def reason(method: str = "GET", kind: str = storage_type, name: str = key, **changes: str) -> str:
        with pytest.raises(errors.UrlRejected) as refused:
            signer.verify(method, kind, name, {**query, **changes})
        return refused.value.reason

    assert reason(method="PUT") == "URL_WRONG_METHOD"
    assert reason(kind="tmp") == "URL_SIGNATURE_MISMATCH"
    assert reason(name="a/c") == "URL_SIGNATURE_MISMATCH"
    assert reason(ns="ns2") == "URL_SIGNATURE_MISMATCH"
    assert reason(expires=str(expires + 1)) == "URL_SIGNATURE_MISMATCH"
    first = "y" if query["sig"].startswith("x") else "x"  # a change whatever the signature begins with
    assert reason(sig=first + query["sig"][1:]) == "URL_SIGNATURE_MISMATCH"
    assert reason(sig="") == "URL_NOT_SIGNED"
    assert reason(expires="-1") == "URL_MALFORMED"
    clock.advance(60)
    assert reason() == "URL_EXPIRED"
    other = UrlSigner([b"o" * 32], clock=clock, base_url="http://h/base")
    with pytest.raises(errors.UrlRejected):
        other.verify("GET", storage_type, key, query)


def test_expiry_limits() -> None:
    signer = UrlSigner([b"k" * 32], base_url="http://h")
    for bad in (-1, MAX_EXPIRES_IN_S + 1):
        with pytest.raises(errors.InvalidArgument):
            signer.sign("GET", "ns", StorageType.DATA, "k", bad)
    with pytest.raises(errors.InvalidArgument):
        signer.sign("DELETE", "ns", StorageType.DATA, "k", 60)
    with pytest.raises(ValueError):
        UrlSigner([b"short"])


def test_the_secret_is_made_once_private_and_rotates(tmp_path: Path) -> None:
    first = load_secrets(str(tmp_path))
    assert len(first) == 1 and len(first[0]) >= 32
    assert os.stat(tmp_path / SECRET_FILE).st_mode & 0o777 == 0o600
    assert load_secrets(str(tmp_path)) == first
    rotate_secret(str(tmp_path))
    rotated = load_secrets(str(tmp_path))
    assert rotated[1] == first[0] and rotated[0] != first[0]
    assert os.stat(tmp_path / PREVIOUS_SECRET_FILE).st_mode & 0o777 == 0o600
    assert {p.name for p in tmp_path.iterdir()} == {SECRET_FILE, PREVIOUS_SECRET_FILE}
