"""Telemetry: recent reports live in the memory of the replica holding the node's stream; other
replicas forward GetNodeTelemetry to it over PeerService (control_plane.adapters.peer)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from control_plane.adapters.index import Inventory
from control_plane.adapters.peer import NotThere, PeerClient
from control_plane.domain import errors
from control_plane.domain.names import parse_node_name
from gpufed.v1 import common_pb2, telemetry_pb2

RING_SIZE = 300
# And at most this many bytes of reports per node (the oldest go first): with reports bounded
# at 128 KiB, a replica's telemetry memory is at most its streams x RING_BYTES.
RING_BYTES = 512 * 1024
# Who asks, as the application scopes it: ("operator", "") sees everything, ("provider", NAME)
# its own nodes, ("tenant", NAME) the GPUs its leases hold.
Viewer = tuple[str, str]
OPERATOR: Viewer = ("operator", "")
DEFAULT_SAMPLES = 60
MAX_SAMPLES = 600


class TelemetryRings:
    """Recent reports per node held by this replica, newest last."""

    def __init__(self, size: int = RING_SIZE, max_bytes: int = RING_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.rings: dict[str, deque[common_pb2.NodeReport]] = {}
        self.sizes: dict[str, deque[int]] = {}  # byte size of each report in the ring
        self.bytes: dict[str, int] = {}

    def add(self, name: str, report: common_pb2.NodeReport, size: int | None = None) -> None:
        ring = self.rings.get(name)
        if ring is None:
            ring = self.rings[name] = deque()
            self.sizes[name] = deque()
            self.bytes[name] = 0
        sizes = self.sizes[name]
        n = report.ByteSize() if size is None else size
        ring.append(report)
        sizes.append(n)
        total = self.bytes[name] + n
        while len(ring) > self.size or (total > self.max_bytes and len(ring) > 1):
            ring.popleft()
            total -= sizes.popleft()
        self.bytes[name] = total

    def recent(self, name: str, n: int) -> list[common_pb2.NodeReport] | None:
        ring = self.rings.get(name)
        if ring is None:
            return None
        return list(ring)[-n:] if n else []

    def drop(self, name: str) -> None:
        self.rings.pop(name, None)
        self.sizes.pop(name, None)
        self.bytes.pop(name, None)


def validate(request: telemetry_pb2.GetNodeTelemetryRequest) -> int:
    """The number of samples asked for; INVALID_ARGUMENT for a bad name or count."""
    parse_node_name(request.name)
    if not 0 <= request.max_samples <= MAX_SAMPLES:
        raise errors.invalid(
            "INVALID_MAX_SAMPLES", f"max_samples must be in 0..{MAX_SAMPLES}", field="max_samples"
        )
    return request.max_samples or DEFAULT_SAMPLES


class Telemetry:
    def __init__(
        self,
        inventory: Inventory,
        rings: TelemetryRings,
        streaming: Callable[[], Mapping[str, object]],
        replica_id: str,
        peers: PeerClient,
    ) -> None:
        self.inv = inventory
        self.rings = rings
        self.streaming = streaming  # node name -> session, of the streams held here
        self.replica_id = replica_id
        self.peers = peers

    def local(
        self, request: telemetry_pb2.GetNodeTelemetryRequest
    ) -> telemetry_pb2.GetNodeTelemetryResponse | None:
        """The answer from this replica's rings; None if it holds no stream of the node."""
        n = validate(request)
        recent = self.rings.recent(request.name, n)
        if recent is None:
            if request.name not in self.streaming():
                return None
            recent = []  # streaming here, no report yet
        resp = telemetry_pb2.GetNodeTelemetryResponse(
            node=request.name, recent=recent, replica=self.replica_id
        )
        if recent:
            resp.latest.CopyFrom(recent[-1])
        return resp

    async def get(
        self, request: telemetry_pb2.GetNodeTelemetryRequest, viewer: Viewer = OPERATOR
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        """Here, or from the replica that holds the node's stream, as `viewer` may see it: a
        provider its own nodes, a tenant only the GPUs it holds (anything else looks missing)."""
        validate(request)
        visible = self._visible_gpus(request.name, viewer)
        resp = await self._get(request)
        if visible is None:
            return resp
        for report in [*resp.recent, *([resp.latest] if resp.HasField("latest") else [])]:
            kept = [g for g in report.gpus if g.uuid in visible]
            del report.gpus[:]
            report.gpus.extend(kept)
        return resp

    def _visible_gpus(self, name: str, viewer: Viewer) -> set[str] | None:
        """The GPUs of the node the viewer may see (None: all); NOT_FOUND if none."""
        entry = self.inv.nodes.get(name)
        kind, who = viewer
        if entry is not None and (kind == "operator" or (kind == "provider" and entry.node.provider == who)):
            return None
        held: set[str] = set()
        if entry is not None and kind == "tenant":
            for lease_id in self.inv.tenant_leases.get(who, ()):
                lease = self.inv.leases.get(lease_id)
                if lease is not None:
                    held.update(g.uuid for g in lease.gpus if g.node == name)
        if not held:
            raise errors.not_found("NODE_NOT_FOUND", f"{name} is not registered", node=name)
        return held

    async def _get(
        self, request: telemetry_pb2.GetNodeTelemetryRequest
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        if request.name not in self.inv.nodes:
            raise errors.not_found("NODE_NOT_FOUND", f"{request.name} is not registered", node=request.name)
        local = self.local(request)
        if local is not None:
            return local
        owner = self.inv.alive.get(request.name, "").split("/", 1)[0]
        address = self.inv.replicas.get(owner) if owner else None
        if not owner or address is None or owner == self.replica_id:
            raise errors.failed_precondition("NODE_OFFLINE", f"no replica holds a stream of {request.name}")
        if not self.peers.peer_token:
            raise errors.unavailable(
                "PEER_UNAVAILABLE",
                f"{request.name} streams to replica {owner}, and no peer credential is set",
            )
        try:
            return await self.peers.node_telemetry(owner, address, request)
        except NotThere as e:
            raise errors.failed_precondition("NODE_OFFLINE", f"{request.name} just left its replica") from e

    def forwarded(
        self, request: telemetry_pb2.GetNodeTelemetryRequest
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        """A peer's forwarded request: answered from here only."""
        local = self.local(request)
        if local is None:
            raise errors.not_found("NODE_NOT_HERE", f"this replica holds no stream of {request.name}")
        return local
