"""Tokens: stored hashed, resolved to a namespace and roles, revoked and expired; open mode."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.server import errors, quotas
from blobstore.server.auth import (
    Authenticator,
    OpenBindRefused,
    TokenStore,
    bearer_token,
    check_exposure,
    is_loopback,
    validate_namespace,
)
from blobstore.server.index import LmdbIndex
from blobstore.server.model import ANONYMOUS, Caller, Role
from tests.conftest import FakeClock


@pytest.fixture
def index(tmp_path: Path) -> Iterator[LmdbIndex]:
    index = LmdbIndex(str(tmp_path / "index"))
    yield index
    index.close()


@pytest.fixture
def tokens(index: LmdbIndex, clock: FakeClock) -> TokenStore:
    return TokenStore(index, clock=clock)


def authenticator(tokens: TokenStore, *, anonymous_allowed: bool = True) -> Authenticator:
    config = quotas.QuotaConfig(requests_per_second=0)
    return Authenticator(tokens, config, quotas.RateLimiter(tokens.clock), anonymous_allowed=anonymous_allowed)


def test_a_token_resolves_to_its_namespace_and_roles(tokens: TokenStore) -> None:
    secret, info = tokens.create("alice", ["catalog", "user"], description="ingest")
    assert secret.startswith("bst_") and len(secret) > 40
    assert tokens.resolve(secret) == Caller("alice", frozenset({Role.CATALOG, Role.USER}))
    assert info.namespace == "alice" and info.description == "ingest"
    assert [t.id for t in tokens.list()] == [info.id]
    second, _ = tokens.create("alice")
    assert second != secret
    assert tokens.resolve(second) == Caller("alice", frozenset({Role.USER}))


def test_only_the_sha256_of_a_token_is_stored(tokens: TokenStore, index: LmdbIndex, tmp_path: Path) -> None:
    secret, info = tokens.create("alice")
    on_disk = b"".join(path.read_bytes() for path in (tmp_path / "index").iterdir())
    assert hashlib.sha256(secret.encode()).digest() in on_disk
    assert secret.encode() not in on_disk
    assert secret.removeprefix("bst_").encode() not in on_disk
    assert info.id == hashlib.sha256(secret.encode()).hexdigest()[:16]


def test_unknown_revoked_and_expired_tokens_are_refused(tokens: TokenStore, clock: FakeClock) -> None:
    with pytest.raises(errors.Unauthenticated, match="not valid"):
        tokens.resolve("bst_made-up")
    secret, info = tokens.create("alice")
    keep, _ = tokens.create("alice")
    assert tokens.revoke(info.id[:6]).id == info.id
    with pytest.raises(errors.Unauthenticated, match="not valid"):
        tokens.resolve(secret)
    assert tokens.resolve(keep).namespace == "alice"
    with pytest.raises(errors.NotFound):
        tokens.revoke(info.id)

    short, _ = tokens.create("bob", expires_in_ns=60 * 10**9)
    clock.advance(59)
    assert tokens.resolve(short).namespace == "bob"
    clock.advance(1)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        tokens.resolve(short)


def test_revoke_removes_exactly_the_named_token(tokens: TokenStore) -> None:
    with pytest.raises(errors.InvalidArgument, match="at least 4"):
        tokens.revoke("ab")
    made = [tokens.create("alice") for _ in range(20)]
    _, info = made[7]
    tokens.revoke(info.id)
    assert sorted(t.id for t in tokens.list()) == sorted(i.id for _, i in made if i.id != info.id)
    for other, _ in made[:7] + made[8:]:
        assert tokens.resolve(other).namespace == "alice"


@pytest.mark.parametrize("namespace", ["", "a\x00b", "../up", "a b", "-lead", "é", "x" * 129])
def test_bad_namespaces_are_refused(tokens: TokenStore, namespace: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="namespace"):
        tokens.create(namespace)


def test_good_namespaces_are_taken() -> None:
    for namespace in ("default", "alice", "team-7.raster_ingest", "x" * 128):
        validate_namespace(namespace)


def test_unknown_roles_are_refused(tokens: TokenStore) -> None:
    with pytest.raises(errors.InvalidArgument, match="valid roles: user, catalog, admin"):
        tokens.create("alice", ["root"])


def test_admin_has_every_role() -> None:
    admin = Caller("ops", frozenset({Role.ADMIN}))
    assert admin.has(Role.CATALOG) and admin.has(Role.USER)
    assert not Caller("a", frozenset({Role.USER})).has(Role.CATALOG)


def test_bearer_metadata_is_parsed_strictly() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("user-agent", "x"), ("Authorization", b"bearer  abc ")]) == "abc"
    assert bearer_token([("user-agent", "x")]) is None
    for bad in ("Basic abc", "Bearer", "abc"):
        with pytest.raises(errors.Unauthenticated, match="Bearer <token>"):
            bearer_token([("authorization", bad)])


def test_open_mode_lasts_until_the_first_token(tokens: TokenStore) -> None:
    auth = authenticator(tokens)
    assert auth.caller_for([]) == ANONYMOUS
    with pytest.raises(errors.Unauthenticated):
        auth.caller_for([("authorization", "Bearer bst_unknown")])
    secret, info = tokens.create("alice")
    with pytest.raises(errors.Unauthenticated, match="requires a bearer token"):
        auth.caller_for([])
    assert auth.caller_for([("authorization", f"Bearer {secret}")]).namespace == "alice"
    # Revoking every token must not silently reopen a server that may not run open.
    closed = authenticator(tokens, anonymous_allowed=False)
    tokens.revoke(info.id)
    assert auth.caller_for([]) == ANONYMOUS
    with pytest.raises(errors.Unauthenticated):
        closed.caller_for([])


def test_the_rate_limit_applies_to_the_callers_namespace(tokens: TokenStore, clock: FakeClock) -> None:
    alice, _ = tokens.create("alice")
    bob, _ = tokens.create("bob")
    config = quotas.QuotaConfig(requests_per_second=1, burst=2)
    auth = Authenticator(tokens, config, quotas.RateLimiter(clock), anonymous_allowed=False)
    for _ in range(2):
        auth.caller_for([("authorization", f"Bearer {alice}")])
    with pytest.raises(errors.RateLimited):
        auth.caller_for([("authorization", f"Bearer {alice}")])
    auth.caller_for([("authorization", f"Bearer {bob}")])
    clock.advance(1)
    auth.caller_for([("authorization", f"Bearer {alice}")])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.5.5", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_open_server_refuses_a_non_loopback_address(tokens: TokenStore) -> None:
    with pytest.raises(OpenBindRefused, match="--allow-anonymous"):
        check_exposure("0.0.0.0", tokens, allow_anonymous=False)
    check_exposure("127.0.0.1", tokens, allow_anonymous=False)
    check_exposure("0.0.0.0", tokens, allow_anonymous=True)
    tokens.create("alice")
    check_exposure("0.0.0.0", tokens, allow_anonymous=False)
