"""A grant whose caller goes away while its Txn is in flight: the outcome is unknown, so its
etcd lease must never serve another grant (two gpufed leases on one etcd lease would keep an
abandoned lease alive as long as the other is renewed)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf import duration_pb2

from control_plane.domain import lease_rules
from gpufed.client import Client
from gpufed.v1 import lease_pb2
from tests.harness import ReplicaThread, one_node

pytestmark = pytest.mark.integration


def test_a_grant_cancelled_mid_commit_never_lends_its_etcd_lease_to_another_grant(
    replica: ReplicaThread,
) -> None:
    assert replica.replica is not None
    leases = replica.replica.leases
    with one_node(replica.address) as tenant_token:

        async def cancel_then_grant() -> tuple[list[int], int, lease_pb2.Lease]:
            spec = lease_rules.validate_create(
                lease_pb2.CreateLeaseRequest(
                    request_id="cancelled-1", gpu_count=1, ttl=duration_pb2.Duration(seconds=30)
                )
            )
            in_flight = asyncio.Event()
            send = leases.store.send_txn

            async def spy(req: rpc.TxnRequest, liveness: bool = False) -> rpc.TxnResponse:
                in_flight.set()
                return await send(req, liveness)

            leases.store.send_txn = spy  # type: ignore[method-assign]
            try:
                task = asyncio.create_task(leases.create("dev", spec))
                await in_flight.wait()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            finally:
                del leases.store.send_txn
            pooled = [lease_id for lease_id, _ in leases.pool._pools.get(30, [])]
            taken = leases.pool.granted
            # The next grant of that ttl must get an etcd lease of its own.
            other = lease_rules.validate_create(
                lease_pb2.CreateLeaseRequest(
                    request_id="after-1", gpu_count=1, ttl=duration_pb2.Duration(seconds=30)
                )
            )
            after = await leases.create("dev", other)
            return pooled, leases.pool.granted - taken, after

        outcome = replica.call(cancel_then_grant())
        pooled, fresh_grants, after = cast(tuple[list[int], int, lease_pb2.Lease], outcome)
        assert pooled == []
        assert fresh_grants == 1
        with Client(replica.address, tenant_token) as c:
            # Whatever became of the cancelled grant, a retry with its request_id settles it, and
            # it never shares an etcd lease with the grant that came after it.
            try:
                retried = c.create_lease(1, ttl_s=30, request_id="cancelled-1")
            except Exception:
                retried = None
            if retried is not None:
                assert retried.etcd_lease_id != after.etcd_lease_id
