"""The RPC wrapper: authentication, the principal of the call, and errors as AIP-193 statuses
(never INTERNAL: domain errors keep their code, etcd outages and surprises are UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from control_plane import auth
from control_plane.adapters.store import StoreUnavailable
from control_plane.domain import errors
from control_plane.rpc import RpcWrapper


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, token: str = "boot") -> None:
        self.metadata = [("authorization", f"Bearer {token}"), ("x-request-id", "req-1")] if token else []
        self.status: grpc.Status | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise Aborted  # grpc.aio raises its own AbortError here


def _wrapper() -> RpcWrapper:
    return RpcWrapper(auth.Authenticator(None, admin_token="boot"))


def _call(behaviour: Any, ctx: FakeContext) -> Any:
    h = _wrapper().handler("/gpufed.v1.LeaseService/GetLease", grpc.unary_unary_rpc_method_handler(behaviour))
    assert h is not None

    async def go() -> Any:
        try:
            return await h.unary_unary(object(), ctx)
        except Aborted:
            return None

    return asyncio.run(go())


def _reason(status: grpc.Status | None) -> tuple[grpc.StatusCode, str]:
    assert status is not None
    proto = status_pb2.Status()
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            proto.ParseFromString(value)
    info = error_details_pb2.ErrorInfo()
    assert proto.details and proto.details[0].Unpack(info) and info.domain == "gpufed.v1"
    return status.code, info.reason


async def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (
            errors.invalid("INVALID_TTL", "bad ttl", field="ttl"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TTL",
        ),
        (errors.aborted("LEASE_CHANGING", "retry"), grpc.StatusCode.ABORTED, "LEASE_CHANGING"),
        (StoreUnavailable("etcd gone"), grpc.StatusCode.UNAVAILABLE, "ETCD_UNAVAILABLE"),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
    ],
)
def test_every_failure_becomes_a_status_with_one_error_info(
    exc: BaseException, code: grpc.StatusCode, reason: str
) -> None:
    ctx = FakeContext()
    _call(lambda req, c: _raise(exc), ctx)
    assert _reason(ctx.status) == (code, reason)


def test_a_call_without_a_token_is_unauthenticated_and_never_runs() -> None:
    ran = []

    async def behaviour(req: Any, c: Any) -> str:
        ran.append(1)
        return "ok"

    ctx = FakeContext(token="")
    _call(behaviour, ctx)
    assert _reason(ctx.status) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN") and not ran


def test_the_principal_is_bound_for_the_call_and_gone_after_it() -> None:
    async def behaviour(req: Any, c: Any) -> str:
        return str(auth.current_principal())

    assert _call(behaviour, FakeContext()) == "admin:bootstrap-admin"
    with pytest.raises(errors.DomainError):
        auth.current_principal()


def test_streams_are_wrapped_alike() -> None:
    async def stream(req: Any, c: Any) -> AsyncIterator[int]:
        yield 1
        raise errors.not_found("LEASE_NOT_FOUND", "gone")

    h = _wrapper().handler("/gpufed.v1.LeaseService/WatchLease", grpc.unary_stream_rpc_method_handler(stream))
    assert h is not None
    ctx = FakeContext()

    async def go() -> list[int]:
        got = []
        try:
            async for item in h.unary_stream(object(), ctx):
                got.append(item)
        except Aborted:
            pass
        return got

    assert asyncio.run(go()) == [1]
    assert _reason(ctx.status) == (grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")


def test_health_and_reflection_are_served_unwrapped() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: None)
    assert _wrapper().handler("/grpc.health.v1.Health/Check", handler) is handler


def test_the_field_at_fault_travels_in_the_error_info_metadata() -> None:
    from control_plane.errors import to_status

    status = to_status(errors.exhausted("GANG_TOO_LARGE", "too many", field="gpu_count"))
    assert _reason(status) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "GANG_TOO_LARGE")
    proto = status_pb2.Status()
    proto.ParseFromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    proto.details[0].Unpack(info)
    assert info.metadata["field"] == "gpu_count" and proto.message == "too many"


def test_privileged_calls_and_denials_are_audit_events(monkeypatch: pytest.MonkeyPatch) -> None:
    import control_plane.rpc as rpc_module
    from gpufed.v1 import admin_pb2

    events: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def info(self, event: str, **kw: Any) -> None:
            events.append((event, kw))

    monkeypatch.setattr(rpc_module, "audit", Recorder())

    async def cordon(req: Any, c: Any) -> str:
        return "ok"

    def call(method: str, ctx: FakeContext) -> None:
        h = _wrapper().handler(method, grpc.unary_unary_rpc_method_handler(cordon))
        assert h is not None

        async def go() -> None:
            with contextlib.suppress(Aborted):
                await h.unary_unary(admin_pb2.CordonNodeRequest(name="providers/p/nodes/n"), ctx)

        asyncio.run(go())

    call("/gpufed.v1.AdminService/CordonNode", FakeContext())
    call("/gpufed.v1.AdminService/CordonNode", FakeContext(token="wrong"))
    call("/gpufed.v1.DiscoveryService/SearchOffers", FakeContext())  # allowed, not privileged
    assert [(e, kw["code"], kw["reason"], kw["target"]) for e, kw in events] == [
        ("privileged call", "OK", "", "providers/p/nodes/n"),
        ("denied", "UNAUTHENTICATED", "UNKNOWN_TOKEN", "providers/p/nodes/n"),
    ]
    assert events[0][1]["principal"] == "admin:bootstrap-admin"
