"""The authorization matrix: every RPC x every kind of caller, against two real replicas.

The expected code of each cell comes from the authorization table (PERMISSION_DENIED for a kind
the row does not list) and from the explicit expectations below (what ownership makes of an
allowed call: another tenant's lease is NOT_FOUND, another principal's quota PERMISSION_DENIED).
A new RPC fails this test until it has a call here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from control_plane.auth import Kind
from control_plane.authorization import TABLE
from gpufed import __version__
from gpufed.client import Client
from gpufed.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from node_daemon.fake_nvml import FakeNvml
from tests.harness import (
    ADMIN_TOKEN,
    PEER_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    reservations_open,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTH = grpc.StatusCode.UNAUTHENTICATED

CALLERS = {
    "no token": None,
    "unknown token": None,
    "deleted token": None,
    "tenant": Kind.TENANT,
    "other tenant": Kind.TENANT,
    "provider": Kind.PROVIDER,
    "other provider": Kind.PROVIDER,
    "admin": Kind.ADMIN,
    "peer": Kind.PEER,
}
NODE = "providers/neo/nodes/n1"

# What ownership makes of an allowed call (everything else allowed is OK).
EXPLICIT: dict[tuple[str, str], grpc.StatusCode] = {
    ("NodeService.Connect", "other provider"): DENIED,  # PROVIDER_MISMATCH: hello names neo
    ("LeaseService.GetLease", "other tenant"): NOT_FOUND,
    ("LeaseService.RenewLease", "other tenant"): NOT_FOUND,
    ("LeaseService.ReleaseLease", "other tenant"): NOT_FOUND,
    ("LeaseService.WatchLease", "other tenant"): NOT_FOUND,
    ("ReservationService.GetReservation", "other tenant"): NOT_FOUND,
    ("ReservationService.CancelReservation", "other tenant"): NOT_FOUND,
    ("ReservationService.WatchReservation", "other tenant"): NOT_FOUND,
    ("TelemetryService.GetNodeTelemetry", "other tenant"): NOT_FOUND,  # holds no GPU of it
    ("TelemetryService.GetNodeTelemetry", "other provider"): NOT_FOUND,
    ("DiscoveryService.GetNode", "other provider"): NOT_FOUND,  # a provider reads its own nodes
    ("AdminService.GetQuota", "other tenant"): DENIED,  # OTHER_PRINCIPAL
    ("AdminService.SetBurstPolicy", "other tenant"): DENIED,  # OTHER_PRINCIPAL
    ("AdminService.GetBurstPolicy", "other tenant"): DENIED,
    ("AdminService.GetQuota", "provider"): DENIED,
    ("AdminService.GetQuota", "other provider"): DENIED,
}


def expected(method: str, caller: str) -> grpc.StatusCode:
    kind = CALLERS[caller]
    if kind is None:
        return UNAUTH
    if kind not in TABLE[method].kinds:
        return DENIED
    return EXPLICIT.get((method, caller), OK)


@dataclass
class World:
    channel: grpc.Channel  # to the replica the daemon streams to
    tokens: dict[str, str]
    lease: str  # held by "tenant", on NODE
    reservation: str  # booked by "tenant", a day ahead

    def md(self, token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),) if token else ()

    def fresh_lease(self) -> str:
        stub = lease_pb2_grpc.LeaseServiceStub(self.channel)
        resp = stub.CreateLease(
            lease_pb2.CreateLeaseRequest(gpu_count=1), metadata=self.md(self.tokens["tenant"]), timeout=10
        )
        return str(resp.lease.name)

    def fresh_reservation(self, token: str) -> str:
        stub = reservation_pb2_grpc.ReservationServiceStub(self.channel)
        resp = stub.CreateReservation(_booking(), metadata=self.md(token), timeout=10)
        return str(resp.reservation.name)


def _booking() -> reservation_pb2.CreateReservationRequest:
    req = reservation_pb2.CreateReservationRequest(gpu_count=1)
    req.start_time.seconds = int(time.time()) + 86_400
    req.duration.seconds = 3600
    return req


def _first(stream: Any) -> None:
    try:
        next(stream)
    except StopIteration:
        pass
    finally:
        stream.cancel()


def _hello() -> node_pb2.NodeMessage:
    hello = node_pb2.NodeHello(
        provider="neo",
        daemon_version=__version__,
        node_id="matrix",
        location=common_pb2.Location(country_code="DE"),
        price_per_gpu_hour=1.0,
        currency_code="USD",
    )
    hello.gpus.add(uuid="GPU-matrix-0", model="NVIDIA L40S", memory_total_bytes=48 << 30, health=1)
    return node_pb2.NodeMessage(hello=hello)


Call = Callable[[World, tuple[tuple[str, str], ...], str], None]


def _calls() -> dict[str, Call]:
    def disc(w: World) -> discovery_pb2_grpc.DiscoveryServiceStub:
        return discovery_pb2_grpc.DiscoveryServiceStub(w.channel)

    def leases(w: World) -> lease_pb2_grpc.LeaseServiceStub:
        return lease_pb2_grpc.LeaseServiceStub(w.channel)

    def admin(w: World) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(w.channel)

    def create(w: World, md: Any, who: str) -> None:
        lease = leases(w).CreateLease(lease_pb2.CreateLeaseRequest(gpu_count=1), metadata=md, timeout=10)
        leases(w).ReleaseLease(lease_pb2.ReleaseLeaseRequest(name=lease.lease.name), metadata=md, timeout=10)

    def release(w: World, md: Any, who: str) -> None:
        name = w.fresh_lease() if who == "tenant" else w.lease
        leases(w).ReleaseLease(lease_pb2.ReleaseLeaseRequest(name=name), metadata=md, timeout=10)

    def revoke(w: World, md: Any, who: str) -> None:
        name = w.fresh_lease() if who == "admin" else w.lease
        admin(w).RevokeLease(admin_pb2.RevokeLeaseRequest(name=name), metadata=md, timeout=10)

    def node_state(rpc: str) -> Call:
        def call(w: World, md: Any, who: str) -> None:
            a = admin(w)
            if rpc == "cordon":
                a.CordonNode(admin_pb2.CordonNodeRequest(name=NODE), metadata=md, timeout=10)
            elif rpc == "drain":
                req = admin_pb2.DrainNodeRequest(name=NODE)
                req.grace.seconds = 3600
                a.DrainNode(req, metadata=md, timeout=10)
            a.UncordonNode(admin_pb2.UncordonNodeRequest(name=NODE), metadata=md, timeout=10)

        return call

    def delete_token(w: World, md: Any, who: str) -> None:
        name = "tokens/000000000000"
        if who == "admin":
            name = (
                admin(w)
                .CreateToken(
                    admin_pb2.CreateTokenRequest(kind=admin_pb2.TOKEN_KIND_TENANT, principal="gone"),
                    metadata=md,
                    timeout=10,
                )
                .token.name
            )
        admin(w).DeleteToken(admin_pb2.DeleteTokenRequest(name=name), metadata=md, timeout=10)

    def set_quota(w: World, md: Any, who: str) -> None:
        q = admin_pb2.Quota(name="quotas/tenants/dev", tenant=admin_pb2.TenantQuota(max_gpus=1000))
        admin(w).SetQuota(admin_pb2.SetQuotaRequest(quota=q), metadata=md, timeout=10)

    def reservations(w: World) -> reservation_pb2_grpc.ReservationServiceStub:
        return reservation_pb2_grpc.ReservationServiceStub(w.channel)

    def book(w: World, md: Any, who: str) -> None:
        booked = reservations(w).CreateReservation(_booking(), metadata=md, timeout=10).reservation
        req = reservation_pb2.CancelReservationRequest(name=booked.name)
        reservations(w).CancelReservation(req, metadata=md, timeout=10)

    def cancel(w: World, md: Any, who: str) -> None:
        # The tenant and an admin cancel a fresh booking of the tenant's; others try the kept one.
        name = w.fresh_reservation(w.tokens["tenant"]) if who in ("tenant", "admin") else w.reservation
        req = reservation_pb2.CancelReservationRequest(name=name)
        reservations(w).CancelReservation(req, metadata=md, timeout=10)

    def connect(w: World, md: Any, who: str) -> None:
        _first(node_pb2_grpc.NodeServiceStub(w.channel).Connect(iter([_hello()]), metadata=md, timeout=10))

    def keepalive(w: World, md: Any, who: str) -> None:
        reqs = iter([lease_pb2.KeepAliveRequest(name=w.lease)])
        _first(leases(w).KeepAlive(reqs, metadata=md, timeout=10))

    telemetry = telemetry_pb2.GetNodeTelemetryRequest(name=NODE)
    return {
        "NodeService.Connect": connect,
        "DiscoveryService.SearchOffers": lambda w, md, who: disc(w).SearchOffers(
            discovery_pb2.SearchOffersRequest(), metadata=md, timeout=10
        ),
        "DiscoveryService.GetNode": lambda w, md, who: disc(w).GetNode(
            discovery_pb2.GetNodeRequest(name=NODE), metadata=md, timeout=10
        ),
        "DiscoveryService.ListNodes": lambda w, md, who: disc(w).ListNodes(
            discovery_pb2.ListNodesRequest(), metadata=md, timeout=10
        ),
        "DiscoveryService.ListProviders": lambda w, md, who: disc(w).ListProviders(
            discovery_pb2.ListProvidersRequest(), metadata=md, timeout=10
        ),
        "DiscoveryService.SummarizeCapacity": lambda w, md, who: disc(w).SummarizeCapacity(
            discovery_pb2.SummarizeCapacityRequest(), metadata=md, timeout=10
        ),
        "DiscoveryService.WatchCapacity": lambda w, md, who: _first(
            disc(w).WatchCapacity(discovery_pb2.WatchCapacityRequest(), metadata=md, timeout=10)
        ),
        "LeaseService.CreateLease": create,
        "LeaseService.GetLease": lambda w, md, who: leases(w).GetLease(
            lease_pb2.GetLeaseRequest(name=w.lease), metadata=md, timeout=10
        ),
        "LeaseService.ListLeases": lambda w, md, who: leases(w).ListLeases(
            lease_pb2.ListLeasesRequest(), metadata=md, timeout=10
        ),
        "LeaseService.RenewLease": lambda w, md, who: leases(w).RenewLease(
            lease_pb2.RenewLeaseRequest(name=w.lease), metadata=md, timeout=10
        ),
        "LeaseService.KeepAlive": keepalive,
        "LeaseService.ReleaseLease": release,
        "LeaseService.WatchLease": lambda w, md, who: _first(
            leases(w).WatchLease(lease_pb2.WatchLeaseRequest(name=w.lease), metadata=md, timeout=10)
        ),
        "ReservationService.CreateReservation": book,
        "ReservationService.GetReservation": lambda w, md, who: reservations(w).GetReservation(
            reservation_pb2.GetReservationRequest(name=w.reservation), metadata=md, timeout=10
        ),
        "ReservationService.ListReservations": lambda w, md, who: reservations(w).ListReservations(
            reservation_pb2.ListReservationsRequest(), metadata=md, timeout=10
        ),
        "ReservationService.CancelReservation": cancel,
        "ReservationService.WatchReservation": lambda w, md, who: _first(
            reservations(w).WatchReservation(
                reservation_pb2.WatchReservationRequest(name=w.reservation), metadata=md, timeout=10
            )
        ),
        "TelemetryService.GetNodeTelemetry": lambda w, md, who: telemetry_pb2_grpc.TelemetryServiceStub(
            w.channel
        ).GetNodeTelemetry(telemetry, metadata=md, timeout=10),
        "AdminService.CordonNode": node_state("cordon"),
        "AdminService.UncordonNode": node_state("uncordon"),
        "AdminService.DrainNode": node_state("drain"),
        "AdminService.RevokeLease": revoke,
        "AdminService.ListUsageRecords": lambda w, md, who: admin(w).ListUsageRecords(
            admin_pb2.ListUsageRecordsRequest(), metadata=md, timeout=10
        ),
        "AdminService.CreateToken": lambda w, md, who: admin(w).CreateToken(
            admin_pb2.CreateTokenRequest(kind=admin_pb2.TOKEN_KIND_TENANT, principal="matrix"),
            metadata=md,
            timeout=10,
        ),
        "AdminService.ListTokens": lambda w, md, who: admin(w).ListTokens(
            admin_pb2.ListTokensRequest(), metadata=md, timeout=10
        ),
        "AdminService.DeleteToken": delete_token,
        "AdminService.SetQuota": set_quota,
        "AdminService.SetBurstPolicy": lambda w, md, who: admin(w).SetBurstPolicy(
            admin_pb2.SetBurstPolicyRequest(
                policy=admin_pb2.BurstPolicy(name="burstPolicies/dev", max_price_per_gpu_hour=9.0)
            ),
            metadata=md,
            timeout=10,
        ),
        "AdminService.GetBurstPolicy": lambda w, md, who: admin(w).GetBurstPolicy(
            admin_pb2.GetBurstPolicyRequest(name="burstPolicies/dev"), metadata=md, timeout=10
        ),
        "AdminService.ListAuditEvents": lambda w, md, who: admin(w).ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(), metadata=md, timeout=10
        ),
        "AdminService.GetCaller": lambda w, md, who: admin(w).GetCaller(
            admin_pb2.GetCallerRequest(), metadata=md, timeout=10
        ),
        "AdminService.SetGpuHealthy": lambda w, md, who: admin(w).SetGpuHealthy(
            admin_pb2.SetGpuHealthyRequest(
                node=NODE, gpu_uuid=FakeNvml("l40s-4").gpus[3].uuid, reason="inspected"
            ),
            metadata=md,
            timeout=10,
        ),
        "AdminService.GetQuota": lambda w, md, who: admin(w).GetQuota(
            admin_pb2.GetQuotaRequest(name="quotas/tenants/dev"), metadata=md, timeout=10
        ),
        "PeerService.ForwardNodeTelemetry": lambda w, md, who: peer_pb2_grpc.PeerServiceStub(
            w.channel
        ).ForwardNodeTelemetry(
            peer_pb2.ForwardNodeTelemetryRequest(request=telemetry), metadata=md, timeout=10
        ),
    }


CALLS = _calls()


@pytest.fixture(scope="module")
def world(etcd: EtcdCluster) -> Iterator[World]:
    prefix = unique_prefix()
    # Every cell of no, unknown and deleted tokens is a failed authentication from loopback.
    roomy = {"auth_failures_per_minute": 100_000}
    other = ReplicaThread(replica_config(etcd.endpoints, prefix, **roomy)).start()
    home = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=0.5, **roomy)).start()
    with Client(other.address, ADMIN_TOKEN) as a:
        tokens = {
            "tenant": a.create_token("tenant", "dev").secret,
            "other tenant": a.create_token("tenant", "eve").secret,
            "provider": a.create_token("provider", "neo").secret,
            "other provider": a.create_token("provider", "acme").secret,
            "deleted token": a.create_token("tenant", "former").secret,
        }
    daemon = DaemonThread(
        daemon_config([home.address], tokens["provider"], "neo", "n1", report_interval=0.5),
        FakeNvml("l40s-4"),
    ).start()
    with Client(home.address, tokens["tenant"]) as c:
        wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 4, timeout=20)
        lease = c.create_lease(1, ttl_s=600).name
        wait_until(lambda: c.node_telemetry(NODE).HasField("latest"), timeout=10)
        wait_until(lambda: reservations_open(c), timeout=20)  # the leader moved the prefix to schema 3
        reservation = c.create_reservation(1, time.time() + 2 * 86_400, 3600).name
    with Client(home.address, tokens["deleted token"]) as c:
        c.list_providers()  # known to the serving replica, then deleted on the other one
    with Client(other.address, ADMIN_TOKEN) as a:
        name = next(
            t.name
            for t in a.call(a.admin.ListTokens, admin_pb2.ListTokensRequest()).tokens
            if t.principal == "former"
        )
        a.call(a.admin.DeleteToken, admin_pb2.DeleteTokenRequest(name=name))
    with Client(home.address, tokens["deleted token"], retries=0) as c:
        wait_until(lambda: _refused(c), timeout=10)
    tokens.update(
        {"no token": "", "unknown token": "gpf_000000000000_nope", "admin": ADMIN_TOKEN, "peer": PEER_TOKEN}
    )
    channel = grpc.insecure_channel(home.address)
    yield World(channel, tokens, lease, reservation)
    channel.close()
    daemon.stop()
    home.stop()
    other.stop()


def _refused(c: Client) -> bool:
    try:
        c.list_providers()
    except Exception as e:
        return bool(getattr(e, "code", None) == UNAUTH)
    return False


def test_every_rpc_of_the_table_has_a_call_in_the_matrix() -> None:
    assert set(CALLS) == set(TABLE)


@pytest.mark.parametrize("method", sorted(TABLE))
def test_each_caller_gets_the_code_the_table_and_ownership_say(world: World, method: str) -> None:
    got: dict[str, grpc.StatusCode] = {}
    for caller in CALLERS:
        try:
            CALLS[method](world, world.md(world.tokens[caller]), caller)
            got[caller] = OK
        except grpc.RpcError as e:
            got[caller] = e.code()
    assert got == {caller: expected(method, caller) for caller in CALLERS}
