"""TelemetryService and PeerService (control_plane.app.telemetry does the work)."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from control_plane import auth
from control_plane.app.telemetry import Telemetry
from gpufed.v1 import peer_pb2, peer_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    async def GetNodeTelemetry(
        self, request: telemetry_pb2.GetNodeTelemetryRequest, context: Ctx
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        p = auth.current_principal()
        viewer = (
            (p.kind.value, p.name) if p.kind in (auth.Kind.TENANT, auth.Kind.PROVIDER) else ("operator", "")
        )
        return await self.telemetry.get(request, viewer)


class PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    async def ForwardNodeTelemetry(
        self, request: peer_pb2.ForwardNodeTelemetryRequest, context: Ctx
    ) -> peer_pb2.ForwardNodeTelemetryResponse:
        return peer_pb2.ForwardNodeTelemetryResponse(response=self.telemetry.forwarded(request.request))
