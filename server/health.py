"""grpc.health.v1 whose Watch streams end once they have reported the shutdown.

The library's Watch never returns, so a client that watches health (gRPC
client-side health checking does) would hold the server's shutdown for the
whole grace period. Here a watcher gets NOT_SERVING and then the end of its
stream, and the shutdown waits only for real work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health, health_pb2


class _ReportingContext:
    """Passes everything to the real context; notices when NOT_SERVING has gone out during shutdown."""

    def __init__(self, context: Any, servicer: HealthServicer, reported: asyncio.Event) -> None:
        self._context = context
        self._servicer = servicer
        self._reported = reported

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if self._servicer.shutting_down and message.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self._reported.set()


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = False

    async def enter_graceful_shutdown(self) -> None:
        self.shutting_down = True
        await super().enter_graceful_shutdown()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        reported = asyncio.Event()
        watching = asyncio.ensure_future(super().Watch(request, _ReportingContext(context, self, reported)))
        ended = asyncio.ensure_future(reported.wait())
        try:
            await asyncio.wait({watching, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, ended):
                task.cancel()
        if watching.done() and not watching.cancelled():
            watching.result()  # raises what ended the watch, if anything did
