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
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(data_dir: str, host: str, port: int, log_level: str) -> None:
    """Run the server until SIGTERM or SIGINT."""
    from blobstore.server.app import ServerConfig
    from blobstore.server.app import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(ServerConfig(data_dir=data_dir, host=host, port=port)))


if __name__ == "__main__":
    main()
