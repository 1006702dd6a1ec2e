"""The grant and release Txns: what they compare, write and read back."""

from __future__ import annotations

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.keyspace import Keyspace
from control_plane.app.lease_txns import grant_txn, release_txn
from control_plane.domain.inventory import Candidate
from control_plane.domain.placement import Pick
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2

K = Keyspace("/g")


def _pick(node_id: str, uuids: tuple[str, ...], mod_revision: int) -> Pick:
    node = common_pb2.Node(provider="p", node_id=node_id)
    gpus = [node.gpus.add(uuid=u) for u in uuids]
    return Pick(Candidate(f"nodes/p/{node_id}", node, gpus, None, mod_revision), uuids)


def test_grant_compares_every_allocation_absent_and_each_node_unchanged_and_alive() -> None:
    picks = [_pick("a", ("g0", "g1"), 7), _pick("b", ("g2",), 9)]
    calendars = {"nodes/p/a": 9}  # node b has no calendar record
    txn = grant_txn(
        K,
        "00ff",
        b"record",
        b"/g.records/requests/t/r1",
        42,
        picks,
        "t",
        "r1",
        30,
        lambda n: calendars.get(n, 0),
    )
    compares = [(c.key, c.target, c.result) for c in txn.req.compare]
    C = rpc.Compare
    assert (b"/g/alloc/p/a/g0", C.CREATE, C.EQUAL) in compares
    assert (b"/g/alloc/p/b/g2", C.CREATE, C.EQUAL) in compares
    assert (b"/g/alive/p/a", C.VERSION, C.GREATER) in compares
    node_a = next(c for c in txn.req.compare if c.key == b"/g/nodes/p/a")
    assert node_a.target == C.MOD and node_a.mod_revision == 7
    assert (b"/g.records/requests/t/r1", C.CREATE, C.EQUAL) in compares
    # Each node's calendar as the grant read it: a booking meanwhile could cut the lease short.
    cal_a = next(c for c in txn.req.compare if c.key == b"/g/calendar/p/a")
    assert cal_a.target == C.MOD and cal_a.mod_revision == 9
    assert (b"/g/calendar/p/b", C.CREATE, C.EQUAL) in compares
    # Every write rides on the etcd lease: when it expires, the GPUs come back by themselves.
    puts = {op.request_put.key: op.request_put for op in txn.req.success}
    assert set(puts) == txn.writes
    assert puts[b"/g.records/holds/t/r1/00ff"].value == b"3"
    assert set(puts) == {
        b"/g.records/journal/00ff",
        b"/g.records/holds/t/r1/00ff",
        b"/g/leases/00ff",
        b"/g.records/requests/t/r1",
        b"/g/alloc/p/a/g0",
        b"/g/alloc/p/a/g1",
        b"/g/alloc/p/b/g2",
    }
    # Every write but the journal rides on the etcd lease: when it expires, the GPUs come back
    # by themselves, and the journal entry tells the leader what to bill.
    assert puts.pop(b"/g.records/journal/00ff").lease == 0
    assert all(p.lease == 42 for p in puts.values())
    # On failure the request key is read first (a retry finds its lease), then what conflicted.
    assert txn.req.failure[0].request_range.key == b"/g.records/requests/t/r1"


def test_grant_fails_if_another_replica_granted_the_tenant_anything_since_its_count() -> None:
    txn = grant_txn(K, "00ff", b"record", None, 42, [_pick("a", ("g0",), 7)], "t", "r1", 30, lambda n: 0)
    ranges = [c for c in txn.req.compare if c.range_end]
    C = rpc.Compare
    # Every replica's holds of the tenant but r1's own (which r1 counts itself).
    assert [(c.key, c.range_end) for c in ranges] == [
        (b"/g.records/holds/t/", b"/g.records/holds/t/r1/"),
        (b"/g.records/holds/t/r10", b"/g.records/holds/t0"),
    ]
    assert all((c.target, c.result, c.mod_revision) == (C.MOD, C.LESS, 31) for c in ranges)


def test_release_deletes_record_and_allocations_keeps_history_and_bills_once() -> None:
    lease = lease_pb2.Lease(name="leases/00ff", tenant="t", request_id="r1", grant_replica="r1")
    lease.gpus.add(provider="p", node_id="a", uuid="g0", price_per_gpu_hour=3.6)
    lease.create_time.FromSeconds(100)
    lease.active_time.FromSeconds(100)  # billed from ACTIVE
    final = lease_pb2.Lease()
    final.CopyFrom(lease)
    final.end_time.FromSeconds(200)
    txn = release_txn(K, lease, 11, final, 5)
    (compare,) = txn.req.compare
    assert compare.key == b"/g/leases/00ff" and compare.mod_revision == 11
    deleted = {op.request_delete_range.key for op in txn.req.success if op.HasField("request_delete_range")}
    assert deleted == {
        b"/g/leases/00ff",
        b"/g/alloc/p/a/g0",
        b"/g.records/holds/t/r1/00ff",
        b"/g.records/journal/00ff",  # billed here: the leader has nothing left to do
    }
    kept = {op.request_put.key: op.request_put for op in txn.req.success if op.HasField("request_put")}
    by_id, by_tenant = b"/g.records/history/leases/00ff", K.tenant_history("t", 100 * 10**9, "00ff").encode()
    assert (
        lease_pb2.Lease.FromString(kept[by_id].value)
        == final
        == lease_pb2.Lease.FromString(kept[by_tenant].value)
    )
    end = f"{200 * 10**9:020d}"
    by_provider = f"/g.records/usage/p/{end}/00ff".encode()
    assert kept[f"/g.records/tenant-usage/t/{end}/00ff/p".encode()].value == kept[by_provider].value
    usage = admin_pb2.UsageRecord.FromString(kept[by_provider].value)
    assert (usage.gpu_seconds, usage.quoted_cost) == (100.0, 0.1)
    assert kept[by_id].lease == kept[by_tenant].lease == 5 and kept[by_provider].lease == 0
    assert txn.writes == deleted | set(kept)


def test_a_release_too_wide_for_one_txn_leaves_its_billing_to_the_leader() -> None:
    lease = lease_pb2.Lease(name="leases/00ff", tenant="t", grant_replica="r1")
    for i in range(64):
        lease.gpus.add(provider=f"p{i}", node_id="a", uuid=f"g{i}")
    txn = release_txn(K, lease, 11, lease, 5)
    keys = {op.request_put.key for op in txn.req.success} | {
        op.request_delete_range.key for op in txn.req.success
    }
    assert b"/g.records/journal/00ff" not in keys and len(txn.req.success) <= 128
