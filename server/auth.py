"""Who is calling: bearer tokens, their namespaces and roles, and when a server may run open.

A token is 32 random bytes (URL-safe base64 after a `bst_` prefix). The index
keeps only its SHA-256, under which the token's record (namespace, roles,
expiry) is stored: a copy of the index gives no usable token, and since the
token has 256 bits of entropy a plain SHA-256 is as good as a slow password
hash here. Lookup is by that digest, so no token is ever compared byte by
byte. A token's public id is the first 8 bytes of the digest in hex; it names
the token in listings and for revocation.

With no token in the index the server is open: every request acts in the
`default` namespace with the user role. Creating the first token closes it at
once (tokens are read from the index on every request, so `blobstore token
create` and `revoke` take effect on a running server).

Nothing here knows gRPC: callers hand over request metadata (or HTTP headers)
as name/value pairs.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from blobstore.internal import records_pb2 as rec
from blobstore.server import errors, quotas, schema
from blobstore.server.index import Index, IndexReader, IndexWriter
from blobstore.server.model import ANONYMOUS, DEFAULT_NAMESPACE, Caller, Role

TOKEN_PREFIX = "bst_"
TOKEN_ID_BYTES = 8
MAX_NAMESPACE_BYTES = 128
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Metadata = Iterable[tuple[str, str | bytes]]


class OpenBindRefused(Exception):
    """The server would serve anyone on the network without authentication."""


def validate_namespace(namespace: str) -> None:
    if len(namespace.encode()) > MAX_NAMESPACE_BYTES or not _NAMESPACE.fullmatch(namespace):
        raise errors.InvalidArgument(
            f"namespace {namespace!r} is not valid: use 1 to {MAX_NAMESPACE_BYTES} letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )


def parse_roles(names: Iterable[str]) -> frozenset[Role]:
    roles = set()
    for name in names:
        try:
            roles.add(Role(name))
        except ValueError:
            valid = ", ".join(role.value for role in Role)
            raise errors.InvalidArgument(f"unknown role {name!r}; valid roles: {valid}") from None
    return frozenset(roles) or frozenset({Role.USER})


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenInfo:
    """What the index knows of a token: everything but the token itself."""

    id: str
    namespace: str
    roles: frozenset[Role]
    create_time_ns: int
    expire_time_ns: int
    description: str

    @classmethod
    def from_record(cls, digest: bytes, record: rec.TokenRecord) -> TokenInfo:
        return cls(
            id=digest[:TOKEN_ID_BYTES].hex(),
            namespace=record.namespace,
            roles=parse_roles(record.roles),
            create_time_ns=record.create_time_ns,
            expire_time_ns=record.expire_time_ns,
            description=record.description,
        )


class TokenStore:
    """Tokens in the index's `tokens` table, keyed by the token's SHA-256."""

    def __init__(self, index: Index, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.index = index
        self.clock = clock

    def create(
        self,
        namespace: str,
        roles: Iterable[Role | str] = (Role.USER,),
        *,
        description: str = "",
        expires_in_ns: int = 0,
    ) -> tuple[str, TokenInfo]:
        """Makes a new token; returns it (the only time it is ever seen) and its record."""
        validate_namespace(namespace)
        if expires_in_ns < 0:
            raise errors.InvalidArgument("a token's lifetime must not be negative")
        role_set = parse_roles(r.value if isinstance(r, Role) else r for r in roles)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = hash_token(token)
        now = self.clock()
        record = rec.TokenRecord(
            namespace=namespace,
            roles=sorted(role.value for role in role_set),
            create_time_ns=now,
            expire_time_ns=now + expires_in_ns if expires_in_ns else 0,
            description=description,
        )
        self.index.submit(lambda txn: txn.put(schema.TOKENS, digest, record.SerializeToString())).result()
        return token, TokenInfo.from_record(digest, record)

    def list(self) -> list[TokenInfo]:
        with self.index.reader() as r:
            found = [
                TokenInfo.from_record(bytes(digest), rec.TokenRecord.FromString(raw))
                for digest, raw in r.scan(schema.TOKENS, b"")
            ]
        return sorted(found, key=lambda info: (info.namespace, info.create_time_ns))

    def revoke(self, token_id: str) -> TokenInfo:
        """Deletes the token whose id is (or starts with) `token_id`."""
        token_id = token_id.strip().lower()
        if len(token_id) < 4:
            raise errors.InvalidArgument("give at least 4 characters of the token id (see `blobstore token list`)")
        matches = [info for info in self.list() if info.id.startswith(token_id)]
        if not matches:
            raise errors.NotFound(f"no token with id {token_id!r}")
        if len(matches) > 1:
            raise errors.InvalidArgument(f"token id {token_id!r} is ambiguous: give more characters")
        wanted = matches[0]
        prefix = bytes.fromhex(wanted.id)

        def op(txn: IndexWriter) -> None:
            doomed = []
            for digest, _ in txn.scan(schema.TOKENS, prefix):
                if not bytes(digest).startswith(prefix):
                    break
                doomed.append(bytes(digest))
            for digest in doomed:
                txn.delete(schema.TOKENS, digest)

        self.index.submit(op).result()
        return wanted

    def any(self) -> bool:
        with self.index.reader() as r:
            return self.any_in(r)

    @staticmethod
    def any_in(reader: IndexReader) -> bool:
        return next(iter(reader.scan(schema.TOKENS, b"")), None) is not None

    def resolve(self, token: str) -> Caller:
        with self.index.reader() as r:
            return self.resolve_in(r, token)

    def resolve_in(self, reader: IndexReader, token: str) -> Caller:
        raw = reader.get(schema.TOKENS, hash_token(token))
        if raw is None:
            raise errors.Unauthenticated("the bearer token is not valid (unknown or revoked)")
        caller, expire_time_ns = _grant(bytes(raw))
        if expire_time_ns and expire_time_ns <= self.clock():
            raise errors.Unauthenticated("the bearer token has expired")
        return caller


@functools.lru_cache(maxsize=4096)
def _grant(raw: bytes) -> tuple[Caller, int]:
    """A stored token record, parsed once: the record is still read on every request, so
    revocation takes effect at once, but decoding it is not repeated."""
    record = rec.TokenRecord.FromString(raw)
    return Caller(record.namespace, parse_roles(record.roles)), record.expire_time_ns


def bearer_token(metadata: Metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if there is one."""
    for name, value in metadata:
        if name.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, credentials = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise errors.Unauthenticated("the authorization metadata must read 'Bearer <token>'")
        return credentials.strip()
    return None


class Authenticator:
    """Turns a request's metadata into a Caller, then charges the caller's request rate.

    `anonymous_allowed` says whether a request without a token may act in the
    default namespace while no token exists (the server binds loopback only, or
    was started with --allow-anonymous).
    """

    def __init__(
        self,
        tokens: TokenStore,
        quota_config: quotas.QuotaConfig,
        rate_limiter: quotas.RateLimiter,
        *,
        anonymous_allowed: bool,
    ) -> None:
        self.tokens = tokens
        self.quota_config = quota_config
        self.rate_limiter = rate_limiter
        self.anonymous_allowed = anonymous_allowed

    def caller_for(self, metadata: Metadata) -> Caller:
        token = bearer_token(metadata)
        with self.tokens.index.reader() as r:
            if token is not None:
                caller = self.tokens.resolve_in(r, token)
            elif self.anonymous_allowed and not self.tokens.any_in(r):
                caller = ANONYMOUS
            else:
                raise errors.Unauthenticated(
                    "this server requires a bearer token: pass Storage(token=...) or set BLOBSTORE_TOKEN "
                    "(metadata 'authorization: Bearer <token>')"
                )
            limits = quotas.limits_for(r, caller.namespace, self.quota_config)
        self.rate_limiter.acquire(caller.namespace, limits)
        return caller


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(host: str, tokens: TokenStore, *, allow_anonymous: bool) -> None:
    """Refuses to serve the open default namespace on an address others can reach."""
    if allow_anonymous or is_loopback(host) or tokens.any():
        return
    raise OpenBindRefused(
        f"refusing to serve without authentication on {host}, which is not a loopback address: "
        "create a token first (blobstore token create --data-dir DIR --namespace NAME), "
        f"or pass --allow-anonymous to let anyone who can reach {host} use the {DEFAULT_NAMESPACE!r} namespace"
    )
