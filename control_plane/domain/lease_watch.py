"""WatchLease as a pure state machine: what a lease's holder is told, from what happened.

Theory of operation. The machine holds the lease as last seen and turns inputs into events:

  input                                  event (at most)
  start                                  GRANTED (or ENDED for an ended lease; then done)
  lease record PROVISIONING -> ACTIVE    PROVISIONED (the access details are in its record)
  lease record with a later expire_time  RENEWED   (only a renewal moves expire_time)
  lease record gone / ENDED              -> awaiting the final record; `ended(final)`: ENDED, done
  node record: one of our GPUs UNHEALTHY GPU_UNHEALTHY, once per GPU
  node's alive key gone                  NODE_LOST, once per loss (again after it came back)
  tick(now) past expire_time - ttl/3     EXPIRING, once per expire_time
  lease record with a preempt_time       PREEMPTING, once (an interruptible lease's notice)
  on_limit: a reservation limits it      LIMITED when the limit appears or moves (not when lifted)
  resync (the index was re-listed)       the same rules applied to the re-listed state

Nothing reads a clock or a store: time comes in with each input, and the thin loop in
control_plane.app.leases feeds index changes and ticks at `next_deadline()`. Every expire_time
the machine reports is the record's: the last grant or renewal plus the ttl.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from control_plane.domain.lease_rules import DEFAULT_TTL_S, is_live
from gpufed.v1 import common_pb2, lease_pb2

Event = lease_pb2.WatchLeaseResponse
_NS = 1_000_000_000
_ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
_PROVISIONING = lease_pb2.LEASE_STATE_PROVISIONING
_UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(ns, _NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * _NS + ts.nanos


@dataclass
class LeaseWatch:
    lease: lease_pb2.Lease
    done: bool = False
    # The record is gone: the loop must look up the final record and call `ended`.
    awaiting_final: bool = False
    _warned_for: int = -1  # the expire_time (ns) an EXPIRING was sent for
    _unhealthy: set[str] = field(default_factory=set)
    _lost: set[str] = field(default_factory=set)
    # The renewal limit last told (a reservation of its GPUs starts then), None while none.
    limit_ns: int | None = None
    _preempt_told: bool = False

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(g.node for g in self.lease.gpus)

    @property
    def ttl_ns(self) -> int:
        return (self.lease.ttl.seconds or DEFAULT_TTL_S) * _NS

    @property
    def expire_ns(self) -> int:
        return _ns(self.lease.expire_time)

    def start(self, now_ns: int) -> list[Event]:
        if not is_live(self.lease):
            self.done = True
            return [Event(type=Event.EVENT_TYPE_ENDED, lease=self.lease, event_time=_ts(now_ns))]
        granted = Event(type=Event.EVENT_TYPE_GRANTED, lease=self.lease, event_time=_ts(now_ns))
        return [granted, *self._preempting(self.lease, now_ns)]

    def _preempting(self, record: lease_pb2.Lease, now_ns: int) -> list[Event]:
        if self._preempt_told or not record.HasField("preempt_time"):
            return []
        self._preempt_told = True
        return [
            Event(
                type=Event.EVENT_TYPE_PREEMPTING,
                lease=record,
                event_time=_ts(now_ns),
                message=f"preempted at {record.preempt_time.ToJsonString()}: {record.end_message}",
            )
        ]

    # -- inputs ---------------------------------------------------------------------------------

    def on_lease(self, record: lease_pb2.Lease | None, now_ns: int) -> list[Event]:
        """The lease record changed (None: deleted)."""
        if self.done or self.awaiting_final:
            return []
        if record is None or not is_live(record):
            self.awaiting_final = True
            return []
        out = []
        if self.lease.state == _PROVISIONING and record.state == _ACTIVE:
            out.append(Event(type=Event.EVENT_TYPE_PROVISIONED, lease=record, event_time=_ts(now_ns)))
        if _ns(record.expire_time) > self.expire_ns:
            out.append(Event(type=Event.EVENT_TYPE_RENEWED, lease=record, event_time=_ts(now_ns)))
        out += self._preempting(record, now_ns)
        self.lease = record
        return out

    def on_limit(self, limit_ns: int | None, now_ns: int) -> list[Event]:
        """The renewal limit from the calendars of its GPUs now (None: nothing limits it)."""
        if self.done or self.awaiting_final or limit_ns == self.limit_ns:
            return []
        self.limit_ns = limit_ns
        if limit_ns is None:
            return []  # a cancelled booking lifted it: nothing the holder must act on
        shown = lease_pb2.Lease()
        shown.CopyFrom(self.lease)
        shown.max_expire_time.CopyFrom(_ts(limit_ns))
        at = shown.max_expire_time.ToJsonString()
        return [
            Event(
                type=Event.EVENT_TYPE_LIMITED,
                lease=shown,
                event_time=_ts(now_ns),
                message=f"a reservation of its GPUs starts at {at}: renewals stop there",
            )
        ]

    def on_node(self, name: str, node: common_pb2.Node | None, now_ns: int) -> list[Event]:
        """A node record of the lease changed."""
        if self.done or node is None or name not in self.nodes:
            return []
        ours = {g.uuid for g in self.lease.gpus if g.node == name}
        out = []
        by_uuid = {g.uuid: g for g in node.gpus}
        for g in node.gpus:
            if g.uuid in ours and g.health == _UNHEALTHY and g.uuid not in self._unhealthy:
                self._unhealthy.add(g.uuid)
                # A MIG instance's health is its GPU's: so are the reasons.
                judged = by_uuid.get(g.parent_uuid, g) if g.parent_uuid else g
                reasons = list(judged.health_reasons)
                out.append(
                    Event(
                        type=Event.EVENT_TYPE_GPU_UNHEALTHY,
                        gpu_uuid=g.uuid,
                        node=name,
                        message=", ".join(r.code for r in reasons),
                        event_time=_ts(now_ns),
                        health_reasons=reasons,
                        repair_action=max((r.action for r in reasons), default=0),  # type: ignore[arg-type]
                    )
                )
        return out

    def on_alive(self, name: str, alive: bool, now_ns: int) -> list[Event]:
        """A node of the lease started (alive) or stopped streaming."""
        if self.done or name not in self.nodes:
            return []
        if alive:
            self._lost.discard(name)
            return []
        if name in self._lost:
            return []
        self._lost.add(name)
        return [
            Event(
                type=Event.EVENT_TYPE_NODE_LOST,
                node=name,
                message="the node's daemon stopped streaming",
                event_time=_ts(now_ns),
            )
        ]

    def tick(self, now_ns: int) -> list[Event]:
        if self.done or self.awaiting_final:
            return []
        expire = self.expire_ns
        if self._warned_for == expire or now_ns < expire - self.ttl_ns // 3:
            return []
        self._warned_for = expire
        left = max(0.0, (expire - now_ns) / _NS)
        return [
            Event(
                type=Event.EVENT_TYPE_EXPIRING,
                lease=self.lease,
                message=f"{left:.1f} s left",
                event_time=_ts(now_ns),
            )
        ]

    def resync(
        self,
        record: lease_pb2.Lease | None,
        nodes: Iterable[tuple[str, common_pb2.Node | None, bool]],
        now_ns: int,
    ) -> list[Event]:
        """The index was re-listed: compare what it holds now with what was last seen.
        nodes: (name, record, alive) of each node of the lease."""
        out = self.on_lease(record, now_ns)
        for name, node, alive in nodes:
            out += self.on_node(name, node, now_ns)
            out += self.on_alive(name, alive, now_ns)
        return out + self.tick(now_ns)

    def ended(self, final: lease_pb2.Lease, now_ns: int) -> list[Event]:
        """The final record (from history, or built by the caller for an expiry)."""
        if self.done:
            return []
        self.done = True
        return [Event(type=Event.EVENT_TYPE_ENDED, lease=final, event_time=_ts(now_ns))]

    # -- the loop's timer -----------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When to tick next (ns), or None when only a change can bring an event."""
        if self.done or self.awaiting_final:
            return None
        expire = self.expire_ns
        if self._warned_for == expire:
            return None
        return expire - self.ttl_ns // 3
