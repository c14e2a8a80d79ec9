"""Servicers are registered with each method wrapped once, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc
import pytest

from blobstore.server.handlers import HandlerWrapper, wrapping

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


async def _echo(request: Any, context: Any) -> Any:
    return request


def _handlers() -> dict[str, Handler]:
    return {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}


async def _register(wrap: HandlerWrapper, register: Callable[[Any], None]) -> None:
    server = grpc.aio.server()
    with wrapping(server, wrap) as registrar:
        register(registrar)


def _as_generated_code_does(server: Any) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", _handlers()),))
    server.add_registered_method_handlers("t.Echo", _handlers())


def _generic_only(server: Any) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", _handlers()),))


def test_each_method_is_wrapped_once(run: Callable[..., Any]) -> None:
    seen: list[tuple[str, str]] = []

    def wrap(service: str, method: str, handler: Handler) -> Handler:
        seen.append((service, method))
        return handler

    run(_register(wrap, _as_generated_code_does))
    assert seen == [("t.Echo", "Echo")]


def test_a_servicer_that_registers_only_generic_handlers_is_refused(run: Callable[..., Any]) -> None:
    # Its methods could not be wrapped, so they would run without error mapping or telemetry.
    with pytest.raises(RuntimeError, match="only generic handlers"):
        run(_register(lambda service, method, handler: handler, _generic_only))
