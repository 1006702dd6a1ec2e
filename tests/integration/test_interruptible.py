"""Interruptible capacity against real etcd: cheaper leases on GPUs free now, including GPUs
booked later, preempted with notice when a reservation starts or an on-demand request needs
them; never limited by a reservation, never preempting anything themselves."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from gpufed.client import Client, GpufedError, NoCapacity
from gpufed.v1 import lease_pb2, reservation_pb2
from node_daemon.fake_nvml import FakeNvml
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    reservations_open,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration
W = lease_pb2.WatchLeaseResponse
NOTICE_S = 2.0


@pytest.fixture
def spot(etcd: EtcdCluster) -> Iterator[tuple[ReplicaThread, str]]:
    """A replica with a 2 s preemption notice and one 4-GPU node at 2.00 (0.50 interruptible)."""
    replica = ReplicaThread(
        replica_config(etcd.endpoints, unique_prefix(), preemption_notice_s=NOTICE_S)
    ).start()
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", "dev").secret
        provider = admin.create_token("provider", "neo").secret
    cfg = daemon_config([replica.address], provider, "neo", "n1", interruptible_price_per_gpu_hour=0.5)
    daemon = DaemonThread(cfg, FakeNvml("l40s-4")).start()
    with Client(replica.address, tenant) as c:
        wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 4, timeout=20)
        wait_until(lambda: reservations_open(c), timeout=20)
    yield replica, tenant
    daemon.stop()
    replica.stop()


def _watch(c: Client, name: str) -> tuple[list[lease_pb2.WatchLeaseResponse], threading.Thread]:
    events: list[lease_pb2.WatchLeaseResponse] = []

    def run() -> None:
        for ev in c.watch_lease(name):
            events.append(ev)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until(lambda: bool(events), timeout=5)
    return events, t


def test_an_interruptible_lease_runs_until_a_reservation_starts_and_is_told_ahead(
    spot: tuple[ReplicaThread, str],
) -> None:
    replica, tenant = spot
    with Client(replica.address, tenant) as c:
        start = time.time() + 6
        booked = c.create_reservation(2, start, 10)
        spare = c.create_lease(4, ttl_s=60, interruptible=True)  # the reserved GPUs too: free now
        assert spare.interruptible and {g.price_per_gpu_hour for g in spare.gpus} == {0.5}
        assert not spare.HasField("max_expire_time")  # not limited: preempted instead
        assert spare.expire_time.ToNanoseconds() > booked.start_time.ToNanoseconds()
        events, t = _watch(c, spare.name)
        while time.time() < start + 3:
            if events and events[-1].type == W.EVENT_TYPE_ENDED:
                break
            c.renew_lease(spare.name)
            time.sleep(0.5)
        kinds = [e.type for e in events]
        assert W.EVENT_TYPE_PREEMPTING in kinds and kinds[-1] == W.EVENT_TYPE_ENDED
        told = events[kinds.index(W.EVENT_TYPE_PREEMPTING)]
        assert told.lease.preempt_time == booked.start_time
        ahead = booked.start_time.ToNanoseconds() - told.event_time.ToNanoseconds()
        assert ahead >= (NOTICE_S - 0.5) * 1e9, "notified about the notice ahead"
        final = c.get_lease(spare.name)
        assert final.end_reason == lease_pb2.LEASE_END_REASON_PREEMPTED
        assert final.end_time.ToNanoseconds() - booked.start_time.ToNanoseconds() < 1e9
        started = c.get_reservation(booked.name)
        assert started.state == reservation_pb2.RESERVATION_STATE_ACTIVE
        c.cancel_reservation(booked.name)
        t.join(5)


def test_an_on_demand_request_that_can_wait_preempts_interruptible_leases_after_the_notice(
    spot: tuple[ReplicaThread, str],
) -> None:
    replica, tenant = spot
    with Client(replica.address, tenant) as c:
        spare = c.create_lease(4, ttl_s=60, interruptible=True)
        events, t = _watch(c, spare.name)
        # An impatient request preempts nothing: it is refused and the interruptible lease runs.
        with pytest.raises(NoCapacity):
            c.create_lease(2)
        assert not c.get_lease(spare.name).HasField("preempt_time")
        # Another interruptible request never preempts its own kind either.
        with pytest.raises(NoCapacity):
            c.create_lease(1, interruptible=True)
        t0 = time.time()
        waiting = c.create_lease(2, max_wait_s=30)
        assert waiting.state == lease_pb2.LEASE_STATE_QUEUED
        noticed = c.get_lease(spare.name)
        assert noticed.preempt_time.ToNanoseconds() >= (t0 + NOTICE_S - 0.5) * 1e9
        wait_until(lambda: c.get_lease(waiting.name).state == lease_pb2.LEASE_STATE_ACTIVE, timeout=10)
        assert time.time() - t0 >= NOTICE_S - 0.5  # the whole notice first
        final = c.get_lease(spare.name)
        assert final.end_reason == lease_pb2.LEASE_END_REASON_PREEMPTED
        granted = c.get_lease(waiting.name)
        assert {g.price_per_gpu_hour for g in granted.gpus} == {2.0}  # on-demand price
        kinds = [e.type for e in events]
        assert W.EVENT_TYPE_PREEMPTING in kinds
        c.release_lease(granted.name)
        t.join(5)


def test_interruptible_requests_cannot_wait(spot: tuple[ReplicaThread, str]) -> None:
    replica, tenant = spot
    with Client(replica.address, tenant) as c, pytest.raises(GpufedError) as e:
        c.create_lease(1, interruptible=True, max_wait_s=60)
    assert e.value.reason == "INTERRUPTIBLE_CANNOT_WAIT"
