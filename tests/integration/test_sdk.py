"""The Python SDK's lease context manager: it keeps the lease alive past several ttls and
releases it on exit, also when the block raises."""

from __future__ import annotations

import time

import pytest

from gpufed.client import Client, NoCapacity
from gpufed.v1 import lease_pb2
from tests.harness import ReplicaThread, one_node, wait_until

pytestmark = pytest.mark.integration


def test_lease_outlives_several_ttls_inside_the_block_and_is_released_on_exit(replica: ReplicaThread) -> None:
    with one_node(replica.address, "sdk") as tenant, Client(replica.address, tenant) as client:
        with client.lease(gpu_count=2, gpu_model="L40S", countries=["DE"], ttl_s=5) as held:
            assert len(held.gpus) == 2
            time.sleep(12)  # more than two ttls
            assert client.get_lease(held.name).state == lease_pb2.LEASE_STATE_ACTIVE
            assert held.renewals >= 3
        assert held.lease.state == lease_pb2.LEASE_STATE_ENDED
        assert held.lease.end_reason == lease_pb2.LEASE_END_REASON_RELEASED
        assert sum(o.free_gpus for o in client.search_offers()) == 4

        with pytest.raises(RuntimeError), client.lease(gpu_count=4, ttl_s=30) as doomed:
            raise RuntimeError("training crashed")
        assert client.get_lease(doomed.name).state == lease_pb2.LEASE_STATE_ENDED
        wait_until(lambda: sum(o.free_gpus for o in client.search_offers()) == 4)

        with pytest.raises(NoCapacity) as e:
            client.lease(gpu_count=5)
        assert e.value.reason == "NO_MATCHING_CAPACITY"
