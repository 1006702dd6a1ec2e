"""A deleted token stops everything it opened, on every replica, within one watch event; and a
valid token keeps working whatever happens to other tokens or other callers from its address.

On the tree before this test, a deleted tenant's KeepAlive stream went on renewing (its lease
was still ACTIVE 15 s after the deletion with a 6 s ttl), a deleted provider's daemon stream
stayed up, and a valid token was answered AUTH_THROTTLED after other failures from its address
once any token change had emptied the cache.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from gpufed.client import Client, GpufedError
from gpufed.errors import error_info
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2, lease_pb2_grpc
from node_daemon.fake_nvml import FakeNvml
from node_daemon.session import DaemonSession
from tests.harness import ADMIN_TOKEN, DaemonThread, ReplicaThread, daemon_config, metadata, wait_until
from tests.integration.federation import Federation

pytestmark = pytest.mark.integration


def delete(fed: Federation, token_name: str) -> None:
    with fed.admin(0) as admin:
        admin.call(admin.admin.DeleteToken, admin_pb2.DeleteTokenRequest(name=token_name), retry=False)


def status_of(call: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    info = error_info(call)
    return call.code(), info.reason if info is not None else ""


def test_a_deleted_tenants_keepalive_and_watch_streams_end_on_another_replica_and_its_lease_expires(
    fed: Federation,
) -> None:
    with fed.admin() as admin:
        created = admin.create_token("tenant", "revoked-dev")
    with Client(fed.replicas[1].address, created.secret) as c:
        lease = c.create_lease(1, ttl_s=6, gpu_model="L40S")
    requests: queue.Queue[lease_pb2.KeepAliveRequest | None] = queue.Queue()

    def renewals() -> Iterator[lease_pb2.KeepAliveRequest]:
        while (r := requests.get()) is not None:
            yield r

    ended: dict[str, object] = {}
    channel = grpc.insecure_channel(fed.replicas[1].address)
    stub = lease_pb2_grpc.LeaseServiceStub(channel)

    def keep_alive() -> None:
        try:
            for _ in stub.KeepAlive(renewals(), metadata=metadata(created.secret)):
                pass
            ended["keepalive"] = "ended without an error"
        except grpc.RpcError as e:
            ended["keepalive"] = status_of(e)

    def watch() -> None:
        try:
            for _ in stub.WatchLease(
                lease_pb2.WatchLeaseRequest(name=lease.name), metadata=metadata(created.secret)
            ):
                pass
        except grpc.RpcError as e:
            ended["watch"] = status_of(e)

    threads = [threading.Thread(target=keep_alive, daemon=True), threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    try:
        requests.put(lease_pb2.KeepAliveRequest(name=lease.name))
        time.sleep(0.5)
        assert not ended, ended  # both streams are up

        delete(fed, created.token.name)  # through replica 0; the streams are on replica 1

        took = wait_until(lambda: len(ended) == 2, timeout=5)
        assert took < 2.0
        assert ended == {
            "keepalive": (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED"),
            "watch": (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED"),
        }
        # Nothing renews the lease any more: it expires at its ttl and its GPU is free again.
        with fed.admin(1) as admin:
            wait_until(lambda: admin.get_lease(lease.name).state == lease_pb2.LEASE_STATE_ENDED, timeout=15)
            assert admin.get_lease(lease.name).end_reason == lease_pb2.LEASE_END_REASON_EXPIRED
        # And the token opens nothing new.
        with (
            Client(fed.replicas[1].address, created.secret) as c,
            pytest.raises(Exception, match="UNKNOWN_TOKEN"),
        ):
            c.list_leases()
    finally:
        requests.put(None)
        channel.close()


def test_a_deleted_providers_daemon_stream_ends_and_its_node_leaves_the_offers(fed: Federation) -> None:
    with fed.admin() as admin:
        created = admin.create_token("provider", "revoked-neo")
    cfg = daemon_config([fed.replicas[1].address], created.secret, "revoked-neo", "r1")
    daemon = DaemonThread(cfg, FakeNvml("l40s-4")).start()
    try:
        with fed.client(0) as c:
            wait_until(
                lambda: sum(o.free_gpus for o in c.search_offers(providers=["revoked-neo"])) == 4, timeout=20
            )

            delete(fed, created.token.name)

            took = wait_until(lambda: not list(c.search_offers(providers=["revoked-neo"])), timeout=10)
            assert took < 5.0
        with fed.admin(0) as admin:
            assert admin.get_node("providers/revoked-neo/nodes/r1").state == common_pb2.NODE_STATE_OFFLINE
        session = daemon.session
        assert isinstance(session, DaemonSession)
        wait_until(lambda: session.state.last_error.startswith("UNAUTHENTICATED"), timeout=5)
    finally:
        daemon.stop()


def test_a_valid_token_is_never_throttled_by_other_failures_or_other_tokens_changes(fed: Federation) -> None:
    with fed.admin() as admin:
        mine = admin.create_token("tenant", "steady-dev").secret
    address = fed.replicas[0].address
    with Client(address, mine) as c:
        c.list_leases()  # worked before
    # A guesser on the same address (loopback here) runs up the failure count past the limit...
    for i in range(40):
        with Client(address, f"gpf_{i:012x}_guess", retries=0) as bad, pytest.raises(GpufedError):
            bad.list_leases()
    # ... and tokens change meanwhile (the old tree emptied every cached token on any change).
    with fed.admin() as admin:
        for i in range(3):
            other = admin.create_token("tenant", f"other-{i}")
            admin.call(
                admin.admin.DeleteToken, admin_pb2.DeleteTokenRequest(name=other.token.name), retry=False
            )
    # Any spelling of the header is the same token.
    with grpc.insecure_channel(address) as ch:
        stub = lease_pb2_grpc.LeaseServiceStub(ch)
        for header in (f"Bearer {mine}", f"bearer {mine}", f"Bearer  {mine} ", f"BEARER {mine}"):
            stub.ListLeases(lease_pb2.ListLeasesRequest(), metadata=(("authorization", header),))


def test_a_replica_warns_in_a_metric_while_the_bootstrap_token_is_on_beside_real_admin_tokens(
    replica: ReplicaThread,
) -> None:
    assert replica.replica is not None
    gauge = replica.replica.metrics.bootstrap_token_risk
    with Client(replica.address, ADMIN_TOKEN) as admin:
        assert gauge._value.get() == 0  # the harness starts with the bootstrap token only
        admin.create_token("admin", "ops-alice")
        wait_until(lambda: gauge._value.get() == 1, timeout=5)
