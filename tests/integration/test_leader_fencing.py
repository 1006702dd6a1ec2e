"""Leader writes are fenced by the leader key's term: a replica that lost the key (deposed in
a partition, another elected) cannot write a usage record, and the deposed replica steps down
and campaigns again."""

from __future__ import annotations

import pytest

from control_plane.adapters.store import KeyValue, delete
from control_plane.app.leader import Deposed, Leader
from gpufed.v1 import lease_pb2
from tests.harness import EtcdCluster, ReplicaThread, replica_config, unique_prefix, wait_until

pytestmark = pytest.mark.integration


def _ended_lease() -> lease_pb2.Lease:
    lease = lease_pb2.Lease(name="leases/00000000000000aa", tenant="dev", state=lease_pb2.LEASE_STATE_ACTIVE)
    lease.gpus.add(provider="neo", node_id="n1", uuid="GPU-1", node="providers/neo/nodes/n1")
    lease.create_time.FromSeconds(1_000)
    lease.expire_time.FromSeconds(1_060)
    lease.ttl.FromSeconds(60)
    return lease


def test_a_deposed_leaders_usage_write_is_rejected_and_it_steps_down(etcd: EtcdCluster) -> None:
    r = ReplicaThread(replica_config(etcd.endpoints, unique_prefix())).start()
    try:
        assert r.replica is not None
        leader: Leader = r.replica.leader
        wait_until(lambda: leader.is_leader.is_set(), timeout=10)
        store, keys = r.replica.store, r.replica.store.keys
        term = leader.term
        assert term > 0

        # What a partition looks like from etcd: another replica holds the key now. (One write,
        # so this replica cannot win the key back in between; the fence compares the value too.)
        # A lease that expired: its journal entry outlived its record.
        lease_id = "00000000000000aa"
        r.call(store.put(keys.journal(lease_id), _ended_lease().SerializeToString()))
        journal = r.call(store.get(keys.journal(lease_id)))
        r.call(store.put(keys.leader, b"usurper"))
        with pytest.raises(Deposed):
            r.call(leader.settle(lease_id, journal))  # type: ignore[arg-type]

        def usage() -> list[KeyValue]:
            listed: tuple[list[KeyValue], int] = r.call(store.get_prefix(keys.usage_dir("neo")))  # type: ignore[assignment]
            return [kv for kv in listed[0] if kv.key.decode().endswith("/" + lease_id)]

        history = r.call(store.get(keys.lease_history(lease_id)))
        assert not usage() and history is None, "a deposed leader wrote"
        assert r.call(store.get(keys.journal(lease_id))) is not None

        # Once the usurper goes, the replica campaigns again, leads in a new term and settles.
        r.call(store.txn([], [delete(keys.leader)]))
        wait_until(lambda: leader.is_leader.is_set() and leader.term > term, timeout=10)
        wait_until(lambda: len(usage()) == 1, timeout=10)
        assert r.call(store.get(keys.journal(lease_id))) is None
    finally:
        r.stop()


def test_a_leader_that_lost_its_key_stops_leading_within_seconds(etcd: EtcdCluster) -> None:
    r = ReplicaThread(replica_config(etcd.endpoints, unique_prefix())).start()
    try:
        assert r.replica is not None
        leader: Leader = r.replica.leader
        wait_until(lambda: leader.is_leader.is_set(), timeout=10)
        store, keys = r.replica.store, r.replica.store.keys

        r.call(store.put(keys.leader, b"usurper"))
        wait_until(lambda: not leader.is_leader.is_set(), timeout=5)
        assert r.replica.inventory.leader == "usurper"
    finally:
        r.stop()
