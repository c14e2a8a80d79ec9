"""The `blobstore` command line.

Each command is a self-contained block: a click command, plus `@client_options`
when it talks to a server (it adds --address, --token and --storage-type and
hands the function a connected `storage`). Errors are not handled per command:
BlobstoreGroup turns every client error into one line on stderr and the exit
code of its class (EXIT_CODES).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click
import grpc
from tqdm import tqdm

from blobstore.client import errors
from blobstore.client.memory import keep_freed_memory
from blobstore.client.storage import DEFAULT_ADDRESS, STORAGE_TYPES, ObjectInfo, Progress, Storage

if TYPE_CHECKING:
    from blobstore.server.index import Index

F = TypeVar("F", bound=Callable[..., Any])

# Transfers smaller than this finish before a progress bar would be worth drawing.
PROGRESS_MIN_BYTES = 4 << 20

EXIT_USAGE = 2
EXIT_LOCAL_FILE = 10
EXIT_CONFIG = 11
EXIT_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
    grpc.StatusCode.ABORTED: 4,
    grpc.StatusCode.INVALID_ARGUMENT: 5,
    grpc.StatusCode.OUT_OF_RANGE: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 6,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 7,
    grpc.StatusCode.UNAVAILABLE: 8,
    grpc.StatusCode.DEADLINE_EXCEEDED: 8,
    grpc.StatusCode.DATA_LOSS: 9,
}

EXIT_CODES_HELP = """\b
Exit codes:
   0  success
   1  any other error (an internal server error, an unimplemented call)
   2  usage error (bad option or argument)
   3  not found
   4  precondition failed or conflict (generation mismatch, storage type rules)
   5  invalid argument or out of range
   6  authentication or permission denied
   7  resource exhausted (quota, rate limit, disk full)
   8  server unavailable or deadline exceeded (try again)
   9  data loss (a checksum failed)
  10  local file error
  11  bad server configuration
"""


class BlobstoreGroup(click.Group):
    """Turns errors into one line on stderr and the exit code of their class."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.StorageError as exc:
            _fail(ctx, f"{exc.code.name.lower().replace('_', ' ')}: {exc.message}", EXIT_CODES.get(exc.code, 1))
        except BrokenPipeError:
            # The reader went away (`blobstore get KEY | head`): nothing left to say to it.
            sys.stderr.close()
            ctx.exit(1)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            _fail(ctx, f"local file error:{where}: {exc.strerror or exc}", EXIT_LOCAL_FILE)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    click.echo(f"blobstore: {' '.join(message.split())}", err=True)
    ctx.exit(code)


@click.group(cls=BlobstoreGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
def main() -> None:
    """blobstore: a gRPC key-value blob store.

    Client commands find the server at --address (or $BLOBSTORE_ADDRESS) and
    authenticate with --token (or $BLOBSTORE_TOKEN). Run `blobstore COMMAND --help`
    for the options of each command.
    """


def client_options(command: F) -> F:
    """--address, --token and --storage-type, and a connected `storage` for the command."""

    @functools.wraps(command)
    def with_storage(address: str, token: str | None, **kwargs: Any) -> Any:
        with Storage(address, token) as storage:
            return command(storage=storage, **kwargs)

    for option in reversed(
        (
            click.option(
                "--address",
                envvar="BLOBSTORE_ADDRESS",
                default=DEFAULT_ADDRESS,
                show_default=True,
                help="Server host:port [env: BLOBSTORE_ADDRESS].",
            ),
            click.option("--token", envvar="BLOBSTORE_TOKEN", help="Bearer token [env: BLOBSTORE_TOKEN]."),
            click.option(
                "--storage-type",
                "-t",
                type=click.Choice(list(STORAGE_TYPES)),
                default="data",
                show_default=True,
                help="The storage type (key space) to work in.",
            ),
        )
    ):
        with_storage = option(with_storage)
    return with_storage  # type: ignore[return-value]


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Progress | None]:
    """A bar with rate and ETA on stderr for large transfers; nothing when stderr is not a terminal."""
    if not sys.stderr.isatty() or (total is not None and total < PROGRESS_MIN_BYTES):
        yield None
        return
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        yield bar.update


# ---------------------------------------------------------------------- put / get


@main.command()
@click.argument("key")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--content-type", help="Content type stored with the object.")
@click.option("--metadata", "-m", multiple=True, metavar="NAME=VALUE", help="User metadata (repeatable).")
@click.option("--if-generation-match", type=int, help="Write only if the object is at this generation (0: new).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@client_options
def put(
    storage: Storage,
    storage_type: str,
    key: str,
    file: str,
    content_type: str | None,
    metadata: tuple[str, ...],
    if_generation_match: int | None,
    quiet: bool,
) -> None:
    """Upload FILE (or standard input, with -) as KEY."""
    fields = {}
    for item in metadata:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--metadata")
        fields[name] = value
    with _input(file) as fobj:
        size = os.fstat(fobj.fileno()).st_size if file != "-" else None
        with progress_bar(key, size) as progress:
            info = storage.set_file(
                key,
                fobj,
                storage_type,
                content_type=content_type,
                metadata=fields,
                if_generation_match=if_generation_match,
                progress=progress,
            )
    if not quiet:
        click.echo(f"stored {info.key} ({info.size} bytes, generation {info.generation})", err=True)


@contextmanager
def _input(file: str) -> Iterator[IO[bytes]]:
    if file == "-":
        yield sys.stdin.buffer
        return
    with open(file, "rb") as fobj:
        yield fobj


@main.command()
@click.argument("key")
@click.argument("file", required=False, default="-", type=click.Path(dir_okay=False, allow_dash=True))
@client_options
def get(storage: Storage, storage_type: str, key: str, file: str) -> None:
    """Download KEY into FILE (standard output when FILE is - or left out).

    A FILE is replaced only once every byte has passed its checksums.
    """
    total = storage.stat(key, storage_type).size if sys.stderr.isatty() else None
    with progress_bar(key, total) as progress:
        if file == "-":
            storage.get_file(key, sys.stdout.buffer, storage_type, progress=progress)
            sys.stdout.flush()
        else:
            storage.get_file(key, file, storage_type, progress=progress)


# ---------------------------------------------------------------------- url


@main.command()
@click.argument("key")
@click.option("--upload", is_flag=True, help="A URL to upload with PUT (default: to download with GET).")
@click.option(
    "--expires",
    default=3600,
    show_default=True,
    type=click.IntRange(1, 7 * 86_400),
    help="Lifetime in seconds (at most seven days).",
)
@client_options
def url(storage: Storage, storage_type: str, key: str, upload: bool, expires: int) -> None:
    """Print a signed URL for KEY that works with plain HTTP (curl, a browser), no token needed."""
    sign = storage.get_upload_url if upload else storage.get_signed_url
    click.echo(sign(key, storage_type, expires_in=expires))


# ---------------------------------------------------------------------- ls / stat / rm


@main.command()
@click.argument("prefix", required=False, default="")
@click.option("--long", "-l", "long_format", is_flag=True, help="Show size and last update time too.")
@client_options
def ls(storage: Storage, storage_type: str, prefix: str, long_format: bool) -> None:
    """List the keys starting with PREFIX, in key order."""
    for info in storage.iter_objects(prefix or None, storage_type):
        if long_format:
            updated = info.updated.strftime("%Y-%m-%dT%H:%M:%SZ") if info.updated else "-"
            click.echo(f"{info.size:>14}  {updated}  {info.key}")
        else:
            click.echo(info.key)


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@client_options
def stat(storage: Storage, storage_type: str, key: str, as_json: bool) -> None:
    """Show the metadata of KEY."""
    fields = _describe(storage.stat(key, storage_type))
    if as_json:
        click.echo(json.dumps(fields, indent=2))
        return
    width = max(map(len, fields))
    for name, value in fields.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        click.echo(f"{name + ':':<{width + 1}} {'' if shown is None else shown}")


def _describe(info: ObjectInfo) -> dict[str, Any]:
    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "key": info.key,
        "storage_type": info.storage_type,
        "size": info.size,
        "generation": info.generation,
        "content_type": info.content_type,
        "created": when(info.created),
        "updated": when(info.updated),
        "expires": when(info.expires),
        "crc32c": f"{info.crc32c:08x}" if info.crc32c is not None else None,
        "sha256": info.sha256,
        "metadata": info.metadata,
    }


@main.command()
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@client_options
def rm(storage: Storage, storage_type: str, keys: tuple[str, ...]) -> None:
    """Delete each KEY (stops at the first that fails)."""
    for key in keys:
        storage.delete(key, storage_type)


# ---------------------------------------------------------------------- tenants: tokens, quotas, serve options
# Tokens and quota overrides live in the server's index under --data-dir; these
# commands work while the server runs (the index takes writers from several processes).

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def _quantity(text: str, units: dict[str, int], what: str) -> float:
    match = _QUANTITY.fullmatch(text)
    if match is None or match.group(2).lower() not in units:
        raise click.BadParameter(f"{text!r} is not a {what} (examples: {', '.join(_EXAMPLES[what])})")
    return float(match.group(1)) * units[match.group(2).lower()]


_EXAMPLES = {"size": ("1000000", "500MB", "10GiB", "0 for unlimited"), "duration": ("3600", "90m", "12h", "7d")}


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else int(_quantity(value, _SIZE_UNITS, "size"))


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else _quantity(value, _DURATION_UNITS, "duration")


_DATA_DIR = click.option(
    "--data-dir",
    envvar="BLOBSTORE_DATA_DIR",
    default="./data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The server's data folder [env: BLOBSTORE_DATA_DIR].",
)


def tenant_serve_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The serve flags of authentication, TLS, tmp expiry and default quotas."""
    options = [
        click.option(
            "--allow-anonymous",
            is_flag=True,
            help="Without tokens, serve the 'default' namespace to anyone, even on a non-loopback address.",
        ),
        click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="PEM certificate chain."),
        click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="PEM private key."),
        click.option(
            "--tmp-ttl",
            callback=_duration,
            metavar="DURATION",
            help="Lifetime of tmp objects after their last write [7d].",
        ),
        click.option(
            "--quota-bytes", callback=_size, metavar="SIZE", help="Default bytes per namespace (0: unlimited) [1TiB]."
        ),
        click.option("--quota-objects", type=int, help="Default objects per namespace (0: unlimited)."),
        click.option("--quota-uploads", type=int, help="Default open upload sessions per namespace (0: unlimited)."),
        click.option("--rate-limit", type=float, help="Default requests per second per namespace (0: unlimited)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def tenant_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """Replaces the flags of tenant_serve_options by the settings they stand for (unset flags drop out)."""
    flags = dict(flags)
    if not flags.get("allow_anonymous"):
        flags["allow_anonymous"] = None  # absent: the file or environment decides
    tmp_ttl = flags.pop("tmp_ttl", None)
    flags["engine.tmp_ttl_ns"] = None if tmp_ttl is None else int(tmp_ttl * 10**9)
    for flag, setting in (
        ("quota_bytes", "engine.quotas.max_bytes"),
        ("quota_objects", "engine.quotas.max_objects"),
        ("quota_uploads", "engine.quotas.max_open_uploads"),
        ("rate_limit", "engine.quotas.requests_per_second"),
    ):
        flags[setting] = flags.pop(flag, None)
    return flags


@contextmanager
def _index(data_dir: str) -> Iterator[Index]:
    """The index the servers use: the data dir's LMDB, or the shared database when the
    settings (BLOBSTORE_INDEX=postgres, BLOBSTORE_POSTGRES_DSN, ...) say so."""
    from blobstore.server.app import ServerConfig
    from blobstore.server.backends import open_index
    from blobstore.server.config import ConfigError, load_config

    try:
        config = load_config(ServerConfig, env=os.environ)
    except ConfigError as exc:
        _fail(click.get_current_context(), f"configuration: {exc}", EXIT_CONFIG)
    index = open_index(data_dir, config.backends)
    try:
        yield index
    finally:
        index.close()


@contextmanager
def _fails_cleanly() -> Iterator[None]:
    """Errors of the store end these commands like client errors: one line, the exit code of their class."""
    from blobstore.server import status
    from blobstore.server.errors import BlobstoreError

    try:
        yield
    except BlobstoreError as exc:
        code = status.grpc_code(exc)
        message = f"{code.name.lower().replace('_', ' ')}: {exc.message}"
        _fail(click.get_current_context(), message, EXIT_CODES.get(code, 1))


def _when(ns: int) -> str:
    if not ns:
        return "never"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@main.group()
def token() -> None:
    """Create, list and revoke bearer tokens (stored hashed in the data dir)."""


@token.command("create")
@_DATA_DIR
@click.option("--namespace", required=True, help="The key space the token acts in.")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["user", "catalog", "admin"]),
    help="Repeatable. catalog: may read and delete products. admin: every role. [user]",
)
@click.option("--description", default="", help="A note shown by `token list`.")
@click.option("--expires-in", callback=_duration, metavar="DURATION", help="Lifetime, e.g. 90d (default: no expiry).")
def token_create(data_dir: str, namespace: str, roles: tuple[str, ...], description: str, expires_in: float) -> None:
    """Print a new token; it is shown this once and cannot be recovered."""
    from blobstore.server.auth import TokenStore

    with _fails_cleanly(), _index(data_dir) as index:
        secret, info = TokenStore(index).create(
            namespace, roles or ("user",), description=description, expires_in_ns=int((expires_in or 0) * 10**9)
        )
    click.echo(secret)
    click.echo(
        f"token {info.id} for namespace {info.namespace!r}, roles {', '.join(sorted(r.value for r in info.roles))}, "
        f"expires {_when(info.expire_time_ns)}",
        err=True,
    )


@token.command("list")
@_DATA_DIR
def token_list(data_dir: str) -> None:
    """List tokens: id, namespace, roles, dates, description (never the token)."""
    from blobstore.server.auth import TokenStore

    with _fails_cleanly(), _index(data_dir) as index:
        infos = TokenStore(index).list()
    rows = [("ID", "NAMESPACE", "ROLES", "CREATED", "EXPIRES", "DESCRIPTION")]
    for info in infos:
        roles = ",".join(sorted(role.value for role in info.roles))
        rows.append(
            (info.id, info.namespace, roles, _when(info.create_time_ns), _when(info.expire_time_ns), info.description)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


@token.command("revoke")
@_DATA_DIR
@click.argument("token_id")
def token_revoke(data_dir: str, token_id: str) -> None:
    """Revoke the token with this id (or a unique prefix of it); effective at once."""
    from blobstore.server.auth import TokenStore

    with _fails_cleanly(), _index(data_dir) as index:
        info = TokenStore(index).revoke(token_id)
    click.echo(f"revoked token {info.id} of namespace {info.namespace!r}")


@main.group()
def quota() -> None:
    """Show or override one namespace's quotas (stored in the data dir, effective at once)."""


@quota.command("set")
@_DATA_DIR
@click.argument("namespace")
@click.option("--max-bytes", callback=_size, metavar="SIZE")
@click.option("--max-objects", type=int)
@click.option("--max-open-uploads", type=int)
@click.option("--requests-per-second", type=float)
@click.option("--burst", type=int)
@click.option("--reset", is_flag=True, help="Drop every override: back to the server's defaults.")
def quota_set(data_dir: str, namespace: str, reset: bool, **limits: int | float | None) -> None:
    """Override limits of NAMESPACE (0: unlimited); unnamed limits keep their value."""
    from blobstore.server import quotas
    from blobstore.server.auth import validate_namespace

    values: dict[str, int | float | None] = dict.fromkeys(quotas.LIMIT_NAMES) if reset else {}
    values.update({name: value for name, value in limits.items() if value is not None})
    with _fails_cleanly(), _index(data_dir) as index:
        validate_namespace(namespace)
        index.submit(lambda txn: quotas.set_override(txn, namespace, **values)).result()
    _show_quota(data_dir, namespace)


@quota.command("show")
@_DATA_DIR
@click.argument("namespace")
def quota_show(data_dir: str, namespace: str) -> None:
    """Limits and usage of NAMESPACE, as the server with default settings sees them."""
    _show_quota(data_dir, namespace)


def _show_quota(data_dir: str, namespace: str) -> None:
    from blobstore.server import quotas

    with _fails_cleanly(), _index(data_dir) as index, index.reader() as r:
        status = quotas.read_status(r, namespace, quotas.QuotaConfig())
    limits, usage = status.limits, status.usage

    def limit(value: float) -> str:
        return "unlimited" if not value else str(value) if isinstance(value, int) else f"{value:g}"

    click.echo(f"namespace            {namespace}")
    click.echo(f"bytes                {usage.bytes} of {limit(limits.max_bytes)}")
    click.echo(f"objects              {usage.objects} of {limit(limits.max_objects)}")
    click.echo(f"open uploads         {usage.open_uploads} of {limit(limits.max_open_uploads)}")
    burst = limits.burst or "2 s worth"
    click.echo(f"requests per second  {limit(limits.requests_per_second)} (burst {burst})")


# ---------------------------------------------------------------------- end of tenants


# ---------------------------------------------------------------------- serve


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="A TOML settings file.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the index and chunks live [./data].")
@click.option("--host", help="Address to bind [127.0.0.1].")
@click.option("--port", type=int, help="gRPC port, 0 for any free port [50051].")
@click.option(
    "--http-port",
    type=int,
    help="Port of the HTTP listener (signed URLs, /metrics) [--port + 1; any free port when --port is 0].",
)
@click.option(
    "--public-url",
    help="Base of the signed URLs handed out, when clients reach the server through a proxy "
    "(e.g. https://blobs.example.com) [http://HOST:HTTP_PORT].",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[info]")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON objects [text].")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any setting, e.g. --set engine.chunk_size=4194304 (repeatable).",
)
@tenant_serve_options
def serve(config_file: str | None, assignments: tuple[str, ...], **flags: Any) -> None:
    """Run the server until SIGTERM or SIGINT.

    Settings come from defaults, then the --config file, then BLOBSTORE_* environment
    variables, then flags (each overriding the one before); see docs/configuration.md.
    """
    from blobstore.server.app import ServerConfig
    from blobstore.server.app import serve as run
    from blobstore.server.auth import OpenBindRefused
    from blobstore.server.config import ConfigError, load_config, parse_assignments
    from blobstore.server.logs import configure_logging
    from blobstore.server.tls import TlsConfigError

    ctx = click.get_current_context()
    try:
        overrides = {**parse_assignments(assignments), **tenant_settings(flags)}
        config = load_config(ServerConfig, file=config_file, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        _fail(ctx, f"configuration: {exc}", EXIT_CONFIG)
    configure_logging(config.log_level, config.log_format)
    keep_freed_memory()  # before the server allocates its first message buffer
    try:
        asyncio.run(run(config))
    except (OSError, OpenBindRefused, TlsConfigError) as exc:
        _fail(ctx, f"cannot start the server: {exc}", EXIT_CONFIG)


# ---------------------------------------------------------------------- scrub (integrity of a data folder)


@main.command()
@click.option(
    "--data-dir",
    default="./data",
    show_default=True,
    type=click.Path(file_okay=False, exists=True),
    help="The server's data folder (a running server may keep using it).",
)
@click.option("--no-rehash", is_flag=True, help="Only cross-check the index and the chunk files; read no chunk.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def scrub(data_dir: str, no_rehash: bool, as_json: bool) -> None:
    """Re-hash every chunk and report corrupt or missing ones and the keys they affect.

    Also cross-checks the index (reference counts, usage). Exits 0 when the store
    is intact, 9 when chunks are corrupt or missing, 1 for other inconsistencies.
    """
    import dataclasses

    from blobstore.server.scrub import scrub_data_dir

    report = scrub_data_dir(data_dir, rehash=not no_rehash)
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, indent=2))
    else:
        click.echo(
            f"checked {report.chunks_checked} chunks ({report.bytes_checked} bytes) of "
            f"{report.objects} objects and {report.open_sessions} open upload sessions"
        )
        for label, digests in (("corrupt", report.corrupt), ("missing", report.missing)):
            for digest in digests:
                click.echo(f"{label} chunk {digest}, used by: {', '.join(report.affected[digest]) or 'nothing'}")
        for problem in report.inconsistencies:
            click.echo(f"inconsistent: {problem}")
        if report.unreferenced:
            click.echo(f"{len(report.unreferenced)} unreferenced chunk files (removed at the next start-up)")
        if report.affected_keys():
            click.echo("affected: " + ", ".join(report.affected_keys()))
        click.echo("OK" if report.ok else "PROBLEMS FOUND")
    if report.corrupt or report.missing:
        raise SystemExit(EXIT_CODES[grpc.StatusCode.DATA_LOSS])
    raise SystemExit(0 if report.ok else 1)


@main.command("sweep-orphans")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="A TOML settings file.")
@click.option(
    "--older-than",
    callback=_duration,
    metavar="DURATION",
    help="Only chunks last modified this long ago, e.g. 2h [engine.chunk_lease_ttl_ns: 1d].",
)
def sweep_orphans(config_file: str | None, older_than: float | None) -> None:
    """Delete a shared store's chunk objects that no object or upload references.

    Safe while replicas run: a chunk any replica holds (an upload or a download in
    flight) is kept. The replicas do this themselves once a day; this does it now.
    Reads the settings as `serve` does (--config, BLOBSTORE_* variables).
    """
    from blobstore.server.app import ServerConfig
    from blobstore.server.config import ConfigError, load_config
    from blobstore.server.engine import open_engine

    ctx = click.get_current_context()
    try:
        config = load_config(ServerConfig, file=config_file, env=os.environ)
    except ConfigError as exc:
        _fail(ctx, f"configuration: {exc}", EXIT_CONFIG)
    if config.index != "postgres":
        _fail(
            ctx,
            "only a shared store (index postgres) needs this: a server removes a local store's at start-up",
            EXIT_CONFIG,
        )
    with _fails_cleanly():
        engine = open_engine(config.data_dir, config.engine, backends=config.backends)
        try:
            swept = engine.sweep_orphans(None if older_than is None else int(older_than * 10**9))
        finally:
            engine.close()
    click.echo(
        f"listed {swept['listed']} chunks, {swept['old']} old enough, {swept['orphans']} without a record, "
        f"deleted {swept['deleted']} (the others are in use)"
    )


if __name__ == "__main__":
    main()
