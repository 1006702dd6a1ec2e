"""One wrapper around every gpufed RPC: authentication, request id, logging, metrics and the
mapping of domain errors to AIP-193 statuses. Health and reflection stay open and unwrapped.

It wraps the handler's behaviour (rather than setting state in intercept_service) so the
principal and log context live in the task that runs the RPC.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from control_plane import auth, errors
from control_plane.metrics import Metrics
from control_plane.store import StoreUnavailable
from gpufed.logs import get_logger

log = get_logger(__name__)

_RNG = random.Random()
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:64]
    # Not a secret, just unique enough to follow one call through the logs; os.urandom per
    # call costs more than the rest of a small RPC on some hosts.
    return f"{_RNG.getrandbits(64):016x}"


class _Call:
    """Per-RPC bookkeeping shared by the four handler shapes."""

    def __init__(self, interceptor: RpcInterceptor, method: str, context: grpc.aio.ServicerContext[Any, Any]):
        self.i = interceptor
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK

    async def begin(self) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=_request_id(self.context), method=self.method)
        principal = await self.i.authenticator.authenticate(self.context.invocation_metadata())
        auth.set_current_principal(principal)
        structlog.contextvars.bind_contextvars(principal=str(principal))

    async def fail(self, exc: BaseException) -> None:
        if isinstance(exc, errors.ApiError):
            err = exc
        elif isinstance(exc, StoreUnavailable):
            err = errors.unavailable("ETCD_UNAVAILABLE", f"the cluster store is unavailable, retry: {exc}")
        else:
            log.exception("unexpected error in RPC")
            err = errors.unavailable("REPLICA_ERROR", "the replica failed to serve this call; retry")
        self.code = err.code
        if err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.warning("access denied", code=err.code.name, reason=err.reason, detail=err.message)
        await self.context.abort_with_status(err.to_status())

    def end(self) -> None:
        elapsed = time.perf_counter() - self.start
        m = self.i.metrics
        if m is not None:
            m.rpcs.labels(self.method, self.code.name).inc()
            m.rpc_latency.labels(self.method).observe(elapsed)
        if self.i.log_calls:
            log.info("rpc", code=self.code.name, ms=round(elapsed * 1000, 2))
        structlog.contextvars.clear_contextvars()
        auth.set_current_principal(None)


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self, authenticator: auth.Authenticator, metrics: Metrics | None = None, log_calls: bool = False
    ):
        self.authenticator = authenticator
        self.metrics = metrics
        self.log_calls = log_calls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        short = method.rsplit(".", 1)[-1].replace("/", ".")
        return self._wrap(handler, short)

    def _wrap(self, h: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kw = {"request_deserializer": h.request_deserializer, "response_serializer": h.response_serializer}
        if h.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(h.unary_unary, method), **kw)
        if h.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(h.stream_unary, method), **kw)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(h.unary_stream, method), **kw)
        return grpc.stream_stream_rpc_method_handler(self._streaming(h.stream_stream, method), **kw)

    def _unary(self, fn: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(self, method, context)
            try:
                await call.begin()
                return await fn(request, context)
            except (errors.ApiError, StoreUnavailable) as e:
                await call.fail(e)
            except Exception as e:
                if _is_abort(e):
                    raise
                await call.fail(e)
            finally:
                call.end()

        return behaviour

    def _streaming(
        self, fn: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = _Call(self, method, context)
            try:
                await call.begin()
                async for item in fn(request, context):
                    yield item
            except (errors.ApiError, StoreUnavailable) as e:
                await call.fail(e)
            except Exception as e:
                if _is_abort(e):
                    raise
                await call.fail(e)
            finally:
                call.end()

        return behaviour


def _is_abort(e: BaseException) -> bool:
    # context.abort() raises grpc's own AbortError: let it through untouched.
    return type(e).__name__ in ("AbortError", "UsageError", "InternalError") and type(
        e
    ).__module__.startswith("grpc")
