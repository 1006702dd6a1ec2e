"""The calendar checker: many clients book, cancel and lease the same 8 GPUs through two replicas
for a few seconds, with interruptible leases in the gaps; then, from the records the servers
kept (every reservation and lease, ended ones included):

1. no GPU is in two reservations whose windows overlap while both were booked;
2. no on-demand lease runs into a booked window of its GPU (it ends at the window's start);
3. every reservation still booked at its start became a lease within 1 s of it;
4. every interruptible lease that was preempted was told (PREEMPTING) ahead, by its notice.

Bounded: 8 clients for 8 s on loopback; every window (10-12 s, starting 6-9 s ahead) ends within 30 s."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from gpufed.client import Client, GpufedError
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
S = 1_000_000_000
NOTICE_S = 1.0
RUN_S = 8.0
R = reservation_pb2
W = lease_pb2.WatchLeaseResponse


@dataclass
class World:
    replicas: list[ReplicaThread]
    tenant: str
    daemons: list[DaemonThread] = field(default_factory=list)


@pytest.fixture
def world(etcd: EtcdCluster) -> Iterator[World]:
    prefix = unique_prefix()
    replicas = [
        ReplicaThread(replica_config(etcd.endpoints, prefix, preemption_notice_s=NOTICE_S)).start()
        for _ in range(2)
    ]
    with Client(replicas[0].address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", "dev").secret
        provider = admin.create_token("provider", "neo").secret
    w = World(replicas, tenant)
    for i, node in enumerate(("n1", "n2")):
        cfg = daemon_config(
            [replicas[i].address], provider, "neo", node, interruptible_price_per_gpu_hour=0.5
        )
        w.daemons.append(DaemonThread(cfg, FakeNvml("l40s-4", host=node)).start())
    with Client(replicas[1].address, tenant) as c:
        wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8, timeout=20)
        wait_until(lambda: reservations_open(c), timeout=20)
    yield w
    for d in w.daemons:
        d.stop()
    for r in replicas:
        r.stop()


def test_bookings_cancellations_and_leases_through_two_replicas_keep_the_calendar(world: World) -> None:
    stop = threading.Event()
    told: dict[str, float] = {}  # interruptible lease -> when PREEMPTING arrived (client clock)
    lock = threading.Lock()
    errors: list[str] = []
    attempts = [0]

    def booker(i: int) -> None:
        rng = random.Random(i)
        with Client(world.replicas[i % 2].address, world.tenant, retries=0) as c:
            while not stop.is_set():
                attempts[0] += 1
                try:
                    r = c.create_reservation(
                        rng.randint(1, 3),
                        time.time() + rng.uniform(1.5, 5.0),
                        rng.randint(10, 12),
                        spread=True,
                    )
                    if rng.random() < 0.3:
                        time.sleep(rng.uniform(0, 1.0))
                        c.cancel_reservation(r.name)
                except GpufedError as e:
                    if e.reason not in ("NO_MATCHING_CAPACITY", "CAPACITY_CONTENDED"):
                        errors.append(f"booking: {e}")
                time.sleep(rng.uniform(0.05, 0.3))

    def leaser(i: int) -> None:
        rng = random.Random(100 + i)
        with Client(world.replicas[i % 2].address, world.tenant, retries=0) as c:
            while not stop.is_set():
                try:
                    lease = c.create_lease(rng.randint(1, 2), ttl_s=5)
                    until = time.time() + rng.uniform(1.0, 8.0)
                    while time.time() < until and lease.state != lease_pb2.LEASE_STATE_ENDED:
                        lease = c.renew_lease(lease.name)
                        time.sleep(0.3)
                    c.release_lease(lease.name)
                except GpufedError as e:
                    if e.reason not in ("NO_MATCHING_CAPACITY", "CAPACITY_CONTENDED", "LEASE_ENDED"):
                        errors.append(f"lease: {e}")
                time.sleep(rng.uniform(0.05, 0.3))

    def spotter(i: int) -> None:
        rng = random.Random(200 + i)
        with Client(world.replicas[i % 2].address, world.tenant, retries=0) as c:
            while not stop.is_set():
                try:
                    lease = c.create_lease(rng.randint(1, 2), ttl_s=10, interruptible=True)
                except GpufedError:
                    time.sleep(0.2)
                    continue

                def watch(name: str = lease.name) -> None:
                    for ev in c.watch_lease(name):
                        if ev.type == W.EVENT_TYPE_PREEMPTING:
                            with lock:
                                told[name] = time.time()

                threading.Thread(target=watch, daemon=True).start()
                until = time.time() + rng.uniform(1.0, 4.0)
                try:
                    while time.time() < until:
                        if c.renew_lease(lease.name).state == lease_pb2.LEASE_STATE_ENDED:
                            break
                        time.sleep(0.3)
                    c.release_lease(lease.name)
                except GpufedError:
                    pass  # preempted meanwhile

    workers = [
        threading.Thread(target=f, args=(i,))
        for f, n in ((booker, 4), (leaser, 2), (spotter, 2))
        for i in range(n)
    ]
    for t in workers:
        t.start()
    time.sleep(RUN_S)
    stop.set()
    for t in workers:
        t.join(15)
    assert not errors, errors[:5]

    with Client(world.replicas[0].address, ADMIN_TOKEN) as admin:

        def settled() -> bool:
            return all(r.state == R.RESERVATION_STATE_ENDED for r in admin.list_reservations())

        wait_until(settled, timeout=40)
        reservations = admin.list_reservations()
        leases = {lease.name: lease for lease in admin.list_leases()}
    assert attempts[0] >= 20 and len(reservations) >= 6, "enough bookings to contend"

    def booked_until(r: reservation_pb2.Reservation) -> int:
        """Until when r held its window in the calendar."""
        if r.end_reason == R.RESERVATION_END_REASON_CANCELLED:
            return r.ended_time.ToNanoseconds()
        return r.end_time.ToNanoseconds()

    # 1. No two overlapping windows of one GPU while both were booked.
    by_gpu: dict[str, list[reservation_pb2.Reservation]] = {}
    for r in reservations:
        for g in r.gpus:
            by_gpu.setdefault(g.uuid, []).append(r)
    for uuid, rs in by_gpu.items():
        for a, b in itertools.combinations(rs, 2):
            windows_meet = a.start_time.ToNanoseconds() < b.end_time.ToNanoseconds() and (
                b.start_time.ToNanoseconds() < a.end_time.ToNanoseconds()
            )
            both_booked = a.create_time.ToNanoseconds() < booked_until(b) and (
                b.create_time.ToNanoseconds() < booked_until(a)
            )
            assert not (windows_meet and both_booked), (uuid, a.name, b.name)

    # 3. Each window still booked at its start became a lease within 1 s of it.
    started = 0
    for r in reservations:
        if booked_until(r) <= r.start_time.ToNanoseconds():
            continue  # cancelled before its start
        assert r.lease, (r.name, R.ReservationEndReason.Name(r.end_reason), r.message)
        lease = leases[r.lease]
        assert 0 <= lease.create_time.ToNanoseconds() - r.start_time.ToNanoseconds() < S, r.name
        started += 1
    assert started >= 3

    # 2. No on-demand lease runs into a window of its GPU that was booked at its start.
    for lease in leases.values():
        if lease.interruptible or lease.reservation:
            continue
        for g in lease.gpus:
            for r in by_gpu.get(g.uuid, []):
                start = r.start_time.ToNanoseconds()
                if (
                    booked_until(r) <= start
                    or r.create_time.ToNanoseconds() >= lease.end_time.ToNanoseconds()
                ):
                    continue
                overlaps = lease.create_time.ToNanoseconds() < r.end_time.ToNanoseconds() and (
                    lease.end_time.ToNanoseconds() > start
                )
                if overlaps:
                    assert lease.end_time.ToNanoseconds() <= start + S, (lease.name, r.name)
                    assert lease.expire_time.ToNanoseconds() <= start, (lease.name, r.name)

    # 4. Each preempted interruptible lease was told ahead, by about its notice.
    preempted = [x for x in leases.values() if x.end_reason == lease_pb2.LEASE_END_REASON_PREEMPTED]
    for lease in preempted:
        assert lease.interruptible
        assert lease.name in told, lease.name
        ahead = lease.end_time.ToNanoseconds() / S - told[lease.name]
        assert ahead >= NOTICE_S * 0.5, (lease.name, ahead)
