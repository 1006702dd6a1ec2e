"""Private pools: nodes registered with a provider token private to a tenant are that tenant's
alone. No other tenant and no other provider sees them in any read, counts included; only the
tenant leases them. The read RPCs come from the authorization table, so a new one must be
covered here before this test passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from control_plane.authorization import PRIVILEGED, TABLE
from gpufed.client import Client, GpufedError
from gpufed.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
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
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    metadata,
    replica_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration

POOL_NODES = ("providers/acme-own/nodes/p1", "providers/acme-own/nodes/p2")
# RPCs that change state: everything else in the table is a read and must be in READS.
WRITES = {
    "NodeService.Connect",
    "LeaseService.CreateLease",
    "LeaseService.RenewLease",
    "LeaseService.KeepAlive",
    "LeaseService.ReleaseLease",
    "ReservationService.CreateReservation",
    "ReservationService.CancelReservation",
    "AdminService.SetBurstPolicy",
}


@dataclass
class Pool:
    address: str
    tokens: dict[str, str]  # caller -> secret
    pool_gpus: set[str]
    acme_lease: str


def _stubs(p: Pool) -> tuple[Any, ...]:
    ch = grpc.insecure_channel(p.address)
    return (
        ch,
        discovery_pb2_grpc.DiscoveryServiceStub(ch),
        lease_pb2_grpc.LeaseServiceStub(ch),
        admin_pb2_grpc.AdminServiceStub(ch),
        telemetry_pb2_grpc.TelemetryServiceStub(ch),
        peer_pb2_grpc.PeerServiceStub(ch),
        reservation_pb2_grpc.ReservationServiceStub(ch),
    )


def _read(p: Pool, who: str, call: Callable[..., Any]) -> str:
    """The text of the answer (messages of a stream for 1.5 s), or the error's code."""
    ch, *stubs = _stubs(p)
    try:
        out = call(*stubs, metadata(p.tokens[who]))
        if hasattr(out, "__next__"):
            texts: list[str] = []
            try:
                for msg in out:  # until the call's deadline: the snapshot and what follows
                    texts.append(str(msg))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    texts.append(f"error {e.code().name}")
            return "\n".join(texts)
        return str(out)
    except grpc.RpcError as e:
        return f"error {e.code().name}"  # an error names only what the caller asked for
    finally:
        ch.close()


ACME_LEASE: list[str] = [""]  # set by the fixture: a lease of acme on its pool (another ended before)
ACME_RESERVATION: list[str] = [""]  # set by the fixture: a booking of acme's on its pool
READS: dict[str, Callable[..., Any]] = {
    "DiscoveryService.SearchOffers": lambda d, ls, a, t, r, rs, md: d.SearchOffers(
        discovery_pb2.SearchOffersRequest(page_size=1000), metadata=md
    ),
    "DiscoveryService.GetNode": lambda d, ls, a, t, r, rs, md: d.GetNode(
        discovery_pb2.GetNodeRequest(name=POOL_NODES[0]), metadata=md
    ),
    "DiscoveryService.ListNodes": lambda d, ls, a, t, r, rs, md: d.ListNodes(
        discovery_pb2.ListNodesRequest(page_size=1000), metadata=md
    ),
    "DiscoveryService.ListProviders": lambda d, ls, a, t, r, rs, md: d.ListProviders(
        discovery_pb2.ListProvidersRequest(), metadata=md
    ),
    "DiscoveryService.SummarizeCapacity": lambda d, ls, a, t, r, rs, md: d.SummarizeCapacity(
        discovery_pb2.SummarizeCapacityRequest(), metadata=md
    ),
    "DiscoveryService.WatchCapacity": lambda d, ls, a, t, r, rs, md: d.WatchCapacity(
        discovery_pb2.WatchCapacityRequest(), metadata=md, timeout=1.5
    ),
    "LeaseService.GetLease": lambda d, ls, a, t, r, rs, md: ls.GetLease(
        lease_pb2.GetLeaseRequest(name=ACME_LEASE[0]), metadata=md
    ),
    "LeaseService.ListLeases": lambda d, ls, a, t, r, rs, md: ls.ListLeases(
        lease_pb2.ListLeasesRequest(), metadata=md
    ),
    "LeaseService.WatchLease": lambda d, ls, a, t, r, rs, md: ls.WatchLease(
        lease_pb2.WatchLeaseRequest(name=ACME_LEASE[0]), metadata=md, timeout=1.5
    ),
    "ReservationService.GetReservation": lambda d, ls, a, t, r, rs, md: rs.GetReservation(
        reservation_pb2.GetReservationRequest(name=ACME_RESERVATION[0]), metadata=md
    ),
    "ReservationService.ListReservations": lambda d, ls, a, t, r, rs, md: rs.ListReservations(
        reservation_pb2.ListReservationsRequest(), metadata=md
    ),
    "ReservationService.WatchReservation": lambda d, ls, a, t, r, rs, md: rs.WatchReservation(
        reservation_pb2.WatchReservationRequest(name=ACME_RESERVATION[0]), metadata=md, timeout=1.5
    ),
    "TelemetryService.GetNodeTelemetry": lambda d, ls, a, t, r, rs, md: t.GetNodeTelemetry(
        telemetry_pb2.GetNodeTelemetryRequest(name=POOL_NODES[0]), metadata=md
    ),
    "AdminService.ListUsageRecords": lambda d, ls, a, t, r, rs, md: a.ListUsageRecords(
        admin_pb2.ListUsageRecordsRequest(), metadata=md
    ),
    "AdminService.ListTokens": lambda d, ls, a, t, r, rs, md: a.ListTokens(
        admin_pb2.ListTokensRequest(), metadata=md
    ),
    "AdminService.GetBurstPolicy": lambda d, ls, a, t, r, rs, md: a.GetBurstPolicy(
        admin_pb2.GetBurstPolicyRequest(name="burstPolicies/acme"), metadata=md
    ),
    "AdminService.ListAuditEvents": lambda d, ls, a, t, r, rs, md: a.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(page_size=500), metadata=md
    ),
    "AdminService.GetCaller": lambda d, ls, a, t, r, rs, md: a.GetCaller(
        admin_pb2.GetCallerRequest(), metadata=md
    ),
    "AdminService.GetQuota": lambda d, ls, a, t, r, rs, md: a.GetQuota(
        admin_pb2.GetQuotaRequest(name="quotas/providers/acme-own"), metadata=md
    ),
    "PeerService.ForwardNodeTelemetry": lambda d, ls, a, t, r, rs, md: r.ForwardNodeTelemetry(
        peer_pb2.ForwardNodeTelemetryRequest(
            request=telemetry_pb2.GetNodeTelemetryRequest(name=POOL_NODES[0])
        ),
        metadata=md,
    ),
}


@pytest.fixture(scope="module")
def pool(etcd: EtcdCluster) -> Iterator[Pool]:
    r = ReplicaThread(replica_config(etcd.endpoints, unique_prefix(), report_interval=0.5)).start()
    daemons: list[DaemonThread] = []
    try:
        with Client(r.address, ADMIN_TOKEN) as admin:
            tokens = {
                "acme": admin.create_token("tenant", "acme").secret,
                "eve": admin.create_token("tenant", "eve").secret,
                "acme-own": admin.create_token("provider", "acme-own", private_to="acme").secret,
                "neo": admin.create_token("provider", "neo").secret,
                "admin": ADMIN_TOKEN,
            }
        for provider, node, country in (
            ("acme-own", "p1", "DE"),
            ("acme-own", "p2", "FR"),
            ("neo", "n1", "DE"),
        ):
            cfg = daemon_config([r.address], tokens[provider], provider, node, country=country)
            daemons.append(DaemonThread(cfg, FakeNvml("l40s-4", host=f"{provider}-{node}")).start())
        with Client(r.address, ADMIN_TOKEN) as admin:
            wait_until(lambda: len(admin.list_nodes(state=common_pb2.NODE_STATE_READY)) == 3, timeout=20)
            pool_gpus = {g.uuid for n in admin.list_nodes() if n.pool_tenant for g in n.gpus}
        assert len(pool_gpus) == 8
        with Client(r.address, tokens["acme"]) as acme:
            lease = acme.create_lease(4, ttl_s=30, providers=["acme-own"])
            ACME_LEASE[0] = lease.name
            acme.release_lease(lease.name)
            ACME_LEASE[0] = acme.create_lease(2, ttl_s=60, providers=["acme-own"]).name
            wait_until(lambda: _booked(acme), timeout=20)
        yield Pool(r.address, tokens, pool_gpus, ACME_LEASE[0])
    finally:
        for d in daemons:
            d.stop()
        r.stop()


def _booked(acme: Client) -> bool:
    """acme books a window on its pool once the leader moved the prefix to schema 3."""
    try:
        r = acme.create_reservation(2, time.time() + 86_400, 3600, providers=["acme-own"])
    except GpufedError as e:
        if e.reason == "UPGRADE_IN_PROGRESS":
            return False
        raise
    ACME_RESERVATION[0] = r.name
    return True


def test_every_read_rpc_of_the_authorization_table_is_covered() -> None:
    reads = {m for m in TABLE if m not in WRITES and m not in PRIVILEGED}
    assert reads == set(READS), f"cover these reads here: {sorted(reads - set(READS))}"


@pytest.mark.parametrize("caller", ["eve", "neo"])
@pytest.mark.parametrize("rpc", sorted(READS))
def test_no_other_tenant_or_provider_sees_the_pool_in_any_read(pool: Pool, caller: str, rpc: str) -> None:
    text = _read(pool, caller, READS[rpc])
    assert "acme-own" not in text and not [n for n in POOL_NODES if n in text]
    assert not [g for g in pool.pool_gpus if g in text], f"{rpc} shows a pool GPU to {caller}"
    assert pool.acme_lease.split("/")[1] not in text
    if rpc == "DiscoveryService.WatchCapacity" and caller == "eve":
        assert "SNAPSHOT_END" in text  # the watch was read, not refused


def test_the_pools_tenant_and_admins_see_it(pool: Pool) -> None:
    for who in ("acme", "admin"):
        offers = _read(pool, who, READS["DiscoveryService.SearchOffers"])
        assert "acme-own" in offers
        assert "acme-own" in _read(pool, who, READS["DiscoveryService.GetNode"])
    with Client(pool.address, pool.tokens["acme"]) as acme, Client(pool.address, pool.tokens["eve"]) as eve:
        # The pool's GPUs are in acme's totals only (the pool's 2 nodes hold 8, neo's 4).
        assert acme.summarize_capacity().total_gpus == 12
        assert eve.summarize_capacity().total_gpus == 4
        assert {p.provider for p in eve.list_providers()} == {"neo"}


def test_only_the_pools_tenant_leases_its_nodes(pool: Pool) -> None:
    with Client(pool.address, pool.tokens["eve"]) as eve:
        with pytest.raises(GpufedError) as e:
            eve.create_lease(1, ttl_s=30, countries=["FR"])  # FR has only the pool's p2
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        held = [eve.create_lease(1, ttl_s=30) for _ in range(4)]  # all 4 federation GPUs ...
        assert all(g.node == "providers/neo/nodes/n1" for lease in held for g in lease.gpus)
        with pytest.raises(GpufedError):
            eve.create_lease(1, ttl_s=30)  # ... and then nothing, though the pool has free GPUs
        for lease in held:
            eve.release_lease(lease.name)
    with Client(pool.address, pool.tokens["acme"]) as acme:
        lease = acme.create_lease(1, ttl_s=30, countries=["FR"])
        assert lease.gpus[0].node == POOL_NODES[1]
        acme.release_lease(lease.name)


def test_only_a_provider_token_can_be_private_and_the_cli_lists_the_pool(pool: Pool) -> None:
    import contextlib
    import io

    from gpufed import cli

    with Client(pool.address, ADMIN_TOKEN) as admin:
        with pytest.raises(GpufedError) as e:
            admin.create_token("tenant", "x", private_to="acme")
        assert e.value.reason == "PRIVATE_TO_NOT_PROVIDER"
        tokens = admin.call(admin.admin.ListTokens, admin_pb2.ListTokensRequest()).tokens
        assert {t.principal: t.private_to for t in tokens}["acme-own"] == "acme"
    for who, shown in (("acme", True), ("eve", False)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["--endpoint", pool.address, "--token", pool.tokens[who], "pool", "list"]) == 0
        assert (POOL_NODES[0] in out.getvalue()) is shown


def test_own_first_fills_the_pool_then_bursts_and_own_only_answers_failed_precondition(pool: Pool) -> None:
    with Client(pool.address, pool.tokens["acme"]) as acme:
        offers = list(acme.search_offers())
        kinds = [o.pool for o in offers]
        assert kinds == sorted(kinds) and kinds[0] == common_pb2.POOL_KIND_OWN  # own first
        assert {o.pool for o in acme.search_offers(pool="federation-only")} == {
            common_pb2.POOL_KIND_FEDERATION
        }
        free_own = sum(o.free_gpus for o in acme.search_offers(pool="own-only"))
        held = [acme.create_lease(1, ttl_s=30) for _ in range(free_own)]
        assert {g.pool for lease in held for g in lease.gpus} == {common_pb2.POOL_KIND_OWN}
        with pytest.raises(GpufedError) as e:
            acme.create_lease(1, ttl_s=30, pool="own-only")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        burst = acme.create_lease(1, ttl_s=30)  # the pool is full: the federation
        assert [(g.pool, g.node) for g in burst.gpus] == [
            (common_pb2.POOL_KIND_FEDERATION, "providers/neo/nodes/n1")
        ]
        # A SPREAD lease larger than what is left anywhere alone combines both only if allowed.
        acme.release_lease(held.pop().name)
        with pytest.raises(GpufedError):
            acme.create_lease(4, ttl_s=30, spread=True)  # 1 own + 3 federation free
        mixed = acme.create_lease(4, ttl_s=30, spread=True, allow_mixed=True)
        assert {g.pool for g in mixed.gpus} == {common_pb2.POOL_KIND_OWN, common_pb2.POOL_KIND_FEDERATION}
        for lease in [*held, burst, mixed]:
            acme.release_lease(lease.name)
    with Client(pool.address, ADMIN_TOKEN) as admin:
        records = admin.call(admin.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest(page_size=1000))
        by_provider = {(u.lease, u.provider): u.pool for u in records.usage_records}
    assert by_provider[(burst.name, "neo")] == common_pb2.POOL_KIND_FEDERATION
    assert by_provider[(held[0].name, "acme-own")] == common_pb2.POOL_KIND_OWN


def test_bursting_stays_within_the_tenants_price_and_countries(pool: Pool) -> None:
    with Client(pool.address, pool.tokens["acme"]) as acme, Client(pool.address, pool.tokens["eve"]) as eve:
        free_own = sum(o.free_gpus for o in acme.search_offers(pool="own-only"))
        held = [acme.create_lease(1, ttl_s=30) for _ in range(free_own)]  # the pool is full
        try:
            for policy in ({"max_price_per_gpu_hour": 1.0}, {"countries": ["FR", "NL"]}):
                acme.set_burst_policy("acme", **policy)
                # neo's n1 (DE, 2.0/h) is outside the policy: no burst, and no offer of it.
                assert not [o for o in acme.search_offers() if o.pool == common_pb2.POOL_KIND_FEDERATION]
                with pytest.raises(GpufedError) as e:
                    acme.create_lease(1, ttl_s=30)
                assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            acme.set_burst_policy("acme", max_price_per_gpu_hour=2.5, countries=["DE"])
            burst = acme.create_lease(1, ttl_s=30)
            assert burst.gpus[0].pool == common_pb2.POOL_KIND_FEDERATION
            held.append(burst)
            got = acme.get_burst_policy("acme")
            assert (got.max_price_per_gpu_hour, list(got.countries)) == (2.5, ["DE"])
            # Only acme (and admins) read or set acme's policy; others' leases are not limited by it.
            with pytest.raises(GpufedError) as e:
                eve.set_burst_policy("acme", max_price_per_gpu_hour=0.1)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            lease = eve.create_lease(1, ttl_s=30)
            eve.release_lease(lease.name)
        finally:
            acme.set_burst_policy("acme")  # no limits again
            for lease in held:
                acme.release_lease(lease.name)
