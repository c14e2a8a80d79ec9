"""Registers servicers on the gRPC server with each method's handler wrapped once, at start-up.

gRPC's server interceptors run on every call: the server awaits a chain of coroutines to
find the handler, and each interceptor builds a new handler around it. What ours did
(error mapping, telemetry) is the same for every call of a method, so it is done here
once per method instead; the server then finds handlers on its fast path. That was
about a fifth of the server's CPU per small Set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

# (service, method, handler as generated) -> the handler the server runs
HandlerWrapper = Callable[[str, str, "grpc.RpcMethodHandler[Any, Any]"], "grpc.RpcMethodHandler[Any, Any]"]

HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    return next(kind for kind in HANDLER_KINDS if getattr(handler, kind) is not None)


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None,
    response_serializer: Callable[[Any], bytes] | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` running `behavior`."""
    return _FACTORIES[handler_kind(handler)](
        behavior, request_deserializer=request_deserializer, response_serializer=response_serializer
    )


class _Registrar:
    """Stands in for the server while a generated add_*Servicer_to_server registers a servicer."""

    def __init__(self, server: grpc.aio.Server, wrap: HandlerWrapper) -> None:
        self._server = server
        self._wrap = wrap
        self.generic = 0
        self.by_name = 0

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        # Generated code passes the same methods to add_registered_method_handlers, where they
        # are wrapped and registered both ways; these unwrapped ones must not reach the server.
        self.generic += 1

    def add_registered_method_handlers(
        self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {name: self._wrap(service, name, handler) for name, handler in method_handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
        self.by_name += 1


@contextmanager
def wrapping(server: grpc.aio.Server, wrap: HandlerWrapper) -> Iterator[Any]:
    """Yields a stand-in for `server` to pass to generated add_*Servicer_to_server functions."""
    registrar = _Registrar(server, wrap)
    yield registrar
    if registrar.generic != registrar.by_name:
        raise RuntimeError("a servicer registered only generic handlers, which cannot be wrapped by method")
