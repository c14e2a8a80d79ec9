"""Choosing the two backends by configuration: where chunks live and where the index lives.

  chunk_store: "file" (a folder under data_dir, the default) or "s3" (any S3-compatible endpoint)
  index:       "lmdb" (a folder under data_dir, the default) or "postgres" (a DSN)

The embedded default needs nothing but a data folder. Replicas that serve one
store share "s3" + "postgres"; each may still keep a local data_dir for nothing
but scratch. The libraries of the shared backends load only when chosen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from blobstore.server.chunkstore import ChunkStore
from blobstore.server.engine import Engine, EngineConfig
from blobstore.server.index import Index


@dataclass
class S3Config:
    """Where the chunks live; empty fields fall back to the environment, then to boto3's own defaults."""

    endpoint: str = ""  # BLOBSTORE_S3_ENDPOINT; empty: AWS
    bucket: str = ""  # BLOBSTORE_S3_BUCKET
    prefix: str = ""  # BLOBSTORE_S3_PREFIX: lets several stores share one bucket
    region: str = ""  # BLOBSTORE_S3_REGION, else AWS_REGION / boto3's default
    access_key: str = ""  # BLOBSTORE_S3_ACCESS_KEY, else AWS_ACCESS_KEY_ID / boto3's chain
    secret_key: str = ""  # BLOBSTORE_S3_SECRET_KEY, else AWS_SECRET_ACCESS_KEY / boto3's chain
    create_bucket: bool = True
    # Ceph and MinIO want path-style addressing; AWS takes either.
    addressing_style: str = "path"
    # Sized for the engine's worker threads (every chunk transfer holds one connection).
    max_connections: int = 64

    def with_environment(self) -> S3Config:
        env = os.environ.get
        return S3Config(
            endpoint=self.endpoint or env("BLOBSTORE_S3_ENDPOINT", ""),
            bucket=self.bucket or env("BLOBSTORE_S3_BUCKET", ""),
            prefix=self.prefix or env("BLOBSTORE_S3_PREFIX", ""),
            region=self.region or env("BLOBSTORE_S3_REGION", ""),
            access_key=self.access_key or env("BLOBSTORE_S3_ACCESS_KEY", ""),
            secret_key=self.secret_key or env("BLOBSTORE_S3_SECRET_KEY", ""),
            create_bucket=self.create_bucket,
            addressing_style=self.addressing_style,
            max_connections=self.max_connections,
        )


@dataclass
class PostgresConfig:
    dsn: str = ""  # BLOBSTORE_POSTGRES_DSN, e.g. "host=db port=5432 user=blobstore dbname=blobstore"
    schema: str = ""  # BLOBSTORE_POSTGRES_SCHEMA, default "blobstore": several stores can share one database
    pool_size: int = 16
    max_retries: int = 50

    def with_environment(self) -> PostgresConfig:
        return PostgresConfig(
            dsn=self.dsn or os.environ.get("BLOBSTORE_POSTGRES_DSN", ""),
            schema=self.schema or os.environ.get("BLOBSTORE_POSTGRES_SCHEMA", "") or "blobstore",
            pool_size=self.pool_size,
            max_retries=self.max_retries,
        )


CHUNK_STORES = ("file", "s3")
# Fewer, larger objects: the gateway's cost is per request as much as per byte. 4 MiB is the
# largest chunk that still fits one gRPC message of a download.
REMOTE_CHUNK_SIZE = 4 << 20
REMOTE_PIPELINE_DEPTH = 4
REMOTE_READAHEAD = 4
REMOTE_IO_THREADS = 32
INDEXES = ("lmdb", "postgres")


@dataclass
class BackendConfig:
    chunk_store: str = "file"
    index: str = "lmdb"
    s3: S3Config = field(default_factory=S3Config)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)

    @classmethod
    def from_environment(cls) -> BackendConfig:
        """BLOBSTORE_CHUNK_STORE and BLOBSTORE_INDEX, plus each backend's own variables."""
        return cls(
            chunk_store=os.environ.get("BLOBSTORE_CHUNK_STORE", "file"),
            index=os.environ.get("BLOBSTORE_INDEX", "lmdb"),
        )

    def validate(self) -> None:
        if self.chunk_store not in CHUNK_STORES:
            raise ValueError(f"chunk_store must be one of {', '.join(CHUNK_STORES)}, not {self.chunk_store!r}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(INDEXES)}, not {self.index!r}")


def open_index(data_dir: str, config: BackendConfig) -> Index:
    config.validate()
    if config.index == "postgres":
        from blobstore.server.pgindex import PostgresIndex

        return PostgresIndex(config.postgres)
    from blobstore.server.index import LmdbIndex

    return LmdbIndex(os.path.join(data_dir, "index"))


def open_chunk_store(data_dir: str, config: BackendConfig) -> ChunkStore:
    config.validate()
    if config.chunk_store == "s3":
        from blobstore.server.s3store import S3ChunkStore

        return S3ChunkStore(config.s3)
    from blobstore.server.chunkstore import FileChunkStore

    return FileChunkStore(os.path.join(data_dir, "store"))


def open_backend_engine(
    data_dir: str, config: EngineConfig | None = None, backends: BackendConfig | None = None, **kwargs: Any
) -> Engine:
    """An engine on the configured pair of backends (file + lmdb under data_dir by default)."""
    backends = backends or BackendConfig()
    config = config or EngineConfig()
    if backends.chunk_store == "s3":
        # Each chunk is a request with a round trip of latency: keep more of them in flight.
        config = replace(
            config,
            chunk_size=max(config.chunk_size, REMOTE_CHUNK_SIZE),
            upload_pipeline_depth=max(config.upload_pipeline_depth, REMOTE_PIPELINE_DEPTH),
            download_readahead=max(config.download_readahead, REMOTE_READAHEAD),
            io_threads=max(config.io_threads, REMOTE_IO_THREADS),
        )
        backends.s3.max_connections = max(backends.s3.max_connections, config.io_threads + 8)
    os.makedirs(data_dir, exist_ok=True)
    index = open_index(data_dir, backends)
    try:
        chunks = open_chunk_store(data_dir, backends)
    except BaseException:
        index.close()
        raise
    return Engine(index, chunks, config, **kwargs)
