"""The replica's in-memory view of the federation, fed by etcd events (control_plane.adapters.watcher).

Pure state: `apply` takes one key change at a time in revision order; nothing here does I/O.
Node records, liveness and allocations arrive under different keys in any order, so they are
kept apart and joined on read. Subscribers get a Change for each applied event.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.domain.geo import unit_vector
from control_plane.domain.names import node_name
from control_plane.adapters.store import Keyspace
from gpufed.v1 import common_pb2, discovery_pb2, lease_pb2

_UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY
# Plain ints: attribute access on the enum wrapper goes through a Python __getattr__, and state()
# runs on every allocation change.
_UNSPECIFIED = common_pb2.NODE_STATE_UNSPECIFIED
_READY = common_pb2.NODE_STATE_READY
_OFFLINE = common_pb2.NODE_STATE_OFFLINE
_CORDONED = common_pb2.NODE_STATE_CORDONED
_DRAINING = common_pb2.NODE_STATE_DRAINING


@dataclass(slots=True)
class NodeEntry:
    node: common_pb2.Node
    mod_revision: int
    # Derived once per record, reused by every summary of it (allocations change far more often):
    # (uuid, model, health, memory, gpu) in NVML index order, and the node's unit vector.
    gpus: list[tuple[str, str, int, int, common_pb2.Gpu]] = field(default_factory=list)
    xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(slots=True)
class GpuGroup:
    """Free GPUs of one model and health on one node (the unit searches look at)."""

    model: str
    health: int
    memory_bytes: int
    gpus: list[common_pb2.Gpu]


@dataclass(slots=True)
class NodeSummary:
    """What a search needs of a node, kept up to date on every change of the node, its liveness
    or its allocations, so searches read plain attributes instead of protobufs."""

    name: str
    node: common_pb2.Node
    mod_revision: int
    schedulable: bool
    groups: list[GpuGroup]
    price: float
    xyz: tuple[float, float, float]
    # Offers built from this summary, by the GPUs they hold (dropped with the summary on change).
    offers: dict[tuple[str, ...], discovery_pb2.Offer] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Change:
    """kind: node | alive | alloc | lease | token | replica | leader | relist."""

    kind: str
    name: str
    value: bytes | None
    revision: int
    # kind "lease": the parsed record as the index holds it (the new one, or the one that went).
    lease: lease_pb2.Lease | None = None


@dataclass
class Inventory:
    keys: Keyspace
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    # node name -> "replica_id/session_id" of the stream holding it
    alive: dict[str, str] = field(default_factory=dict)
    alive_revision: dict[str, int] = field(default_factory=dict)
    # node name -> gpu uuid -> lease id
    allocs: dict[str, dict[str, str]] = field(default_factory=dict)
    leases: dict[str, lease_pb2.Lease] = field(default_factory=dict)
    lease_revision: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)
    leader: str = ""
    revision: int = 0
    # node names ordered by (price, name), overall and per country, for searches that stop early
    by_price: list[tuple[float, str]] = field(default_factory=list)
    by_country: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    summaries: dict[str, NodeSummary] = field(default_factory=dict)
    # nodes whose record says DRAINING: the leader's drain sweep looks at these, not at every node
    draining: set[str] = field(default_factory=set)
    _subscribers: list[Callable[[Change], None]] = field(default_factory=list)
    _revision_waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    # -- feeding --------------------------------------------------------------------------------

    def reset(self) -> None:
        self.nodes.clear()
        self.alive.clear()
        self.alive_revision.clear()
        self.allocs.clear()
        self.leases.clear()
        self.lease_revision.clear()
        self.replicas.clear()
        self.by_price.clear()
        self.by_country.clear()
        self.summaries.clear()
        self.draining.clear()
        self.leader = ""

    def apply(
        self,
        key: bytes,
        value: bytes | None,
        mod_revision: int,
        create_revision: int = 0,
    ) -> Change | None:
        parts = self.keys.relative(key)
        top = parts[0]
        change: Change | None = None
        if top == "nodes" and len(parts) == 3:
            name = node_name(parts[1], parts[2])
            self._set_node(name, value, mod_revision)
            self._summarize(name)
            change = Change("node", name, value, mod_revision)
        elif top == "alive" and len(parts) == 3:
            name = node_name(parts[1], parts[2])
            if value is None:
                self.alive.pop(name, None)
                self.alive_revision.pop(name, None)
            else:
                self.alive[name] = value.decode()
                self.alive_revision[name] = mod_revision
            self._summarize(name)
            change = Change("alive", name, value, mod_revision)
        elif top == "alloc" and len(parts) == 4:
            name = node_name(parts[1], parts[2])
            if value is None:
                held = self.allocs.get(name)
                if held is not None:
                    held.pop(parts[3], None)
                    if not held:
                        del self.allocs[name]
            else:
                self.allocs.setdefault(name, {})[parts[3]] = value.decode()
            self._summarize(name)
            change = Change("alloc", name, value, mod_revision)
        elif top == "leases" and len(parts) == 2:
            lease: lease_pb2.Lease | None
            if value is None:
                lease = self.leases.pop(parts[1], None)
                self.lease_revision.pop(parts[1], None)
            else:
                lease = lease_pb2.Lease.FromString(value)
                # The grant Txn's revision is the fencing token: the key's create revision.
                if not lease.fencing_token:
                    lease.fencing_token = create_revision or mod_revision
                self.leases[parts[1]] = lease
                self.lease_revision[parts[1]] = mod_revision
            change = Change("lease", parts[1], value, mod_revision, lease)
        elif top == "replicas" and len(parts) == 2:
            if value is None:
                self.replicas.pop(parts[1], None)
            else:
                self.replicas[parts[1]] = value.decode()
            change = Change("replica", parts[1], value, mod_revision)
        elif top == "leader" and len(parts) == 1:
            self.leader = value.decode() if value is not None else ""
            change = Change("leader", "leader", value, mod_revision)
        elif top == "tokens" and len(parts) == 2:
            change = Change("token", parts[1], value, mod_revision)
        if change is not None:
            for fn in list(self._subscribers):
                fn(change)
        return change

    def _set_node(self, name: str, value: bytes | None, mod_revision: int) -> None:
        old = self.nodes.get(name)
        if old is not None:
            item = (old.node.price_per_gpu_hour, name)
            for ordered in (self.by_price, self.by_country.get(old.node.location.country_code, [])):
                i = bisect.bisect_left(ordered, item)
                if i < len(ordered) and ordered[i] == item:
                    del ordered[i]
        if value is None:
            self.nodes.pop(name, None)
            self.draining.discard(name)
            return
        node = common_pb2.Node.FromString(value)
        if node.state == _DRAINING:
            self.draining.add(name)
        else:
            self.draining.discard(name)
        gpus = sorted(
            ((g.uuid, g.model, int(g.health), g.memory_total_bytes, g) for g in node.gpus),
            key=lambda t: t[4].index,
        )
        self.nodes[name] = NodeEntry(
            node, mod_revision, gpus, unit_vector(node.location.latitude, node.location.longitude)
        )
        item = (node.price_per_gpu_hour, name)
        bisect.insort(self.by_price, item)
        bisect.insort(self.by_country.setdefault(node.location.country_code, []), item)

    def _summarize(self, name: str) -> None:
        entry = self.nodes.get(name)
        if entry is None:
            self.summaries.pop(name, None)
            return
        held = self.allocs.get(name, {})
        groups: dict[tuple[str, int], GpuGroup] = {}
        for uuid, model, health, memory, gpu in entry.gpus:
            if uuid in held or health == _UNHEALTHY:
                continue
            g = groups.get((model, health))
            if g is None:
                g = groups[(model, health)] = GpuGroup(model, health, memory, [])
            elif memory < g.memory_bytes:
                g.memory_bytes = memory
            g.gpus.append(gpu)
        self.summaries[name] = NodeSummary(
            name,
            entry.node,
            entry.mod_revision,
            self.is_schedulable(name),
            list(groups.values()),
            entry.node.price_per_gpu_hour,
            entry.xyz,
        )

    def advance(self, revision: int) -> None:
        """The index now reflects everything up to revision."""
        if revision <= self.revision:
            return
        self.revision = revision
        still = []
        for rev, fut in self._revision_waiters:
            if rev <= revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((rev, fut))
        self._revision_waiters = still

    async def wait_for_revision(self, revision: int, timeout: float = 2.0) -> None:
        """Until the index has applied every event up to `revision` of our keys. Pass revisions
        of our own keys (a write's revision, or one read back): etcd's revision also moves with
        writes elsewhere that no event of ours will ever reach."""
        if self.revision >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, fut))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await fut

    def subscribe(self, fn: Callable[[Change], None]) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    # -- reading --------------------------------------------------------------------------------

    def state(self, name: str) -> int:
        entry = self.nodes.get(name)
        if entry is None:
            return _UNSPECIFIED
        admin = entry.node.state
        if admin in (_CORDONED, _DRAINING):
            return admin
        return _READY if name in self.alive else _OFFLINE

    def is_schedulable(self, name: str) -> bool:
        return self.state(name) == _READY

    def held(self, name: str) -> dict[str, str]:
        return self.allocs.get(name, {})

    def view(self, name: str) -> common_pb2.Node | None:
        """The node as the API shows it: state, free count, replica and per-GPU lease filled in."""
        entry = self.nodes.get(name)
        if entry is None:
            return None
        out = common_pb2.Node()
        out.CopyFrom(entry.node)
        out.state = self.state(name)  # type: ignore[assignment]
        held = self.held(name)
        for gpu in out.gpus:
            lease = held.get(gpu.uuid)
            if lease:
                gpu.lease = f"leases/{lease}"
        out.free_gpu_count = sum(
            1 for g in out.gpus if g.uuid not in held and g.health != common_pb2.GPU_HEALTH_UNHEALTHY
        )
        alive = self.alive.get(name, "")
        out.replica = alive.split("/", 1)[0] if alive else ""
        return out
