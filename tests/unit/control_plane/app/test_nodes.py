"""Node sessions against a hand-fed index: assignments follow lease changes, and a resync (the
index was re-listed) is diffed whole, since the changes in the gap were never seen."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import EtcdStore, KeyValue
from control_plane.app.nodes import Nodes, NodeSession
from gpufed.clock import FakeClock
from gpufed.v1 import common_pb2, lease_pb2, node_pb2

P = "/n"
NODE = "providers/p/nodes/a"
A, B = "00000000000000aa", "00000000000000bb"


def _nodes() -> tuple[Nodes, Inventory, NodeSession]:
    keys = Keyspace(P)
    inv = Inventory(keys)
    nodes = Nodes(cast(EtcdStore, SimpleNamespace(keys=keys)), inv, "r1", lambda: 0, clock=FakeClock())
    session = NodeSession(NODE, "p", "a", "r1/s1", 0.0)
    nodes.sessions[NODE] = session
    return nodes, inv, session


def _lease(lease_id: str, token: int) -> lease_pb2.Lease:
    lease = lease_pb2.Lease(
        name=f"leases/{lease_id}", state=lease_pb2.LEASE_STATE_ACTIVE, fencing_token=token
    )
    lease.gpus.add(node=NODE, uuid="g0")
    return lease


def _kv(key: str, value: bytes, rev: int) -> KeyValue:
    return KeyValue(f"{P}/{key}".encode(), value, rev, rev, 0)


def _sent(session: NodeSession) -> list[tuple[str, str, int]]:
    out = []
    while not session.outgoing.empty():
        msg = session.outgoing.get_nowait()
        assert msg is not None and msg.WhichOneof("message") == "assignment"
        a = msg.assignment
        out.append(
            (
                node_pb2.AssignmentAction.Name(a.action).removeprefix("ASSIGNMENT_ACTION_"),
                a.lease,
                a.fencing_token,
            )
        )
    return out


def test_a_granted_then_deleted_lease_is_started_once_and_ended_with_its_token() -> None:
    _subscribed, inv, session = _nodes()
    record = _lease(A, 0).SerializeToString()
    inv.apply(f"{P}/leases/{A}".encode(), record, 7, 7)
    inv.apply(f"{P}/leases/{A}".encode(), record, 9, 7)  # a renewal: nothing new
    inv.apply(f"{P}/leases/{A}".encode(), None, 11)
    assert _sent(session) == [
        ("STARTED", f"leases/{A}", 7),
        ("ENDED", f"leases/{A}", 7),
    ]


def test_a_resync_starts_leases_granted_and_ends_leases_gone_in_the_gap() -> None:
    _subscribed, inv, session = _nodes()
    session.sent_started[f"leases/{A}"] = 5  # ended while the watch was away
    inv.load(
        [
            _kv("nodes/p/a", common_pb2.Node(provider="p", node_id="a").SerializeToString(), 3),
            _kv("alive/p/a", b"r1/s1", 4),
            _kv(f"leases/{B}", _lease(B, 0).SerializeToString(), 8),
        ],
        10,
    )
    assert sorted(_sent(session)) == [
        ("ENDED", f"leases/{A}", 5),
        ("STARTED", f"leases/{B}", 8),
    ]
    assert not session.ended.is_set()


def test_a_resync_that_shows_another_stream_holding_the_node_ends_this_session() -> None:
    _subscribed, inv, session = _nodes()
    inv.load([_kv("alive/p/a", b"r2/s9", 4)], 10)
    assert session.ended.is_set() and session.end_error is not None
    assert session.end_error.reason == "SESSION_REPLACED"
