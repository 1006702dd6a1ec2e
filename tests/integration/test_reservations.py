"""Advance reservations against real etcd: a booked window holds concrete GPUs at a frozen price,
no two windows of one GPU overlap, a lease on a reserved GPU stops at the window's start, and
the window becomes a lease at its start and ends at its end."""

from __future__ import annotations

import time

import pytest

from gpufed.client import Client, GpufedError, NoCapacity, NotFound
from gpufed.v1 import lease_pb2, reservation_pb2
from tests.harness import ADMIN_TOKEN, ReplicaThread, one_node, reservations_open, wait_until

pytestmark = pytest.mark.integration
R = reservation_pb2


def _open(c: Client) -> None:
    wait_until(lambda: reservations_open(c), timeout=20)


def test_a_booking_holds_concrete_gpus_at_a_frozen_price_and_windows_never_overlap(
    replica: ReplicaThread,
) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        _open(c)
        start = time.time() + 600
        first = c.create_reservation(3, start, 3600)
        assert first.state == R.RESERVATION_STATE_SCHEDULED
        assert len(first.gpus) == 3 and len({g.uuid for g in first.gpus}) == 3
        assert first.price_per_hour == pytest.approx(sum(g.price_per_gpu_hour for g in first.gpus))
        assert first.end_time.seconds - first.start_time.seconds == 3600
        # Overlapping windows: only the fourth GPU is left; after the first window, all four.
        with pytest.raises(NoCapacity) as e:
            c.create_reservation(2, start + 1800, 3600)
        assert e.value.reason == "NO_MATCHING_CAPACITY"
        other = c.create_reservation(1, start + 1800, 3600)
        assert {g.uuid for g in other.gpus}.isdisjoint({g.uuid for g in first.gpus})
        later = c.create_reservation(4, start + 5400, 600)  # touches the others' ends, no overlap
        assert len(later.gpus) == 4 and later.state == R.RESERVATION_STATE_SCHEDULED
        # A cancelled window frees its GPUs in the calendar at once.
        ended = c.cancel_reservation(first.name)
        assert ended.state == R.RESERVATION_STATE_ENDED
        assert ended.end_reason == R.RESERVATION_END_REASON_CANCELLED
        assert c.cancel_reservation(first.name).ended_time == ended.ended_time  # idempotent
        again = c.create_reservation(3, start, 1800)
        assert len(again.gpus) == 3
        listed = {r.name: r.state for r in c.list_reservations()}
        assert listed[first.name] == R.RESERVATION_STATE_ENDED
        assert listed[again.name] == R.RESERVATION_STATE_SCHEDULED
        node = first.gpus[0].node
        assert {r.name for r in c.list_reservations(state=R.RESERVATION_STATE_SCHEDULED, node=node)} >= {
            again.name
        }
        for r in (other, later, again):
            c.cancel_reservation(r.name)


def test_another_tenants_reservation_is_not_found(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        _open(c)
        mine = c.create_reservation(1, time.time() + 600, 600)
        with Client(replica.address, ADMIN_TOKEN) as admin:
            stranger = admin.create_token("tenant", "stranger").secret
            assert admin.get_reservation(mine.name).tenant == mine.tenant
        with Client(replica.address, stranger) as s:
            with pytest.raises(NotFound):
                s.get_reservation(mine.name)
            with pytest.raises(NotFound):
                s.cancel_reservation(mine.name)
            assert s.list_reservations() == []
        c.cancel_reservation(mine.name)


def test_bad_reservation_requests_are_invalid_argument_with_a_reason(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        _open(c)
        cases = [
            (dict(gpu_count=1, start=time.time() - 3600, duration_s=60), "INVALID_START_TIME"),
            (dict(gpu_count=1, start=time.time() + 200 * 86400, duration_s=60), "INVALID_START_TIME"),
            (dict(gpu_count=1, start=time.time() + 60, duration_s=5), "INVALID_DURATION"),
            (dict(gpu_count=1, start=time.time() + 60, duration_s=40 * 86400), "INVALID_DURATION"),
            (
                dict(gpu_count=1, start=time.time() + 60, duration_s=60, mig_profile="1g.10gb"),
                "MIG_NOT_RESERVABLE",
            ),
            (dict(gpu_count=0, start=time.time() + 60, duration_s=60), "INVALID_GPU_COUNT"),
        ]
        for kwargs, reason in cases:
            with pytest.raises(GpufedError) as e:
                c.create_reservation(**kwargs)  # type: ignore[arg-type]
            assert e.value.reason == reason, kwargs
        with pytest.raises(GpufedError) as e:
            c.get_reservation("reservations/nope")
        assert e.value.reason == "INVALID_RESERVATION_NAME"
        assert c.list_reservations(state=R.RESERVATION_STATE_SCHEDULED) == []  # nothing was booked


def test_a_lease_on_reserved_gpus_stops_at_the_start_and_the_window_becomes_a_lease(
    replica: ReplicaThread,
) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        _open(c)
        held = c.create_lease(4, ttl_s=5)
        start = time.time() + 6.0
        booked = c.create_reservation(2, start, 10)  # the lease expires before the start: bookable
        renewed = c.renew_lease(held.name)
        assert renewed.max_expire_time == booked.start_time
        assert renewed.expire_time.ToNanoseconds() <= booked.start_time.ToNanoseconds()
        assert c.get_lease(held.name).max_expire_time == booked.start_time
        # The limit holds however often it is renewed; at the start the lease ends RESERVED.
        while time.time() < start - 0.5:
            assert c.renew_lease(held.name).expire_time.ToNanoseconds() <= booked.start_time.ToNanoseconds()
            time.sleep(0.5)
        wait_until(lambda: c.get_reservation(booked.name).state == R.RESERVATION_STATE_ACTIVE, timeout=5)
        started = c.get_reservation(booked.name)
        window = c.get_lease(started.lease)
        assert window.state == lease_pb2.LEASE_STATE_ACTIVE and window.reservation == booked.name
        assert window.expire_time == booked.end_time
        assert [g.uuid for g in window.gpus] == [g.uuid for g in booked.gpus]
        assert window.price_per_hour == booked.price_per_hour
        delay = window.create_time.ToNanoseconds() - booked.start_time.ToNanoseconds()
        assert 0 <= delay < 1_000_000_000, "the window's lease within 1 s of its start"
        ended = c.get_lease(held.name)
        if set(g.uuid for g in ended.gpus) & {g.uuid for g in booked.gpus}:
            assert ended.state == lease_pb2.LEASE_STATE_ENDED
            assert ended.end_reason in (
                lease_pb2.LEASE_END_REASON_RESERVED,
                lease_pb2.LEASE_END_REASON_EXPIRED,
            )
        # Renewing the window's lease changes nothing; at the end it ends WINDOW_ENDED.
        assert c.renew_lease(window.name).expire_time == booked.end_time
        wait_until(lambda: c.get_reservation(booked.name).state == R.RESERVATION_STATE_ENDED, timeout=15)
        final = c.get_lease(window.name)
        assert final.end_reason == lease_pb2.LEASE_END_REASON_WINDOW_ENDED
        done = c.get_reservation(booked.name)
        assert done.end_reason == R.RESERVATION_END_REASON_COMPLETED
        with Client(replica.address, ADMIN_TOKEN) as admin:
            wait_until(lambda: any(r.lease == window.name for r in admin.usage_records()), timeout=5)
            record = next(r for r in admin.usage_records() if r.lease == window.name)
        assert record.quoted_cost == pytest.approx(
            booked.price_per_hour * record.gpu_seconds / len(booked.gpus) / 3600, abs=1e-6
        )  # the booked price: usage records keep six decimals


def test_a_watched_lease_is_told_when_a_booking_limits_it(replica: ReplicaThread) -> None:
    import threading

    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        _open(c)
        held = c.create_lease(4, ttl_s=5)
        events: list[lease_pb2.WatchLeaseResponse] = []
        W = lease_pb2.WatchLeaseResponse

        def watch() -> None:
            for ev in c.watch_lease(held.name):
                events.append(ev)
                if ev.type in (W.EVENT_TYPE_LIMITED, W.EVENT_TYPE_ENDED):
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        wait_until(lambda: bool(events), timeout=5)
        booked = c.create_reservation(1, time.time() + 60, 60)
        wait_until(lambda: events[-1].type == W.EVENT_TYPE_LIMITED, timeout=5)
        assert events[-1].lease.max_expire_time == booked.start_time
        c.cancel_reservation(booked.name)
        assert not c.get_lease(held.name).HasField("max_expire_time")  # the limit went with it
        c.release_lease(held.name)
        t.join(5)


def test_a_tenant_books_no_more_gpu_hours_ahead_than_its_quota(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        _open(c)
        with Client(replica.address, ADMIN_TOKEN) as admin:
            admin.set_quota("quotas/tenants/dev", max_reserved_gpu_hours=3)
        wait_until(lambda: c.get_quota("quotas/tenants/dev").quota.tenant.max_reserved_gpu_hours == 3)
        start = time.time() + 3600
        first = c.create_reservation(1, start, 3600)  # 1 GPU-hour
        with pytest.raises(GpufedError) as e:
            c.create_reservation(3, start + 7200, 3600)  # 3 more: 4 > 3
        assert e.value.reason == "QUOTA_RESERVED_GPU_HOURS"
        second = c.create_reservation(2, start + 7200, 3600)  # 1 + 2 = 3: exactly the quota
        c.cancel_reservation(first.name)  # an ended booking counts no more
        third = c.create_reservation(1, start, 1800)
        for r in (second, third):
            c.cancel_reservation(r.name)
