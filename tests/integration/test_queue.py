"""Waiting for capacity against real etcd: a request that cannot be served now is QUEUED, is
granted when GPUs come free, expires at its deadline, and can be cancelled."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from gpufed.client import Client, NoCapacity
from gpufed.v1 import lease_pb2
from tests.harness import ReplicaThread, one_node, wait_until

pytestmark = pytest.mark.integration


def test_a_request_waits_and_is_granted_when_gpus_come_free(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        waiting = c.create_lease(2, max_wait_s=60)
        assert waiting.state == lease_pb2.LEASE_STATE_QUEUED
        assert waiting.queue_position == 1 and not waiting.gpus
        assert waiting.wait_expire_time.seconds > time.time()
        t0 = time.monotonic()
        c.release_lease(held.name)
        wait_until(lambda: c.get_lease(waiting.name).state == lease_pb2.LEASE_STATE_ACTIVE, timeout=5)
        granted = c.get_lease(waiting.name)
        assert len(granted.gpus) == 2 and granted.fencing_token > 0
        assert time.monotonic() - t0 < 2.0
        c.release_lease(granted.name)


def test_a_waiting_request_ends_wait_expired_at_its_deadline(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        waiting = c.create_lease(1, max_wait_s=1)
        assert waiting.state == lease_pb2.LEASE_STATE_QUEUED
        wait_until(lambda: c.get_lease(waiting.name).state == lease_pb2.LEASE_STATE_ENDED, timeout=5)
        ended = c.get_lease(waiting.name)
        assert ended.end_reason == lease_pb2.LEASE_END_REASON_WAIT_EXPIRED and not ended.gpus
        c.release_lease(held.name)


def test_a_cancelled_waiting_request_is_never_granted(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        waiting = c.create_lease(1, max_wait_s=60)
        ended = c.release_lease(waiting.name)
        assert ended.state == lease_pb2.LEASE_STATE_ENDED
        c.release_lease(held.name)
        time.sleep(1.0)
        assert c.get_lease(waiting.name).state == lease_pb2.LEASE_STATE_ENDED
        assert sum(o.free_gpus for o in c.search_offers()) == 4


def test_a_request_no_node_could_ever_serve_is_refused_not_queued(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        with pytest.raises(NoCapacity) as e:
            c.create_lease(1, max_wait_s=60, gpu_model="H100")
        assert e.value.reason == "NO_MATCHING_CAPACITY"


def _opened(c: Client) -> bool:
    """The leader migrated the fresh prefix to the queue's schema: a queued request is
    accepted (and cancelled at once)."""
    held = c.create_lease(4)
    try:
        try:
            probe = c.create_lease(1, max_wait_s=60)
        except Exception:
            return False
        c.release_lease(probe.name)
        return probe.state == lease_pb2.LEASE_STATE_QUEUED
    finally:
        c.release_lease(held.name)


def test_watching_a_queued_lease_shows_queued_then_granted_then_ended(replica: ReplicaThread) -> None:
    W = lease_pb2.WatchLeaseResponse
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        first = c.create_lease(2, max_wait_s=60)
        second = c.create_lease(2, max_wait_s=60)
        events = c.watch_lease(second.name)
        ev = next(events)
        assert ev.type == W.EVENT_TYPE_QUEUED and ev.lease.queue_position == 2
        c.release_lease(first.name)  # the one ahead is cancelled: second moves up
        ev = next(events)
        assert ev.type == W.EVENT_TYPE_QUEUED and ev.lease.queue_position == 1
        c.release_lease(held.name)
        ev = next(events)
        assert ev.type == W.EVENT_TYPE_GRANTED and ev.lease.state == lease_pb2.LEASE_STATE_ACTIVE
        assert len(ev.lease.gpus) == 2
        c.release_lease(second.name)
        kinds = [e.type for e in events]
        assert kinds[-1] == W.EVENT_TYPE_ENDED


def test_watching_a_queued_lease_that_expires_ends_wait_expired(replica: ReplicaThread) -> None:
    W = lease_pb2.WatchLeaseResponse
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        waiting = c.create_lease(1, max_wait_s=1)
        kinds = [(e.type, e.lease.end_reason) for e in c.watch_lease(waiting.name)]
        assert kinds == [
            (W.EVENT_TYPE_QUEUED, 0),
            (W.EVENT_TYPE_ENDED, lease_pb2.LEASE_END_REASON_WAIT_EXPIRED),
        ]
        c.release_lease(held.name)


def _cli(address: str, tenant: str, *argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GPUFED_ENDPOINT": address, "GPUFED_TOKEN": tenant, "GPUFED_CONFIG": "/nonexistent"}
    return subprocess.Popen(
        [sys.executable, "-m", "gpufed", "-o", "json", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_cli_waits_in_the_queue_and_prints_the_granted_lease(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        proc = _cli(replica.address, tenant, "lease", "create", "--count", "2", "--wait", "5m")
        wait_until(lambda: len(c.list_leases(lease_pb2.LEASE_STATE_QUEUED)) == 1, timeout=20)
        c.release_lease(held.name)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        lease = json.loads(out)
        assert lease["state"] == "LEASE_STATE_ACTIVE" and len(lease["gpus"]) == 2
        line = rf"{lease['name']} queued: position 1, waited 0m0\ds, gives up in (4m5\ds|5m00s)"
        assert re.search(line, err), err
        c.release_lease(lease["name"])


def test_the_cli_gives_up_at_max_wait_with_an_error(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        proc = _cli(replica.address, tenant, "lease", "create", "--count", "1", "--wait", "1s")
        out, err = proc.communicate(timeout=20)
        assert proc.returncode != 0 and out == ""
        assert "ended while queued (WAIT_EXPIRED)" in err
        c.release_lease(held.name)


def test_a_retried_queued_request_answers_with_the_same_lease(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        held = c.create_lease(4)
        first = c.create_lease(2, max_wait_s=60, request_id="job-7")
        again = c.create_lease(2, max_wait_s=60, request_id="job-7")
        assert again.name == first.name and again.state == lease_pb2.LEASE_STATE_QUEUED
        assert len(c.list_leases(lease_pb2.LEASE_STATE_QUEUED)) == 1
        c.release_lease(held.name)
        wait_until(lambda: c.get_lease(first.name).state == lease_pb2.LEASE_STATE_ACTIVE, timeout=5)
        assert c.create_lease(2, max_wait_s=60, request_id="job-7").name == first.name
        c.release_lease(first.name)


def test_more_gpus_than_any_node_has_on_one_node_is_refused_not_queued(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, Client(replica.address, tenant) as c:
        wait_until(lambda: _opened(c), timeout=20)
        with pytest.raises(NoCapacity):
            c.create_lease(5, max_wait_s=60)
        assert c.list_leases(lease_pb2.LEASE_STATE_QUEUED) == []
