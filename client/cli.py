"""The `blobstore` command line."""

from __future__ import annotations

import asyncio
import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """blobstore: a gRPC key-value blob store."""


@main.command()
@click.option(
    "--data-dir",
    default="./data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the index and chunks live.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=50051, show_default=True, type=int, help="gRPC port (0: any free port).")
@click.option(
    "--http-port",
    default=None,
    type=int,
    help="Port of the signed-URL HTTP endpoint [default: 50052; any free port when --port is 0].",
)
@click.option(
    "--public-url",
    default="",
    help="Base of the signed URLs handed out, when clients reach the server through a proxy "
    "(e.g. https://blobs.example.com) [default: http://HOST:HTTP_PORT].",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(data_dir: str, host: str, port: int, http_port: int | None, public_url: str, log_level: str) -> None:
    """Run the server until SIGTERM or SIGINT."""
    from blobstore.server.app import ServerConfig
    from blobstore.server.app import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(data_dir=data_dir, host=host, port=port, http_port=http_port, public_url=public_url)
    asyncio.run(run(config))


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
@click.option(
    "--storage-type",
    default="data",
    show_default=True,
    type=click.Choice(["data", "tmp", "products", "result", "logs"]),
)
@click.option("--address", default=None, help="Server address [default: $BLOBSTORE_ADDRESS or 127.0.0.1:50051].")
def url(key: str, upload: bool, expires: int, storage_type: str, address: str | None) -> None:
    """Print a signed URL for KEY that works with plain HTTP (curl, a browser), no token needed."""
    from blobstore.client import Storage, StorageError

    with Storage(address) as storage:
        try:
            if upload:
                click.echo(storage.get_upload_url(key, storage_type, expires_in=expires))
            else:
                click.echo(storage.get_signed_url(key, storage_type, expires_in=expires))
        except StorageError as exc:
            raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
