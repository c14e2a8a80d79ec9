"""Server assembly: engine, gRPC servicer and signed-URL HTTP endpoint on one event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from blobstore.client.memory import release_freed_memory
from blobstore.server.auth import Authenticator, TokenStore, check_exposure, is_loopback
from blobstore.server.backends import BackendConfig, ChunkStoreKind, IndexKind, PostgresConfig, S3Config
from blobstore.server.engine import Engine, EngineConfig, open_engine
from blobstore.server.handlers import wrapping
from blobstore.server.health import HealthServicer
from blobstore.server.http import AccessLogger, create_http_app
from blobstore.server.logs import LogFormat
from blobstore.server.metrics import Metrics, instrument, instrument_http_app
from blobstore.server.quotas import RateLimiter
from blobstore.server.service import StorageServicer, map_errors
from blobstore.server.sessions import UploadSessions
from blobstore.server.signing import UrlSigner, load_secrets
from blobstore.server.tls import TlsFiles
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD = 64 << 10
STORAGE_SERVICE = pb.DESCRIPTOR.services_by_name["Storage"].full_name
# A server that used less than this share of one core over an interval counts as quiet.
QUIET_CPU_SHARE = 0.05


@dataclass
class ServerConfig:
    data_dir: str = "./data"
    host: str = "127.0.0.1"
    port: int = 50051
    # The signed-URL endpoint; None means `port` + 1, or any free port when `port` is 0 too.
    http_port: int | None = None
    # Base of the URLs handed out, for a server behind a proxy: "https://blobs.example.com".
    # Default: http://{host}:{http port}.
    public_url: str = ""
    # Secrets for signing URLs; replicas behind one load balancer must share them.
    # None: the data dir's own secret (made on first start). Later entries only verify (rotation).
    url_signing_secrets: tuple[bytes, ...] | None = None
    # In-flight transfers get this long to finish at shutdown, then UNAVAILABLE.
    shutdown_grace_s: float = 30.0
    # Largest gRPC message accepted: 4 MiB of data plus framing.
    max_message_bytes: int = (4 << 20) + MESSAGE_OVERHEAD
    reap_interval_s: float = 60.0
    # Seconds between hand-backs to the kernel of the free memory the allocator keeps for the
    # next message buffers (blobstore.client.memory), each once the server has been quiet for
    # that long; 0: never, the memory stays with the server.
    memory_release_interval_s: float = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: LogFormat = "text"
    # Without tokens the server is open (namespace "default"); it then binds only
    # loopback addresses unless this is set.
    allow_anonymous: bool = False
    # PEM certificate chain and private key: TLS on every listener when both are set.
    tls_cert: str = ""
    tls_key: str = ""
    # Written with the bound gRPC port once serving (for port 0 and supervisors).
    port_file: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Where chunks and the index live: file + lmdb under data_dir, or (for replicas sharing
    # one store) s3 + postgres, configured in the [s3] and [postgres] sections.
    chunk_store: ChunkStoreKind = "file"
    index: IndexKind = "lmdb"
    s3: S3Config = field(default_factory=S3Config)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)

    @property
    def backends(self) -> BackendConfig:
        return BackendConfig(self.chunk_store, self.index, self.s3, self.postgres)

    @property
    def tls(self) -> TlsFiles | None:
        return TlsFiles.from_paths(self.tls_cert, self.tls_key)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side SSLContext for HTTP listeners, None without TLS."""
        tls = self.tls
        return tls.ssl_context() if tls else None


class BlobstoreServer:
    """A running server: call start(), then stop() (or wait_for_termination())."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None) -> None:
        self.config = config
        if config.index != "lmdb" and not config.url_signing_secrets:
            raise ValueError(
                "replicas sharing an index must share the URL signing secrets: set url_signing_secrets "
                "(BLOBSTORE_URL_SIGNING_SECRETS), or a URL made by one replica fails on the others"
            )
        self.engine = engine or open_engine(config.data_dir, config.engine, backends=config.backends)
        secrets = config.url_signing_secrets or tuple(load_secrets(config.data_dir))
        self.signer = UrlSigner(secrets, clock=self.engine.clock)
        self.tokens = TokenStore(self.engine.index, clock=self.engine.clock)
        self.authenticator = Authenticator(
            self.tokens,
            self.engine.config.quotas,
            RateLimiter(self.engine.clock),
            anonymous_allowed=config.allow_anonymous or is_loopback(config.host),
        )
        self.sessions = UploadSessions(self.engine)
        self.servicer = StorageServicer(
            self.engine,
            resolve_caller=self.authenticator.caller_for,
            max_message_bytes=config.max_message_bytes,
            url_signer=self.signer,
            sessions=self.sessions,
        )
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.metrics = Metrics(self.engine)
        self.grpc = grpc.aio.server(options=options)
        self.health = HealthServicer()
        with wrapping(self.grpc, self._wrap_handler) as registrar:
            pb_grpc.add_StorageServicer_to_server(self.servicer, registrar)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
            # What enable_server_reflection registers for an aio server, done here so it is wrapped too.
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer((STORAGE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)),
                registrar,
            )
        http_app = create_http_app(self.engine, self.signer)
        instrument_http_app(http_app, self.metrics)
        self.http = web.AppRunner(
            http_app,
            access_log_class=AccessLogger,
            shutdown_timeout=config.shutdown_grace_s,
        )
        self.ports: dict[str, int] = {}
        self._background: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    def _wrap_handler(
        self, service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # Telemetry outside the error mapping, so that it records the status code the client gets.
        return instrument(self.metrics, service, method, map_errors(service, method, handler))

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.ports['grpc']}"

    async def start(self) -> None:
        host = self.config.host
        try:
            check_exposure(host, self.tokens, allow_anonymous=self.config.allow_anonymous)
            tls = self.config.tls
            credentials = tls.grpc_credentials() if tls else None
            http_tls = tls.ssl_context() if tls else None
        except Exception:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
            self._stopped.set()
            raise
        if tls is None and not is_loopback(host) and self.tokens.any():
            log.warning("serving %s without TLS: bearer tokens cross the network in plain text", host)
        swept = await asyncio.get_running_loop().run_in_executor(None, self.engine.startup_sweep)
        log.info("start-up sweep: %s", swept)
        bind = f"[{host}]" if ":" in host else host
        if credentials is None:
            self.ports["grpc"] = self.grpc.add_insecure_port(f"{bind}:{self.config.port}")
        else:
            self.ports["grpc"] = self.grpc.add_secure_port(f"{bind}:{self.config.port}", credentials)
        if self.ports["grpc"] == 0:
            raise OSError(f"cannot bind gRPC on {host}:{self.config.port}")
        await self.grpc.start()
        try:
            await self._start_http(host, http_tls)
        except BaseException:
            # The HTTP port is taken, say: leave nothing half-started behind.
            await self.grpc.stop(0)
            await self.http.cleanup()
            raise
        for service in ("", STORAGE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.port_file:
            _write_atomically(self.config.port_file, f"{self.ports['grpc']}\n")
        self._background.append(asyncio.create_task(self._reap_forever()))
        if self.config.memory_release_interval_s > 0:
            self._background.append(asyncio.create_task(self._release_memory_forever()))
        log.info("blobstore serving gRPC on %s (data in %s)", self.address, os.path.abspath(self.config.data_dir))
        log.info("blobstore serving signed URLs over HTTP on port %d as %s", self.ports["http"], self.signer.base_url)

    async def _start_http(self, host: str, tls: ssl.SSLContext | None) -> None:
        port = self.config.http_port
        if port is None:
            # Next to the gRPC port, so that two servers given two --port values do not collide.
            port = 0 if self.config.port == 0 else self.config.port + 1
        await self.http.setup()
        await web.TCPSite(self.http, host, port, ssl_context=tls).start()
        self.ports["http"] = self.http.addresses[0][1]
        public = self.config.public_url
        if not public:
            # A wildcard address is no place to send anyone: name this machine instead.
            name = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
            scheme = "https" if tls else "http"
            public = f"{scheme}://{f'[{name}]' if ':' in name else name}:{self.ports['http']}"
        self.signer.base_url = public.rstrip("/")

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            try:
                while await self.engine.reap_expired() > 0:
                    pass
                await asyncio.get_running_loop().run_in_executor(None, self.engine.sweep_leases)
                # A shared store's orphans are not listed at start-up, as a local store's chunk
                # files are: the listing costs a LIST request per 1000 chunks, every restart of
                # every replica would repeat it, and orphans must age a lease TTL first anyway.
                # Each replica asks here (one read); one per store lists, once per
                # engine.orphan_sweep_interval_ns. On the engine's workers, which close() waits
                # for (the listing stops at its next page).
                await asyncio.get_running_loop().run_in_executor(self.engine.executor, self.engine.sweep_orphans_if_due)
                await self.sessions.reap_expired()
            except Exception:
                log.exception("reaping expired objects failed; will try again")

    async def _release_memory_forever(self) -> None:
        """Once the server has been quiet for an interval, the buffers the allocator kept for
        its transfers (tens of MB) go back to the kernel. Not while it is busy: trimming in the
        middle of 1 GiB uploads cost them more CPU (3.61 against 3.32 s, medians of five)."""
        interval = self.config.memory_release_interval_s
        cpu_at = time.process_time()
        while True:
            await asyncio.sleep(interval)
            busy, cpu_at = time.process_time() - cpu_at, time.process_time()
            if busy < QUIET_CPU_SHARE * interval:
                await asyncio.get_running_loop().run_in_executor(None, release_freed_memory)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish within the grace period, then closes the store."""
        if self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_s if grace is None else grace
        # Probes and load balancers see NOT_SERVING (watchers are told) while in-flight calls finish.
        await self.health.enter_graceful_shutdown()
        for task in self._background:
            task.cancel()
        stopping = asyncio.create_task(self.grpc.stop(grace + 1.0))
        # Stops listening at once; HTTP transfers get the configured grace, then are cancelled
        # (an upload cancelled midway commits nothing).
        stopping_http = asyncio.create_task(self.http.cleanup())
        try:
            await asyncio.wait_for(asyncio.shield(stopping), timeout=grace)
        except TimeoutError:
            # Transfers still running stop at their next message with UNAVAILABLE.
            self.servicer.stopping = True
        await stopping
        await stopping_http
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def create_server(config: ServerConfig, engine: Engine | None = None) -> tuple[BlobstoreServer, dict[str, int]]:
    """Builds and starts a server; with port 0 the OS picks free ports, returned here."""
    server = BlobstoreServer(config, engine)
    await server.start()
    return server, server.ports


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server, _ = await create_server(config)
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)
    await shutdown.wait()
    log.info("shutting down: finishing in-flight calls for up to %.0fs", config.shutdown_grace_s)
    await server.stop()
    log.info("stopped")
