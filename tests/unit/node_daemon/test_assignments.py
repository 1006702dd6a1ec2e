"""Fencing tokens: a daemon never takes an assignment older than one it has seen for a GPU."""

from __future__ import annotations

from gpufed.v1 import node_pb2
from node_daemon.assignments import ENDED, STARTED, Assignments


def a(lease: str, token: int, action: int, *gpus: str) -> node_pb2.LeaseAssignment:
    return node_pb2.LeaseAssignment(lease=lease, fencing_token=token, action=action, gpu_uuids=list(gpus))  # type: ignore[arg-type]


def test_newer_assignment_is_accepted_and_recorded() -> None:
    s = Assignments()
    assert s.apply(a("leases/1", 10, STARTED, "g0", "g1")) == (True, "")
    assert s.holder("g1") == "leases/1"
    assert s.apply(a("leases/1", 10, ENDED, "g0", "g1")) == (True, "")
    assert s.holder("g1") is None
    assert s.apply(a("leases/2", 12, STARTED, "g1")) == (True, "")


def test_an_older_start_for_a_gpu_is_rejected_as_stale() -> None:
    s = Assignments()
    s.apply(a("leases/2", 20, STARTED, "g0"))
    assert s.apply(a("leases/1", 15, STARTED, "g0")) == (False, "STALE_FENCING_TOKEN")
    assert s.holder("g0") == "leases/2"


def test_an_end_is_always_taken_and_touches_only_its_own_lease() -> None:
    s = Assignments()
    s.apply(a("leases/1", 15, STARTED, "g0"))
    s.apply(a("leases/2", 20, STARTED, "g1"))
    # A late ENDED of an older lease: taken (it must not stay active here), others untouched.
    assert s.apply(a("leases/1", 15, ENDED, "g0")) == (True, "")
    assert s.holder("g0") is None
    assert s.holder("g1") == "leases/2"


def test_missing_token_is_malformed() -> None:
    assert Assignments().apply(a("leases/1", 0, STARTED, "g0")) == (False, "MALFORMED_ASSIGNMENT")
