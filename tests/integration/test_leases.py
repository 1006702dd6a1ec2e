"""Leases against real etcd and two replicas: constraints, release, expiry, renewal,
idempotency, isolation, operator actions, usage records, events, bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from gpufed.client import Client, GpufedError, InvalidArgument, NoCapacity, NotFound
from gpufed.errors import error_reason
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2, lease_pb2_grpc
from tests.harness import metadata, wait_until
from tests.integration.federation import Federation

pytestmark = pytest.mark.integration
LeaseW = lease_pb2.WatchLeaseResponse


@pytest.fixture
def dev(fed: Federation) -> Iterator[Client]:
    with fed.client(0) as c:
        yield c


@pytest.fixture
def dev_b(fed: Federation) -> Iterator[Client]:
    """The same tenant through the other replica."""
    with fed.client(1) as c:
        yield c


def free_on(c: Client, node_id: str) -> int:
    return sum(o.free_gpus for o in c.search_offers(include_degraded=True) if o.node_id == node_id)


def test_lease_is_granted_within_every_constraint_and_reported_to_the_node(
    dev: Client, fed: Federation
) -> None:
    lease = dev.create_lease(
        4,
        gpu_model="H100",
        countries=["DE", "FI"],
        exclude_countries=["FI"],
        min_gpu_memory_gb=70,
        providers=["neo"],
        max_price=3.0,
        labels={"tier": "premium"},
        near=(50.0, 8.0, 300.0),
    )
    try:
        assert lease.state == lease_pb2.LEASE_STATE_ACTIVE
        assert len(lease.gpus) == 4
        assert {g.node for g in lease.gpus} == {"providers/neo/nodes/fra-1"}
        assert all(g.model == "NVIDIA H100 80GB HBM3" and g.location.country_code == "DE" for g in lease.gpus)
        assert lease.price_per_hour == pytest.approx(4 * 2.9)
        assert lease.fencing_token > 0 and lease.ttl.seconds == 60
        session = fed.daemons["fra-1"].session
        wait_until(lambda: lease.name in session.assignments.active)  # type: ignore[attr-defined]
        assigned = session.assignments.active[lease.name]  # type: ignore[attr-defined]
        assert assigned.fencing_token == lease.fencing_token
        assert sorted(assigned.gpu_uuids) == sorted(g.uuid for g in lease.gpus)
    finally:
        dev.release_lease(lease.name)


def test_no_matching_capacity_is_failed_precondition(dev: Client) -> None:
    with pytest.raises(NoCapacity) as e:
        dev.create_lease(2, gpu_model="H100", countries=["US"])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason == "NO_MATCHING_CAPACITY"
    with pytest.raises(NoCapacity):
        dev.create_lease(9, gpu_model="H100")  # more than any one node has


def test_spread_places_a_gang_over_the_fewest_nodes(dev: Client) -> None:
    lease = dev.create_lease(12, spread=True, gpu_model="H100", include_degraded=True)
    try:
        nodes = {g.node for g in lease.gpus}
        assert len(nodes) == 2 and len(lease.gpus) == 12
        assert lease.placement == lease_pb2.PLACEMENT_SPREAD
    finally:
        dev.release_lease(lease.name)


def test_released_lease_frees_its_gpus_at_once_on_both_replicas(
    dev: Client, dev_b: Client, fed: Federation
) -> None:
    lease = dev.create_lease(8, gpu_model="A100")
    wait_until(lambda: free_on(dev_b, "par-1") == 0)
    released = dev.release_lease(lease.name)
    t0 = time.monotonic()
    assert released.state == lease_pb2.LEASE_STATE_ENDED
    assert released.end_reason == lease_pb2.LEASE_END_REASON_RELEASED
    wait_until(lambda: free_on(dev, "par-1") == 8 and free_on(dev_b, "par-1") == 8, timeout=2)
    assert time.monotonic() - t0 < 1.0
    # Idempotent: releasing again returns the same ended lease.
    again = dev.release_lease(lease.name)
    assert again.state == lease_pb2.LEASE_STATE_ENDED and again.end_time == released.end_time
    session = fed.daemons["par-1"].session
    wait_until(lambda: lease.name not in session.assignments.active)  # type: ignore[attr-defined]


def test_abandoned_lease_is_freed_within_ttl_plus_two_seconds(dev: Client, dev_b: Client) -> None:
    lease = dev.create_lease(2, gpu_model="L40S", ttl_s=5)
    granted = time.monotonic()
    assert free_on(dev_b, "ams-1") in (2, 4)  # the other replica may lag a moment
    wait_until(lambda: free_on(dev_b, "ams-1") == 4, timeout=10)
    assert time.monotonic() - granted < 5 + 2
    ended = wait_until_ended(dev, lease.name)
    assert ended.end_reason == lease_pb2.LEASE_END_REASON_EXPIRED


def test_an_expired_lease_reads_ended_expired_from_the_first_moment_never_not_found(
    dev: Client, dev_b: Client
) -> None:
    lease = dev.create_lease(1, gpu_model="L40S", ttl_s=5)
    seen: list[str] = []
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        for c in (dev, dev_b):
            try:
                got = c.get_lease(lease.name)
            except NotFound:
                seen.append("NOT_FOUND")
                continue
            seen.append(lease_pb2.LeaseState.Name(got.state))
            if got.state == lease_pb2.LEASE_STATE_ENDED:
                assert got.end_reason == lease_pb2.LEASE_END_REASON_EXPIRED
        if seen.count("LEASE_STATE_ENDED") >= 40:  # well past the history write
            break
        time.sleep(0.01)
    assert "NOT_FOUND" not in seen
    assert seen[-1] == "LEASE_STATE_ENDED"


def wait_until_ended(c: Client, name: str) -> lease_pb2.Lease:
    out: list[lease_pb2.Lease] = []

    def ended() -> bool:
        try:
            got = c.get_lease(name)
        except NotFound:
            return False
        out[:] = [got]
        return got.state == lease_pb2.LEASE_STATE_ENDED

    wait_until(ended, timeout=10)
    return out[0]


def test_renew_keeps_the_lease_alive_past_several_ttls(dev: Client, dev_b: Client) -> None:
    lease = dev.create_lease(1, gpu_model="L40S", ttl_s=5)
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            renewed = dev_b.renew_lease(lease.name)  # through the other replica
            assert renewed.expire_time.ToSeconds() >= time.time() + 3
            time.sleep(1.5)
        assert dev.get_lease(lease.name).state == lease_pb2.LEASE_STATE_ACTIVE
    finally:
        dev.release_lease(lease.name)


def test_keepalive_stream_renews_many_leases_and_reports_ended_ones(dev: Client, fed: Federation) -> None:
    a = dev.create_lease(1, gpu_model="L40S", ttl_s=5)
    b = dev.create_lease(1, gpu_model="L40S", ttl_s=5)
    dev.release_lease(b.name)
    with grpc.insecure_channel(fed.replicas[1].address) as ch:
        stub = lease_pb2_grpc.LeaseServiceStub(ch)
        reqs = [lease_pb2.KeepAliveRequest(name=n) for n in (a.name, b.name, "leases/00000000000000ff")]
        resps = list(stub.KeepAlive(iter(reqs), metadata=metadata(fed.tenant_token)))
    assert [r.name for r in resps] == [a.name, b.name, "leases/00000000000000ff"]
    assert resps[0].error == "" and resps[0].expire_time.ToSeconds() > time.time()
    assert resps[1].error == "LEASE_ENDED"
    assert resps[2].error == "LEASE_NOT_FOUND"
    dev.release_lease(a.name)


def test_retried_create_with_the_same_request_id_returns_the_same_lease(dev: Client, dev_b: Client) -> None:
    first = dev.create_lease(2, gpu_model="L40S", request_id="train-42")
    second = dev_b.create_lease(2, gpu_model="L40S", request_id="train-42")
    assert second.name == first.name and second.fencing_token == first.fencing_token
    assert len([x for x in dev.list_leases(lease_pb2.LEASE_STATE_ACTIVE) if x.request_id == "train-42"]) == 1
    dev.release_lease(first.name)
    # After it ended the request id still answers with that lease, not a new one.
    third = dev.create_lease(2, gpu_model="L40S", request_id="train-42")
    assert third.name == first.name and third.state == lease_pb2.LEASE_STATE_ENDED


def test_concurrent_retries_of_one_request_create_one_lease(fed: Federation) -> None:
    results: list[str] = []
    errors: list[Exception] = []

    def create(i: int) -> None:
        with fed.client(i % 2) as c:
            try:
                results.append(c.create_lease(1, gpu_model="A100", request_id="same-request").name)
            except GpufedError as e:
                errors.append(e)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    with fed.client() as c:
        c.release_lease(results[0])


def test_tenant_cannot_see_renew_or_release_another_tenants_lease(fed: Federation, dev: Client) -> None:
    lease = dev.create_lease(1, gpu_model="L40S")
    with fed.admin() as admin:
        other = admin.create_token("tenant", "other").secret
    try:
        with fed.client(1, token=other) as intruder:
            for op in (intruder.get_lease, intruder.renew_lease, intruder.release_lease):
                with pytest.raises(NotFound) as e:
                    op(lease.name)
                assert e.value.reason == "LEASE_NOT_FOUND"
            assert intruder.list_leases() == []
        assert dev.get_lease(lease.name).state == lease_pb2.LEASE_STATE_ACTIVE
    finally:
        dev.release_lease(lease.name)


def test_provider_token_cannot_create_leases(fed: Federation) -> None:
    with fed.client(0, token=fed.provider_tokens["neo"]) as p, pytest.raises(GpufedError) as e:
        p.create_lease(1)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=0), "INVALID_ARGUMENT", "INVALID_GPU_COUNT"),
        (lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=65), "RESOURCE_EXHAUSTED", "GANG_TOO_LARGE"),
        (
            lease_pb2.CreateLeaseRequest(request_id="r r", gpu_count=1),
            "INVALID_ARGUMENT",
            "INVALID_REQUEST_ID",
        ),
        (
            lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=1, ttl=duration_pb2.Duration(seconds=1)),
            "INVALID_ARGUMENT",
            "INVALID_TTL",
        ),
        (
            lease_pb2.CreateLeaseRequest(
                request_id="r", gpu_count=1, ttl=duration_pb2.Duration(seconds=86400)
            ),
            "INVALID_ARGUMENT",
            "INVALID_TTL",
        ),
        (
            lease_pb2.CreateLeaseRequest(
                request_id="r", gpu_count=1, filter=common_pb2.GpuFilter(countries=["ZZ"])
            ),
            "INVALID_ARGUMENT",
            "INVALID_COUNTRY_CODE",
        ),
        (
            lease_pb2.CreateLeaseRequest(request_id="r", gpu_count=1, placement=7),  # type: ignore[arg-type]
            "INVALID_ARGUMENT",
            "INVALID_PLACEMENT",
        ),
    ],
)
def test_bad_create_requests_get_a_reason_and_write_nothing(
    fed: Federation, request_: lease_pb2.CreateLeaseRequest, code: str, reason: str
) -> None:
    with grpc.insecure_channel(fed.replicas[0].address) as ch:
        stub = lease_pb2_grpc.LeaseServiceStub(ch)
        before = len(
            stub.ListLeases(lease_pb2.ListLeasesRequest(), metadata=metadata(fed.tenant_token)).leases
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateLease(request_, metadata=metadata(fed.tenant_token))
        after = len(
            stub.ListLeases(lease_pb2.ListLeasesRequest(), metadata=metadata(fed.tenant_token)).leases
        )
    assert e.value.code().name == code
    assert error_reason(e.value) == reason
    assert before == after


def test_malformed_lease_names_are_invalid_argument(dev: Client) -> None:
    for bad in ("lease/1", "leases/xyz", "leases/", ""):
        with pytest.raises(InvalidArgument) as e:
            dev.get_lease(bad)
        assert e.value.reason == "INVALID_LEASE_NAME"


def test_watch_lease_reports_granted_unhealthy_gpu_and_ended(fed: Federation, dev: Client) -> None:
    lease = dev.create_lease(8, gpu_model="H200", ttl_s=30)
    events: list[LeaseW] = []
    done = threading.Event()

    def watch() -> None:
        with fed.client(1) as c:
            for ev in c.watch_lease(lease.name):
                events.append(ev)
        done.set()

    t = threading.Thread(target=watch)
    t.start()
    wait_until(lambda: any(e.type == LeaseW.EVENT_TYPE_GRANTED for e in events))
    from node_daemon.fake_nvml import parse_event

    fed.fakes["nyc-1"].apply(parse_event("0:5:xid=48"))
    wait_until(lambda: any(e.type == LeaseW.EVENT_TYPE_GPU_UNHEALTHY for e in events), timeout=10)
    dev.renew_lease(lease.name)
    dev.release_lease(lease.name)
    assert done.wait(10)
    t.join()
    kinds = [e.type for e in events]
    assert kinds[0] == LeaseW.EVENT_TYPE_GRANTED and kinds[-1] == LeaseW.EVENT_TYPE_ENDED
    unhealthy = next(e for e in events if e.type == LeaseW.EVENT_TYPE_GPU_UNHEALTHY)
    assert unhealthy.gpu_uuid == lease.gpus[5].uuid or unhealthy.gpu_uuid in {g.uuid for g in lease.gpus}
    assert "XID_48" in unhealthy.message
    assert events[-1].lease.end_reason == lease_pb2.LEASE_END_REASON_RELEASED


def test_admin_revoke_cordon_drain_and_usage_records(fed: Federation, dev: Client) -> None:
    with fed.admin(1) as admin:
        lease = dev.create_lease(2, gpu_model="A100")
        revoked = admin.call(
            admin.admin.RevokeLease, admin_pb2.RevokeLeaseRequest(name=lease.name, reason="abuse")
        )
        assert revoked.lease.end_reason == lease_pb2.LEASE_END_REASON_REVOKED
        assert dev.get_lease(lease.name).state == lease_pb2.LEASE_STATE_ENDED

        node = "providers/neo/nodes/par-1"
        cordoned = admin.call(
            admin.admin.CordonNode, admin_pb2.CordonNodeRequest(name=node, reason="maintenance")
        )
        assert cordoned.node.state == common_pb2.NODE_STATE_CORDONED
        wait_until(lambda: "par-1" not in {o.node_id for o in dev.search_offers()})
        with pytest.raises(NoCapacity):
            dev.create_lease(1, gpu_model="A100")
        session = fed.daemons["par-1"].session
        wait_until(lambda: session.state.cordoned)  # type: ignore[attr-defined]
        admin.call(admin.admin.UncordonNode, admin_pb2.UncordonNodeRequest(name=node))
        wait_until(lambda: "par-1" in {o.node_id for o in dev.search_offers()})

        held = dev.create_lease(3, gpu_model="A100")
        drained = admin.call(
            admin.admin.DrainNode,
            admin_pb2.DrainNodeRequest(
                name=node, reason="decommission", grace=duration_pb2.Duration(seconds=1)
            ),
        )
        assert drained.node.state == common_pb2.NODE_STATE_DRAINING
        ended = wait_until_ended(dev, held.name)
        assert ended.end_reason == lease_pb2.LEASE_END_REASON_DRAINED
        admin.call(admin.admin.UncordonNode, admin_pb2.UncordonNodeRequest(name=node))

        def records() -> list[admin_pb2.UsageRecord]:
            resp = admin.call(admin.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest(provider="neo"))
            return [r for r in resp.usage_records if r.lease in (lease.name, held.name)]

        wait_until(lambda: len(records()) == 2)
        by_lease = {r.lease: r for r in records()}
        r = by_lease[held.name]
        assert r.provider == "neo" and r.tenant == "dev" and len(r.gpus) == 3
        assert r.gpu_seconds > 0 and r.quoted_cost == pytest.approx(1.8 * r.gpu_seconds / 3600, rel=1e-3)
        assert r.end_reason == lease_pb2.LEASE_END_REASON_DRAINED
    with fed.client(0, token=fed.provider_tokens["neo"]) as provider:
        own = provider.call(provider.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest())
        assert {x.provider for x in own.usage_records} == {"neo"}
        with pytest.raises(GpufedError) as e:
            provider.call(provider.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest(provider="acme"))
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_usage_record_for_an_expired_lease_is_written_exactly_once(fed: Federation, dev: Client) -> None:
    lease = dev.create_lease(1, gpu_model="L40S", ttl_s=5)
    wait_until_ended(dev, lease.name)
    with fed.admin() as admin:

        def mine() -> list[admin_pb2.UsageRecord]:
            resp = admin.call(
                admin.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest(provider="acme")
            )
            return [r for r in resp.usage_records if r.lease == lease.name]

        wait_until(lambda: len(mine()) == 1)
        time.sleep(1)
        assert len(mine()) == 1
        assert mine()[0].end_reason == lease_pb2.LEASE_END_REASON_EXPIRED


def _watch_in_background(fed: Federation, name: str) -> tuple[list[LeaseW], threading.Event]:
    events: list[LeaseW] = []
    done = threading.Event()

    def watch() -> None:
        with fed.client(1) as c:
            events.extend(c.watch_lease(name))
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    wait_until(lambda: bool(events))
    return events, done


def test_watch_of_a_lease_nobody_renews_is_granted_expiring_ended_never_renewed(
    fed: Federation, dev: Client
) -> None:
    lease = dev.create_lease(1, gpu_model="H100", ttl_s=5)
    events, done = _watch_in_background(fed, lease.name)
    assert done.wait(15)
    kinds = [LeaseW.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in events]
    assert kinds == ["GRANTED", "EXPIRING", "ENDED"]
    assert events[-1].lease.end_reason == lease_pb2.LEASE_END_REASON_EXPIRED
    assert events[-1].lease.end_time == lease.expire_time  # it ended when it expired


def test_a_renewal_moves_expire_time_exactly_and_alike_on_every_replica(
    fed: Federation, dev: Client, dev_b: Client
) -> None:
    lease = dev.create_lease(1, gpu_model="H100", ttl_s=5)
    assert (
        dev.get_lease(lease.name).expire_time == lease.expire_time == dev_b.get_lease(lease.name).expire_time
    )
    events, done = _watch_in_background(fed, lease.name)
    time.sleep(0.6)  # past a tenth of the ttl: a renewal closer than that writes nothing
    before = time.time_ns()
    renewed = dev.renew_lease(lease.name)
    after = time.time_ns()
    # the renewal's time plus the ttl: never past etcd's own expiry, never a whole second early
    assert before + 5 * 10**9 <= renewed.expire_time.ToNanoseconds() <= after + 5 * 10**9
    wait_until(lambda: any(e.type == LeaseW.EVENT_TYPE_RENEWED for e in events))
    assert (
        next(e for e in events if e.type == LeaseW.EVENT_TYPE_RENEWED).lease.expire_time
        == renewed.expire_time
    )
    assert (
        dev.get_lease(lease.name).expire_time
        == renewed.expire_time
        == dev_b.get_lease(lease.name).expire_time
    )
    dev.release_lease(lease.name)
    assert done.wait(10)
    assert [e.type for e in events].count(LeaseW.EVENT_TYPE_RENEWED) == 1


def test_create_without_a_request_id_grants_a_lease_each_time(fed: Federation) -> None:
    with grpc.insecure_channel(fed.replicas[0].address) as ch:
        stub = lease_pb2_grpc.LeaseServiceStub(ch)
        req = lease_pb2.CreateLeaseRequest(gpu_count=1, filter=common_pb2.GpuFilter(gpu_model="H100"))
        first = stub.CreateLease(req, metadata=metadata(fed.tenant_token)).lease
        second = stub.CreateLease(req, metadata=metadata(fed.tenant_token)).lease
        assert first.name != second.name and first.request_id == second.request_id == ""
        for lease in (first, second):
            ended = stub.ReleaseLease(
                lease_pb2.ReleaseLeaseRequest(name=lease.name), metadata=metadata(fed.tenant_token)
            ).lease
            assert ended.state == lease_pb2.LEASE_STATE_ENDED
