"""A booked reservation whose node dies before its window moves to equivalent GPUs (same filter,
same or lower price), or is AT_RISK, and its tenant is told, until the node returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from gpufed.client import Client
from gpufed.v1 import reservation_pb2
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
Nodes = tuple[ReplicaThread, str, dict[str, DaemonThread], list[object]]


@pytest.fixture
def two_nodes(
    etcd: EtcdCluster,
) -> Iterator[tuple[ReplicaThread, str, dict[str, DaemonThread], list[object]]]:
    """A replica with a 1 s reservation grace and two 4-GPU nodes at one price."""
    cfg = replica_config(etcd.endpoints, unique_prefix(), reservation_grace_s=1.0)
    replica = ReplicaThread(cfg).start()
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", "dev").secret
        provider = admin.create_token("provider", "neo").secret
    configs = [daemon_config([replica.address], provider, "neo", n) for n in ("n1", "n2")]
    daemons = {
        f"providers/neo/nodes/{n}": DaemonThread(c, FakeNvml("l40s-4", host=n)).start()
        for n, c in zip(("n1", "n2"), configs, strict=True)
    }
    with Client(replica.address, tenant) as c:
        wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8, timeout=20)
        wait_until(lambda: reservations_open(c), timeout=20)
    yield replica, tenant, daemons, configs
    for d in daemons.values():
        d.stop()
    replica.stop()


def test_a_reservation_whose_node_dies_moves_to_equivalent_gpus_or_is_at_risk_until_it_returns(
    two_nodes: Nodes,
) -> None:
    replica, tenant, daemons, configs = two_nodes
    R = reservation_pb2
    with Client(replica.address, tenant) as c:
        start = time.time() + 600
        first = c.create_reservation(2, start, 3600)
        node = first.gpus[0].node
        other = next(n for n in daemons if n != node)
        daemons[node].stop()
        wait_until(lambda: c.get_reservation(first.name).gpus[0].node == other, timeout=10)
        moved = c.get_reservation(first.name)
        assert moved.state == R.RESERVATION_STATE_SCHEDULED and "moved" in moved.message
        assert moved.price_per_hour <= first.price_per_hour
        # The other node is now fully booked for an overlapping window, and it dies too.
        rest = c.create_reservation(2, start, 3600)
        assert {g.node for g in rest.gpus} == {other}
        events: list[R.WatchReservationResponse] = []
        watcher = threading.Thread(target=lambda: events.extend(c.watch_reservation(rest.name)), daemon=True)
        watcher.start()
        daemons[other].stop()
        wait_until(lambda: c.get_reservation(rest.name).state == R.RESERVATION_STATE_AT_RISK, timeout=10)
        assert "no equivalent GPUs" in c.get_reservation(rest.name).message
        names = list(daemons)
        back = DaemonThread(
            configs[names.index(other)], FakeNvml("l40s-4", host=other.rsplit("/", 1)[1])
        ).start()
        daemons[other] = back
        wait_until(lambda: c.get_reservation(rest.name).state == R.RESERVATION_STATE_SCHEDULED, timeout=10)
        wait_until(
            lambda: R.WatchReservationResponse.EVENT_TYPE_AT_RISK in [e.type for e in events], timeout=5
        )
        for r in (first, rest):
            c.cancel_reservation(r.name)
        watcher.join(5)
