"""WatchLease's state machine: events follow from what happened, time from a fake clock."""

from __future__ import annotations

from google.protobuf import duration_pb2

from control_plane.domain import lease_rules
from control_plane.domain.lease_watch import LeaseWatch
from gpufed.clock import FakeClock, now_ts
from gpufed.v1 import common_pb2, lease_pb2

Ev = lease_pb2.WatchLeaseResponse
NODE = "providers/p/nodes/a"


def _lease(clock: FakeClock, ttl: int = 6) -> lease_pb2.Lease:
    lease = lease_pb2.Lease(name="leases/00000000000000aa", state=lease_pb2.LEASE_STATE_ACTIVE)
    lease.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl))
    lease.gpus.add(node=NODE, uuid="g0")
    return lease_rules.renewed(lease, now_ts(clock))  # expires one ttl from now


def _types(events: list[lease_pb2.WatchLeaseResponse]) -> list[str]:
    return [Ev.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in events]


def test_a_lease_nobody_renews_is_granted_expiring_then_ended_never_renewed() -> None:
    clock = FakeClock()
    lease = _lease(clock)
    m = LeaseWatch(lease)
    seen = m.start(clock.time_ns())
    for _ in range(12):  # 6 s in half-second ticks, as the loop would wake
        clock.advance(0.5)
        seen += m.tick(clock.time_ns())
    seen += m.on_lease(None, clock.time_ns())  # etcd deleted the record
    assert m.awaiting_final and m.next_deadline() is None
    seen += m.ended(lease_rules.expired(m.lease), clock.time_ns())
    assert _types(seen) == ["GRANTED", "EXPIRING", "ENDED"]
    assert seen[-1].lease.end_time == lease.expire_time and m.done


def test_renewed_only_when_a_renewal_moved_expire_time_and_expiring_again_after_it() -> None:
    clock = FakeClock()
    m = LeaseWatch(_lease(clock))
    seen = m.start(clock.time_ns())
    clock.advance(4.5)
    seen += m.tick(clock.time_ns())  # 1.5 s left of 6: EXPIRING
    seen += m.on_lease(m.lease, clock.time_ns())  # rewritten unchanged: nothing
    renewed = lease_rules.renewed(m.lease, now_ts(clock))
    seen += m.on_lease(renewed, clock.time_ns())
    assert seen[-1].lease.expire_time == renewed.expire_time
    assert m.next_deadline() == renewed.expire_time.ToNanoseconds() - 2_000_000_000
    clock.advance(4.5)
    seen += m.tick(clock.time_ns()) + m.tick(clock.time_ns())
    assert _types(seen) == ["GRANTED", "EXPIRING", "RENEWED", "EXPIRING"]


def test_an_unhealthy_gpu_and_a_lost_node_are_told_once_each() -> None:
    clock = FakeClock()
    m = LeaseWatch(_lease(clock))
    sick = common_pb2.Node()
    g = sick.gpus.add(uuid="g0", health=common_pb2.GPU_HEALTH_UNHEALTHY)
    g.health_reasons.add(code="XID_79")
    sick.gpus.add(uuid="other", health=common_pb2.GPU_HEALTH_UNHEALTHY)
    events = m.on_node(NODE, sick, 1) + m.on_node(NODE, sick, 2)
    events += m.on_alive(NODE, False, 3) + m.on_alive(NODE, False, 4)
    events += m.on_alive("providers/p/nodes/elsewhere", False, 5)
    events += m.on_alive(NODE, True, 6) + m.on_alive(NODE, False, 7)
    assert _types(events) == ["GPU_UNHEALTHY", "NODE_LOST", "NODE_LOST"]
    assert events[0].gpu_uuid == "g0" and events[0].message == "XID_79"


def test_a_resync_compares_the_relisted_state_with_what_was_seen() -> None:
    clock = FakeClock()
    m = LeaseWatch(_lease(clock))
    renewed = lease_rules.renewed(m.lease, now_ts(clock))
    clock.advance(1)
    renewed = lease_rules.renewed(m.lease, now_ts(clock))
    assert _types(m.resync(renewed, [(NODE, common_pb2.Node(), False)], clock.time_ns())) == [
        "RENEWED",
        "NODE_LOST",
    ]
    assert m.resync(None, [], clock.time_ns()) == [] and m.awaiting_final


def test_an_ended_lease_is_ended_at_once() -> None:
    lease = lease_pb2.Lease(name="leases/00000000000000aa", state=lease_pb2.LEASE_STATE_ENDED)
    m = LeaseWatch(lease)
    assert _types(m.start(0)) == ["ENDED"] and m.done and m.next_deadline() is None


def test_provisioned_is_told_once_when_a_provisioning_lease_becomes_active() -> None:
    clock = FakeClock()
    lease = _lease(clock, ttl=60)
    lease.state = lease_pb2.LEASE_STATE_PROVISIONING
    m = LeaseWatch(lease)
    seen = m.start(clock.time_ns())
    active = lease_rules.provisioned(lease, lease_pb2.AccessDetails(node=NODE, ssh="ssh u@a"), now_ts(clock))
    seen += m.on_lease(active, clock.time_ns())
    seen += m.on_lease(active, clock.time_ns())  # the same record again: nothing new
    assert _types(seen) == ["GRANTED", "PROVISIONED"]
    assert seen[-1].lease.access_details[0].ssh == "ssh u@a"


def test_a_booking_of_its_gpus_is_told_once_per_limit_and_a_lifted_limit_is_not() -> None:
    clock = FakeClock()
    m = LeaseWatch(_lease(clock))
    m.start(clock.time_ns())
    start = clock.time_ns() + 30 * 1_000_000_000
    told = m.on_limit(start, clock.time_ns())
    assert _types(told) == ["LIMITED"] and told[0].lease.max_expire_time.ToNanoseconds() == start
    assert m.on_limit(start, clock.time_ns()) == []  # the same limit again: nothing new
    assert _types(m.on_limit(start - 10 * 1_000_000_000, clock.time_ns())) == ["LIMITED"]  # it moved
    assert m.on_limit(None, clock.time_ns()) == []  # cancelled: nothing the holder must do


def test_an_interruptible_lease_is_told_of_its_preemption_once() -> None:
    clock = FakeClock()
    lease = _lease(clock)
    lease.interruptible = True
    m = LeaseWatch(lease)
    assert _types(m.start(clock.time_ns())) == ["GRANTED"]
    noticed = lease_pb2.Lease()
    noticed.CopyFrom(lease)
    noticed.preempt_time.FromNanoseconds(clock.time_ns() + 120 * 1_000_000_000)
    noticed.end_message = "reservations/00000000000000bb starts on its GPUs"
    told = m.on_lease(noticed, clock.time_ns())
    assert _types(told) == ["PREEMPTING"] and "reservations/00000000000000bb" in told[0].message
    assert m.on_lease(noticed, clock.time_ns()) == []
    # A watch opened after the notice says so right after GRANTED.
    assert _types(LeaseWatch(noticed).start(clock.time_ns())) == ["GRANTED", "PREEMPTING"]
