"""The pure, in-process part of a lease cycle, piece by piece: validation, placement, the lease
record, the grant Txn's operations, and the four index events a grant and a release cause.

No I/O, so the figures are steady on a noisy machine: use them to see what a change to the hot
path saves before measuring it end to end (bench.leases)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from bench.common import fake_node
from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.app.lease_txns import grant_txn, release_txn
from control_plane.domain import lease_rules, offers
from control_plane.domain.placement import place
from gpufed.clock import SYSTEM
from gpufed.clock import now_ts as clock_now
from gpufed.v1 import lease_pb2


def now() -> timestamp_pb2.Timestamp:
    return clock_now(SYSTEM)


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1e6, 1)


def run(nodes: int = 1000, n: int = 3000) -> dict[str, Any]:
    keys = Keyspace("/bench")
    inv = Inventory(keys)
    rng = random.Random(1)
    revision = 0
    for i in range(nodes):
        node = fake_node(i, rng)
        revision += 1
        inv.apply(keys.node(node.provider, node.node_id).encode(), node.SerializeToString(), revision)
        revision += 1
        inv.apply(keys.alive(node.provider, node.node_id).encode(), b"r/s", revision)
    req = lease_pb2.CreateLeaseRequest(
        request_id="r" * 32, gpu_count=1, ttl=duration_pb2.Duration(seconds=60)
    )
    spec = lease_rules.validate_create(req)
    picks = place(offers.candidates(inv, spec.filter, 1), 1, spec.placement, set())
    assert picks is not None
    lease_id = "0123456789abcdef"
    lease = lease_rules.build_lease(lease_id, "tenant", spec, picks, now())

    req_key = keys.request("tenant", spec.request_id).encode()
    record = lease.SerializeToString()
    ended = lease_rules.ended(lease, lease_pb2.LEASE_END_REASON_RELEASED, now())

    alloc = keys.alloc(
        picks[0].candidate.node.provider, picks[0].candidate.node.node_id, picks[0].gpu_uuids[0]
    )

    def index_cycle() -> None:
        nonlocal revision
        revision += 4
        inv.apply(keys.lease(lease_id).encode(), record, revision - 3)
        inv.apply(alloc.encode(), lease_id.encode(), revision - 2)
        inv.apply(keys.lease(lease_id).encode(), None, revision - 1)
        inv.apply(alloc.encode(), None, revision)

    pieces = {
        "validate_create": lambda: lease_rules.validate_create(req),
        "candidates_and_place": lambda: place(
            offers.candidates(inv, spec.filter, 1), 1, spec.placement, set()
        ),
        "build_lease": lambda: lease_rules.build_lease(lease_id, "tenant", spec, picks, now()),
        "grant_txn": lambda: grant_txn(
            keys, lease_id, record, req_key, 1, picks, "tenant", "r1", revision, inv.calendar_revision
        ),
        "release_txn": lambda: release_txn(keys, lease, 7, ended, 2),
        "ended_record": lambda: lease_rules.ended(lease, lease_pb2.LEASE_END_REASON_RELEASED, now()),
        "index_four_events": index_cycle,
    }
    out: dict[str, Any] = {"nodes": nodes, "us_per_call": {k: _per_call_us(f, n) for k, f in pieces.items()}}
    out["us_per_cycle_total"] = round(sum(out["us_per_call"].values()), 1)
    return out
