"""The in-memory index fed event by event."""

from __future__ import annotations

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.keyspace import Keyspace
from gpufed.v1 import common_pb2, lease_pb2
from tests.unit.control_plane.inventory import P, add_node


def test_records_liveness_and_allocations_join_in_any_order() -> None:
    inv = Inventory(Keyspace(P))
    inv.apply(f"{P}/alloc/p/a/a-g0".encode(), b"lease1", 1)  # before its node
    inv.apply(f"{P}/alive/p/a".encode(), b"r/s", 2)
    add_node(inv, "p", "a", "DE", 2.0, alive=False, rev=3)
    view = inv.view("providers/p/nodes/a")
    assert view is not None and view.state == common_pb2.NODE_STATE_READY
    assert view.free_gpu_count == 3 and view.gpus[0].lease == "leases/lease1"
    inv.apply(f"{P}/alive/p/a".encode(), None, 4)
    assert inv.state("providers/p/nodes/a") == common_pb2.NODE_STATE_OFFLINE
    assert not inv.summaries["providers/p/nodes/a"].schedulable


def test_lease_fencing_token_is_the_create_revision_and_deletes_carry_the_record() -> None:
    inv = Inventory(Keyspace(P))
    seen: list[Change] = []
    inv.subscribe(seen.append)
    lease = lease_pb2.Lease(name="leases/abc", tenant="t")
    inv.apply(f"{P}/leases/abc".encode(), lease.SerializeToString(), 42, 42)
    assert inv.leases["abc"].fencing_token == 42
    inv.apply(f"{P}/leases/abc".encode(), None, 50)
    gone = seen[-1]
    assert gone.kind is ChangeKind.LEASE and gone.value is None and "abc" not in inv.leases
    assert gone.lease is not None and gone.lease.name == "leases/abc" and gone.lease.fencing_token == 42


def test_draining_set_follows_node_records() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "a", "DE", 2.0)
    add_node(inv, "p", "b", "DE", 2.0)
    assert inv.draining == set()
    drained = common_pb2.Node(provider="p", node_id="a", state=common_pb2.NODE_STATE_DRAINING)
    inv.apply(f"{P}/nodes/p/a".encode(), drained.SerializeToString(), 5)
    assert inv.draining == {"providers/p/nodes/a"}
    back = common_pb2.Node(provider="p", node_id="a", state=common_pb2.NODE_STATE_READY)
    inv.apply(f"{P}/nodes/p/a".encode(), back.SerializeToString(), 6)
    assert inv.draining == set()
    inv.apply(f"{P}/nodes/p/b".encode(), drained.SerializeToString(), 7)
    inv.apply(f"{P}/nodes/p/b".encode(), None, 8)  # a deleted node is no longer draining
    assert inv.draining == set()


def test_keys_outside_the_layout_change_nothing_and_notify_nobody() -> None:
    inv = Inventory(Keyspace(P))
    seen: list[Change] = []
    inv.subscribe(seen.append)
    assert inv.apply(f"{P}/nodes/p".encode(), b"x", 1) is None
    assert inv.apply(f"{P}/unknown/a".encode(), b"x", 2) is None
    assert seen == [] and inv.nodes == {}


def test_load_replaces_the_view_and_tells_one_resync_not_each_key() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "gone", "DE", 2.0)
    seen: list[Change] = []
    inv.subscribe(seen.append)

    class KV:
        def __init__(self, key: str, value: bytes, rev: int) -> None:
            self.key, self.value, self.mod_revision, self.create_revision = key.encode(), value, rev, rev

    node = common_pb2.Node(provider="p", node_id="new", location=common_pb2.Location(country_code="FR"))
    inv.load([KV(f"{P}/nodes/p/new", node.SerializeToString(), 9)], 10)
    assert list(inv.nodes) == ["providers/p/nodes/new"] and inv.revision == 10
    assert [c.kind for c in seen] == [ChangeKind.RESYNC]


def test_a_tenants_holds_and_a_providers_nodes_are_counted_as_records_come_and_go() -> None:
    inv = Inventory(Keyspace(P))
    for i, (tenant, gpus) in enumerate([("t", 2), ("t", 3), ("u", 1)]):
        lease = lease_pb2.Lease(name=f"leases/{i}", tenant=tenant)
        for g in range(gpus):
            lease.gpus.add(uuid=f"g{i}{g}")
        inv.apply(f"{P}/leases/{i}".encode(), lease.SerializeToString(), 10 + i, 10 + i)
    assert inv.tenant_holds("t") == (2, 5) and inv.tenant_holds("u") == (1, 1)
    inv.apply(f"{P}/leases/0".encode(), None, 20)
    assert inv.tenant_holds("t") == (1, 3) and inv.tenant_holds("nobody") == (0, 0)
    add_node(inv, "p", "a", "DE", 2.0)
    add_node(inv, "p", "b", "DE", 2.0)
    add_node(inv, "p", "a", "DE", 3.0)  # an update is not a new node
    assert inv.provider_nodes("p") == 2
    inv.apply(f"{P}/nodes/p/a".encode(), None, 30)
    assert inv.provider_nodes("p") == 1 and inv.provider_nodes("q") == 0
