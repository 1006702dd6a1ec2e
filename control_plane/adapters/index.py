"""The replica's in-memory view of the federation, fed by etcd events (control_plane.adapters.watcher).

State only: `apply` takes one key change at a time in revision order; nothing here does I/O.
Node records, liveness and allocations arrive under different keys in any order, so they are
kept apart and joined on read. Subscribers get a typed Change for each applied event, and one
RESYNC after a (re-)list replaced the whole view: whatever a subscriber derived from earlier
changes it must derive again from the index, since changes inside the gap were never seen.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError

from control_plane.adapters.keyspace import KeyKind, Keyspace
from control_plane.domain import capacity as capacity_rules
from control_plane.domain import mig
from control_plane.domain.calendar import Slot, slots_by_gpu
from control_plane.domain.geo import unit_vector
from control_plane.domain.inventory import GpuGroup, NodeEntry, NodeSummary
from gpufed.v1 import common_pb2, lease_pb2, reservation_pb2

_UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY
# Plain ints: attribute access on the enum wrapper goes through a Python __getattr__, and state()
# runs on every allocation change.
_UNSPECIFIED = common_pb2.NODE_STATE_UNSPECIFIED
_READY = common_pb2.NODE_STATE_READY
_OFFLINE = common_pb2.NODE_STATE_OFFLINE
MAX_VANISHED = 10_000
_CORDONED = common_pb2.NODE_STATE_CORDONED
_DRAINING = common_pb2.NODE_STATE_DRAINING


class ChangeKind(enum.Enum):
    NODE = "node"
    ALIVE = "alive"
    ALLOC = "alloc"
    LEASE = "lease"
    TOKEN = "token"
    REPLICA = "replica"
    LEADER = "leader"
    QUOTA = "quota"
    BURST = "burst"
    MEMBER = "member"
    SCHEMA = "schema"
    QUEUE = "queue"
    CALENDAR = "calendar"
    RESERVATION = "reservation"
    RESYNC = "resync"  # the whole view was replaced by a (re-)list


_CHANGE_OF = {k: ChangeKind[k.name] for k in KeyKind}
# Members as module constants: attribute access on an Enum class costs ~0.17 us in Python 3.11,
# and apply() runs for every event of the watch.
_NODE, _ALIVE, _ALLOC, _LEASE = KeyKind.NODE, KeyKind.ALIVE, KeyKind.ALLOC, KeyKind.LEASE
_REPLICA, _LEADER, _QUOTA, _BURST = KeyKind.REPLICA, KeyKind.LEADER, KeyKind.QUOTA, KeyKind.BURST
_MEMBER, _SCHEMA, _QUEUE = KeyKind.MEMBER, KeyKind.SCHEMA, KeyKind.QUEUE
_CALENDAR, _RESERVATION = KeyKind.CALENDAR, KeyKind.RESERVATION
_NO_SLOTS: tuple[Slot, ...] = ()


class KeyValueLike(Protocol):
    """What `load` needs of each listed key (store.KeyValue has it)."""

    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes: ...
    @property
    def mod_revision(self) -> int: ...
    @property
    def create_revision(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Change:
    """One applied key change. name: the node's resource name (NODE, ALIVE, ALLOC), the lease,
    token or replica id, "leader"; "" for RESYNC."""

    kind: ChangeKind
    name: str
    value: bytes | None
    revision: int
    # kind LEASE: the parsed record as the index holds it (the new one, or the one that went).
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
    # Lease records the watch saw deleted, newest last (bounded): an expired lease's record is
    # gone before the leader writes its history, and GetLease must not say NOT_FOUND meanwhile.
    vanished: OrderedDict[str, lease_pb2.Lease] = field(default_factory=OrderedDict)
    leases: dict[str, lease_pb2.Lease] = field(default_factory=dict)
    lease_revision: dict[str, int] = field(default_factory=dict)
    # tenant -> lease id -> GPUs, of active leases: what the tenant's quota counts
    tenant_leases: dict[str, dict[str, int]] = field(default_factory=dict)
    # "tenants/{name}" | "providers/{name}" -> the overrides of its quota (JSON object)
    quotas: dict[str, bytes] = field(default_factory=dict)
    # tenant -> its burst policy (JSON)
    burst: dict[str, bytes] = field(default_factory=dict)
    # provider -> registered nodes (its node quota)
    node_counts: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)
    # replica id -> its member record (JSON: release, schema understood); control_plane.domain.schema
    members: dict[str, bytes] = field(default_factory=dict)
    # the schema key's value (None: absent, schema 1)
    schema: bytes | None = None
    # lease id -> a request waiting for capacity, and its record's mod revision
    queued: dict[str, tuple[lease_pb2.QueuedLeaseRecord, int]] = field(default_factory=dict)
    # tenant -> its queued lease ids (its max_queued quota)
    tenant_queued: dict[str, set[str]] = field(default_factory=dict)
    # node name -> its calendar and the record's mod revision (absent: no reservation on it)
    calendars: dict[str, tuple[reservation_pb2.NodeCalendar, int]] = field(default_factory=dict)
    # whole GPU uuid -> its reservations' windows, by start (control_plane.domain.calendar)
    gpu_slots: dict[str, list[Slot]] = field(default_factory=dict)
    # reservation id -> the booked or active record and its mod revision
    reservations: dict[str, tuple[reservation_pb2.Reservation, int]] = field(default_factory=dict)
    tenant_reservations: dict[str, set[str]] = field(default_factory=dict)
    leader: str = ""
    revision: int = 0
    # node names ordered by (price, name), overall and per country, for searches that stop early
    by_price: list[tuple[float, str]] = field(default_factory=list)
    by_country: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    summaries: dict[str, NodeSummary] = field(default_factory=dict)
    # Pool ("" the federation) -> capacity tally over READY nodes (control_plane.domain.capacity),
    # and each node's share in it, so a change replaces just that share.
    capacity: dict[str, dict[capacity_rules.Key, list[int]]] = field(default_factory=dict)
    capacity_of: dict[str, tuple[str, capacity_rules.Share]] = field(default_factory=dict)
    # nodes whose record says DRAINING: the leader's drain sweep looks at these, not at every node
    draining: set[str] = field(default_factory=set)
    # leases whose record says PROVISIONING: the leader's provisioning sweep looks at these only
    provisioning: set[str] = field(default_factory=set)
    # interruptible leases told they will be preempted (a preempt_time): the leader ends these
    preempting: set[str] = field(default_factory=set)
    # tenant -> the nodes of its private pool
    pools: dict[str, set[str]] = field(default_factory=dict)
    # GPU model name -> nodes that have it: a search for a model nobody has answers at once
    # instead of walking every node.
    models: dict[str, int] = field(default_factory=dict)
    # "region:R", "label:K=V" -> nodes with it: the same for those filters (node_counts for
    # providers).
    facets: dict[str, int] = field(default_factory=dict)
    # Being built by a listing (Watcher.list): price lists are appended to and sorted by adopt().
    bulk: bool = False
    _subscribers: list[Callable[[Change], None]] = field(default_factory=list)
    _revision_waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    # -- feeding --------------------------------------------------------------------------------

    def load(self, kvs: Iterable[KeyValueLike], revision: int) -> None:
        """Replace the whole view with a listing at `revision`, then tell subscribers RESYNC
        (not one change per key: what was deleted in a gap would never be told)."""
        fresh = Inventory(self.keys, bulk=True)
        for kv in kvs:
            fresh.apply(kv.key, kv.value, kv.mod_revision, kv.create_revision, notify=False)
        self.adopt(fresh, revision)

    def adopt(self, fresh: Inventory, revision: int) -> None:
        """Take over a listing built in `fresh` (load(); Watcher.list builds one page by page),
        keeping this index's subscribers and waiters; then RESYNC."""
        if fresh.bulk:
            fresh.by_price.sort()
            for ordered in fresh.by_country.values():
                ordered.sort()
            fresh.bulk = False
            for name in fresh.nodes:  # once per node, not once per key of the listing
                fresh._tally(name, fresh.nodes[name], fresh.allocs.get(name, {}))
        for f in dataclasses.fields(self):
            if f.name not in ("keys", "_subscribers", "_revision_waiters"):
                setattr(self, f.name, getattr(fresh, f.name))
        self.revision = 0  # let advance() wake waiters even if the revision did not move
        self.advance(revision)
        self._notify(Change(ChangeKind.RESYNC, "", None, revision))

    def apply(
        self,
        key: bytes,
        value: bytes | None,
        mod_revision: int,
        create_revision: int = 0,
        notify: bool = True,
    ) -> Change | None:
        parsed = self.keys.parse(key)
        if parsed is None:
            return None
        kind, name = parsed.kind, parsed.name
        lease: lease_pb2.Lease | None = None
        if kind is _NODE:
            self._set_node(name, value, mod_revision)
            self._summarize(name)
        elif kind is _ALIVE:
            if value is None:
                self.alive.pop(name, None)
                self.alive_revision.pop(name, None)
            else:
                self.alive[name] = value.decode()
                self.alive_revision[name] = mod_revision
            self._summarize(name)
        elif kind is _ALLOC:
            if value is None:
                held = self.allocs.get(name)
                if held is not None:
                    held.pop(parsed.gpu, None)
                    if not held:
                        del self.allocs[name]
            else:
                self.allocs.setdefault(name, {})[parsed.gpu] = value.decode()
            self._summarize(name)
        elif kind is _LEASE:
            if value is None:
                lease = self.leases.pop(name, None)
                self.lease_revision.pop(name, None)
                if lease is not None:
                    self.vanished[name] = lease
                    while len(self.vanished) > MAX_VANISHED:
                        self.vanished.popitem(last=False)
                self.provisioning.discard(name)
                self.preempting.discard(name)
                if lease is not None:
                    holds = self.tenant_leases.get(lease.tenant)
                    if holds is not None:
                        holds.pop(name, None)
                        if not holds:
                            del self.tenant_leases[lease.tenant]
            else:
                lease = lease_pb2.Lease.FromString(value)
                # The grant Txn's revision is the fencing token: the key's create revision.
                if not lease.fencing_token:
                    lease.fencing_token = create_revision or mod_revision
                self.leases[name] = lease
                self.lease_revision[name] = mod_revision
                if lease.state == lease_pb2.LEASE_STATE_PROVISIONING:
                    self.provisioning.add(name)
                else:
                    self.provisioning.discard(name)
                if lease.HasField("preempt_time"):
                    self.preempting.add(name)
                self.tenant_leases.setdefault(lease.tenant, {})[name] = len(lease.gpus)
        elif kind is _REPLICA:
            if value is None:
                self.replicas.pop(name, None)
            else:
                self.replicas[name] = value.decode()
        elif kind is _LEADER:
            self.leader = value.decode() if value is not None else ""
        elif kind is _QUOTA:
            if value is None:
                self.quotas.pop(name, None)
            else:
                self.quotas[name] = value
        elif kind is _BURST:
            if value is None:
                self.burst.pop(name, None)
            else:
                self.burst[name] = value
        elif kind is _MEMBER:
            if value is None:
                self.members.pop(name, None)
            else:
                self.members[name] = value
        elif kind is _SCHEMA:
            self.schema = value
        elif kind is _QUEUE:
            self._set_queued(name, value, mod_revision)
        elif kind is _CALENDAR:
            self._set_calendar(name, value, mod_revision)
        elif kind is _RESERVATION:
            self._set_reservation(name, value, mod_revision)
        change = Change(_CHANGE_OF[kind], name, value, mod_revision, lease)
        if notify:
            self._notify(change)
        return change

    def _set_queued(self, lease_id: str, value: bytes | None, revision: int) -> None:
        old = self.queued.pop(lease_id, None)
        if old is not None:
            mine = self.tenant_queued.get(old[0].lease.tenant)
            if mine is not None:
                mine.discard(lease_id)
                if not mine:
                    del self.tenant_queued[old[0].lease.tenant]
        if value is None:
            return
        try:
            record = lease_pb2.QueuedLeaseRecord.FromString(value)
        except DecodeError:
            return  # not written by a gpufed replica: nothing to schedule
        self.queued[lease_id] = (record, revision)
        self.tenant_queued.setdefault(record.lease.tenant, set()).add(lease_id)

    def _set_calendar(self, node: str, value: bytes | None, revision: int) -> None:
        old = self.calendars.pop(node, None)
        if old is not None:
            for uuid in {u for e in old[0].entries for u in e.gpu_uuids}:
                self.gpu_slots.pop(uuid, None)
        if value is None:
            return
        try:
            calendar = reservation_pb2.NodeCalendar.FromString(value)
        except DecodeError:
            return  # not written by a gpufed replica
        self.calendars[node] = (calendar, revision)
        self.gpu_slots.update(slots_by_gpu(calendar))

    def _set_reservation(self, reservation_id: str, value: bytes | None, revision: int) -> None:
        old = self.reservations.pop(reservation_id, None)
        if old is not None:
            mine = self.tenant_reservations.get(old[0].tenant)
            if mine is not None:
                mine.discard(reservation_id)
                if not mine:
                    del self.tenant_reservations[old[0].tenant]
        if value is None:
            return
        try:
            record = reservation_pb2.Reservation.FromString(value)
        except DecodeError:
            return
        self.reservations[reservation_id] = (record, revision)
        self.tenant_reservations.setdefault(record.tenant, set()).add(reservation_id)

    def slots(self, uuid: str) -> list[Slot] | tuple[Slot, ...]:
        """A whole GPU's reservation windows, by start."""
        return self.gpu_slots.get(uuid, _NO_SLOTS)

    def calendar_revision(self, node: str) -> int:
        """The node's calendar record's mod revision, 0 while it has none."""
        found = self.calendars.get(node)
        return found[1] if found is not None else 0

    def holders(self, node: str, uuid: str) -> set[str]:
        """The leases holding a whole GPU or any of its MIG instances."""
        held = self.allocs.get(node)
        if not held:
            return set()
        out = {held[uuid]} if uuid in held else set()
        entry = self.nodes.get(node)
        if entry is not None and len(held) > len(out):
            out.update(held[g.uuid] for g in entry.node.gpus if g.parent_uuid == uuid and g.uuid in held)
        return out

    def held_until(self, node: str, uuid: str) -> int:
        """The latest expiry (ns) of the leases on a whole GPU or its instances that a booking
        must not cut short: 0 for none. Interruptible leases do not count (they are preempted);
        an allocation whose record the index lacks counts as held for ever."""
        out = 0
        for lease_id in self.holders(node, uuid):
            lease = self.leases.get(lease_id)
            if lease is None:
                return 1 << 62
            if not lease.interruptible:
                out = max(out, lease.expire_time.seconds * 1_000_000_000 + lease.expire_time.nanos)
        return out

    def _notify(self, change: Change) -> None:
        for fn in list(self._subscribers):
            fn(change)

    def _set_node(self, name: str, value: bytes | None, mod_revision: int) -> None:
        old = self.nodes.get(name)
        if old is not None:
            item = (old.node.price_per_gpu_hour, name)
            for ordered in (self.by_price, self.by_country.get(old.node.location.country_code, [])):
                i = bisect.bisect_left(ordered, item)
                if i < len(ordered) and ordered[i] == item:
                    del ordered[i]
        if old is not None and old.node.pool_tenant:
            self._pool(old.node.pool_tenant, name, add=False)
        if old is not None:
            self._count_facets(old, -1)
        if value is None:
            if self.nodes.pop(name, None) is not None:
                self._count_node(old.node.provider if old else "", -1)
            self.draining.discard(name)
            return
        node = common_pb2.Node.FromString(value)
        if node.pool_tenant:
            self._pool(node.pool_tenant, name, add=True)
        if old is None:
            self._count_node(node.provider, 1)
        if node.state == _DRAINING:
            self.draining.add(name)
        else:
            self.draining.discard(name)
        # In NVML index order, as registration writes them (field reads are the cost here: at
        # 100,000 nodes this line is a third of a cold start).
        gpus = [(g.model, int(g.health), g.memory_total_bytes, g) for g in node.gpus]
        entry = NodeEntry(
            node, mod_revision, gpus, unit_vector(node.location.latitude, node.location.longitude)
        )
        self.nodes[name] = entry
        self._count_facets(entry, 1)
        item = (node.price_per_gpu_hour, name)
        by_country = self.by_country.setdefault(node.location.country_code, [])
        if self.bulk:  # a listing: sorted once at the end (adopt)
            self.by_price.append(item)
            by_country.append(item)
        else:
            bisect.insort(self.by_price, item)
            bisect.insort(by_country, item)

    def _count_facets(self, entry: NodeEntry, delta: int) -> None:
        node = entry.node
        for model in {t[0] for t in entry.gpus}:
            _bump(self.models, model, delta)
        _bump(self.facets, f"region:{node.location.region}", delta)
        for k, v in node.labels.items():
            _bump(self.facets, f"label:{k}={v}", delta)

    def _pool(self, tenant: str, name: str, add: bool) -> None:
        members = self.pools.setdefault(tenant, set())
        if add:
            members.add(name)
        else:
            members.discard(name)
            if not members:
                del self.pools[tenant]

    def _count_node(self, provider: str, delta: int) -> None:
        _bump(self.node_counts, provider, delta)

    def _tally(self, name: str, entry: NodeEntry | None, held: dict[str, str]) -> None:
        before = self.capacity_of.pop(name, None)
        if before is not None:
            tally = self.capacity.get(before[0], {})
            capacity_rules.apply(tally, before[1], -1)
            if not tally:
                self.capacity.pop(before[0], None)
        if entry is None or not self.is_schedulable(name):
            return
        pool = entry.node.pool_tenant
        share = capacity_rules.node_share(entry, held)
        capacity_rules.apply(self.capacity.setdefault(pool, {}), share, 1)
        self.capacity_of[name] = (pool, share)

    def _summarize(self, name: str) -> None:
        entry = self.nodes.get(name)
        if not self.bulk:  # a listing tallies each node once, when it is adopted
            self._tally(name, entry, self.allocs.get(name, {}))
        if entry is None:
            self.summaries.pop(name, None)
            return
        held = self.allocs.get(name, {})
        parents_held = mig.held_parents(entry.node.gpus, held) if held else ()
        groups: dict[tuple[str, int, str], GpuGroup] = {}
        for model, health, memory, gpu in entry.gpus:
            if health == _UNHEALTHY or not mig.is_free(gpu, held, parents_held):
                continue
            key = (model, health, gpu.mig_profile)
            g = groups.get(key)
            if g is None:
                g = groups[key] = GpuGroup(model, health, memory, [], gpu.mig_profile)
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

    def tenant_holds(self, tenant: str) -> tuple[int, int]:
        """(active leases, GPUs they hold) of one tenant."""
        held = self.tenant_leases.get(tenant)
        return (len(held), sum(held.values())) if held else (0, 0)

    def provider_nodes(self, provider: str) -> int:
        return self.node_counts.get(provider, 0)

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


def _bump(counts: dict[str, int], name: str, delta: int) -> None:
    """Add `delta` to a count, dropping it at zero (the counts say "none" by absence)."""
    n = counts.get(name, 0) + delta
    if n > 0:
        counts[name] = n
    else:
        counts.pop(name, None)
