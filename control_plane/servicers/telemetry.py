"""TelemetryService and PeerService: telemetry lives in the memory of the replica holding the
node's stream; other replicas forward to it over PeerService (addresses under replicas/)."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from control_plane import auth, errors
from control_plane.domain.names import parse_node_name
from control_plane.adapters.index import Inventory
from control_plane.servicers.node import NodeServicer
from gpufed.v1 import peer_pb2, peer_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
DEFAULT_SAMPLES = 60
MAX_SAMPLES = 600


def _validate(request: telemetry_pb2.GetNodeTelemetryRequest) -> int:
    parse_node_name(request.name)
    if not 0 <= request.max_samples <= MAX_SAMPLES:
        raise errors.invalid("INVALID_MAX_SAMPLES", f"max_samples must be in 0..{MAX_SAMPLES}")
    return request.max_samples or DEFAULT_SAMPLES


def local_telemetry(
    nodes: NodeServicer, replica_id: str, request: telemetry_pb2.GetNodeTelemetryRequest
) -> telemetry_pb2.GetNodeTelemetryResponse | None:
    n = _validate(request)
    recent = nodes.telemetry.recent(request.name, n)
    if recent is None:
        if request.name not in nodes.sessions:
            return None
        recent = []  # streaming here, no report yet
    resp = telemetry_pb2.GetNodeTelemetryResponse(node=request.name, recent=recent, replica=replica_id)
    if recent:
        resp.latest.CopyFrom(recent[-1])
    return resp


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, inventory: Inventory, nodes: NodeServicer, replica_id: str, peer_token: str) -> None:
        self.inv = inventory
        self.nodes = nodes
        self.replica_id = replica_id
        self.peer_token = peer_token
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def GetNodeTelemetry(
        self, request: telemetry_pb2.GetNodeTelemetryRequest, context: Ctx
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        _validate(request)
        if request.name not in self.inv.nodes:
            raise errors.not_found("NODE_NOT_FOUND", f"{request.name} is not registered", node=request.name)
        local = local_telemetry(self.nodes, self.replica_id, request)
        if local is not None:
            return local
        owner = self.inv.alive.get(request.name, "").split("/", 1)[0]
        address = self.inv.replicas.get(owner) if owner else None
        if not owner or address is None or owner == self.replica_id:
            raise errors.failed_precondition("NODE_OFFLINE", f"no replica holds a stream of {request.name}")
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        stub = peer_pb2_grpc.PeerServiceStub(channel)
        try:
            resp = await stub.ForwardNodeTelemetry(
                peer_pb2.ForwardNodeTelemetryRequest(request=request),
                metadata=(("authorization", f"Bearer {self.peer_token}"),),
                timeout=3.0,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise errors.failed_precondition(
                    "NODE_OFFLINE", f"{request.name} just left its replica"
                ) from e
            raise errors.unavailable(
                "PEER_UNAVAILABLE", f"replica {owner} did not answer: {e.code().name}"
            ) from e
        out: telemetry_pb2.GetNodeTelemetryResponse = resp.response
        return out

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


class PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    def __init__(self, nodes: NodeServicer, replica_id: str) -> None:
        self.nodes = nodes
        self.replica_id = replica_id

    async def ForwardNodeTelemetry(
        self, request: peer_pb2.ForwardNodeTelemetryRequest, context: Ctx
    ) -> peer_pb2.ForwardNodeTelemetryResponse:
        auth.require(auth.Kind.PEER, auth.Kind.ADMIN)
        local = local_telemetry(self.nodes, self.replica_id, request.request)
        if local is None:
            raise errors.not_found("NODE_NOT_HERE", f"this replica holds no stream of {request.request.name}")
        return peer_pb2.ForwardNodeTelemetryResponse(response=local)
