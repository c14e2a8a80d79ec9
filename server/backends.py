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
from typing import Any, Literal

from blobstore.server.chunkstore import ChunkStore
from blobstore.server.engine import Engine, EngineConfig
from blobstore.server.index import Index

ChunkStoreKind = Literal["file", "s3"]
IndexKind = Literal["lmdb", "postgres"]
CHUNK_STORES: tuple[ChunkStoreKind, ...] = ("file", "s3")
INDEXES: tuple[IndexKind, ...] = ("lmdb", "postgres")

# Fewer, larger objects: the gateway's cost is per request as much as per byte (and so is ours:
# a lease, an index look-up and a botocore request per chunk). Downloads cut chunks into
# messages of at most 1 MiB, so the chunk size does not bound a message.
REMOTE_CHUNK_SIZE = 8 << 20
REMOTE_CHUNK_SIZE_RANGE = (1 << 20, 64 << 20)
REMOTE_PIPELINE_DEPTH = 4
REMOTE_READAHEAD = 4
REMOTE_IO_THREADS = 32


@dataclass
class S3Config:
    """Where the chunks live (settings `s3.*`, BLOBSTORE_S3_* in the environment)."""

    endpoint: str = ""  # empty: AWS
    bucket: str = ""
    prefix: str = ""  # lets several stores share one bucket
    region: str = ""  # empty: boto3's default (AWS_REGION, ...)
    access_key: str = ""  # empty: boto3's credential chain (AWS_ACCESS_KEY_ID, an instance role, ...)
    secret_key: str = ""
    create_bucket: bool = True
    # Ceph and MinIO want path-style addressing; AWS takes either.
    addressing_style: str = "path"
    # Sized above the engine's I/O threads (every chunk transfer holds one connection).
    max_connections: int = 64
    # Size of the chunk objects new uploads make. Chunks are named by their content, so a store
    # holds chunks of any size; changing this leaves existing objects readable as they are.
    chunk_size: int = REMOTE_CHUNK_SIZE


@dataclass
class PostgresConfig:
    """Where the index lives (settings `postgres.*`, BLOBSTORE_POSTGRES_* in the environment)."""

    dsn: str = ""  # "host=db port=5432 user=blobstore dbname=blobstore" or a postgresql:// URL
    schema: str = "blobstore"  # several stores can share one database
    pool_size: int = 16
    max_retries: int = 50


@dataclass
class BackendConfig:
    chunk_store: ChunkStoreKind = "file"
    index: IndexKind = "lmdb"
    s3: S3Config = field(default_factory=S3Config)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)

    def server_settings(self) -> dict[str, Any]:
        """The same choice as ServerConfig fields: ServerConfig(**backends.server_settings())."""
        return {"chunk_store": self.chunk_store, "index": self.index, "s3": self.s3, "postgres": self.postgres}

    def validate(self) -> None:
        if self.chunk_store not in CHUNK_STORES:
            raise ValueError(f"chunk_store must be one of {', '.join(CHUNK_STORES)}, not {self.chunk_store!r}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(INDEXES)}, not {self.index!r}")
        low, high = REMOTE_CHUNK_SIZE_RANGE
        if self.chunk_store == "s3" and not low <= self.s3.chunk_size <= high:
            raise ValueError(f"s3.chunk_size must be between {low} and {high} bytes, not {self.s3.chunk_size}")


def open_index(
    data_dir: str, config: BackendConfig, *, map_size: int | None = None, gather_us: int | None = None
) -> Index:
    """`gather_us`: the LMDB index's group-commit wait (engine.index_commit_gather_us); None: its default."""
    config.validate()
    if gather_us is not None and gather_us < 0:
        raise ValueError(f"engine.index_commit_gather_us must not be negative, not {gather_us}")
    if config.index == "postgres":
        from blobstore.server.pgindex import PostgresIndex

        return PostgresIndex(config.postgres)
    from blobstore.server.index import LmdbIndex

    return LmdbIndex(
        os.path.join(data_dir, "index"),
        map_size=map_size or LmdbIndex.DEFAULT_MAP_SIZE,
        gather_s=LmdbIndex.GATHER_S if gather_us is None else gather_us / 1e6,
    )


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
            chunk_size=max(config.chunk_size, backends.s3.chunk_size),
            upload_pipeline_depth=max(config.upload_pipeline_depth, REMOTE_PIPELINE_DEPTH),
            download_readahead=max(config.download_readahead, REMOTE_READAHEAD),
            io_threads=max(config.io_threads, REMOTE_IO_THREADS),
        )
        backends.s3.max_connections = max(backends.s3.max_connections, config.io_threads + 8)
    os.makedirs(data_dir, exist_ok=True)
    index = open_index(data_dir, backends, map_size=config.index_map_size, gather_us=config.index_commit_gather_us)
    try:
        chunks = open_chunk_store(data_dir, backends)
    except BaseException:
        index.close()
        raise
    return Engine(index, chunks, config, **kwargs)
