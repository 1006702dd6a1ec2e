"""Calls to other replicas over PeerService (addresses under replicas/ in etcd)."""

from __future__ import annotations

import grpc

from control_plane.domain import errors
from gpufed.v1 import peer_pb2, peer_pb2_grpc, telemetry_pb2

FORWARD_TIMEOUT_S = 3.0


class NotThere(Exception):
    """The peer holds no stream of the node (it just left)."""


class PeerClient:
    def __init__(self, peer_token: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.peer_token = peer_token
        self.credentials = credentials  # None: plaintext (replicas on loopback)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def node_telemetry(
        self, owner: str, address: str, request: telemetry_pb2.GetNodeTelemetryRequest
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = (
                grpc.aio.secure_channel(address, self.credentials)
                if self.credentials is not None
                else grpc.aio.insecure_channel(address)
            )
        stub = peer_pb2_grpc.PeerServiceStub(channel)
        try:
            resp = await stub.ForwardNodeTelemetry(
                peer_pb2.ForwardNodeTelemetryRequest(request=request),
                metadata=(("authorization", f"Bearer {self.peer_token}"),),
                timeout=FORWARD_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NotThere(request.name) from e
            raise errors.unavailable(
                "PEER_UNAVAILABLE", f"replica {owner} did not answer: {e.code().name}"
            ) from e
        out: telemetry_pb2.GetNodeTelemetryResponse = resp.response
        return out

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
