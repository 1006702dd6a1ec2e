"""Quotas on a real federation: one test per limit, set through AdminService.SetQuota, each
exceeded with its RESOURCE_EXHAUSTED reason, and the lease quota exact across two replicas."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gpufed import __version__
from gpufed.client import Client, GpufedError
from gpufed.errors import error_reason, retry_delay
from gpufed.v1 import (
    admin_pb2,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from tests.harness import ADMIN_TOKEN, EtcdCluster, metadata, unique_prefix, wait_until
from tests.integration.federation import Federation, start_federation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fed(etcd: EtcdCluster) -> Iterator[Federation]:
    f = start_federation(etcd, unique_prefix())
    with f.client() as c:
        wait_until(lambda: len(c.list_nodes()) == 5, timeout=20)
    yield f
    f.stop()


def _tenant(fed: Federation, name: str, **limits: float) -> str:
    """A fresh tenant with its own quota; its token."""
    with fed.admin() as admin:
        token = admin.create_token("tenant", name).secret
        admin.set_quota(f"quotas/tenants/{name}", **limits)
    return token


def _exhausted(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    return e.value


def _create(token: str, addr: str, gpus: int = 1) -> lease_pb2.Lease:
    with Client(addr, token, retries=0) as c:
        return c.create_lease(gpus, ttl_s=30)


def test_active_leases_past_the_quota_are_refused_until_one_ends(fed: Federation) -> None:
    token = _tenant(fed, "q-leases", max_leases=2)
    addr = fed.replicas[0].address
    first = _create(token, addr)
    _create(token, addr)
    with pytest.raises(GpufedError) as e:
        _create(token, addr)
    assert (e.value.code, e.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_LEASES")
    with Client(addr, token) as c:
        c.release_lease(first.name)
    assert _create(token, addr).state == lease_pb2.LEASE_STATE_ACTIVE


def test_gpus_held_past_the_quota_are_refused(fed: Federation) -> None:
    token = _tenant(fed, "q-gpus", max_gpus=4)
    addr = fed.replicas[1].address
    _create(token, addr, 3)
    with pytest.raises(GpufedError) as e:
        _create(token, addr, 2)
    assert e.value.reason == "QUOTA_GPUS"
    assert _create(token, addr, 1).gpus  # exactly up to the quota


def test_the_lease_quota_is_exact_when_two_replicas_grant_at_once(fed: Federation) -> None:
    token = _tenant(fed, "q-exact", max_leases=5)
    granted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with Client(fed.replicas[i % 2].address, token, retries=3) as c:
            try:
                lease = c.create_lease(1, ttl_s=30)
                with lock:
                    granted.append(lease.name)
            except GpufedError as e:
                with lock:
                    refused.append(e.reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(granted) == 5, (granted, refused)
    assert set(refused) == {"QUOTA_LEASES"}
    with fed.admin() as admin:
        assert admin.get_quota("quotas/tenants/q-exact").active_leases == 5


def test_create_lease_past_the_rate_is_rate_limited_with_a_retry_info(fed: Federation) -> None:
    token = _tenant(fed, "q-rate", create_leases_per_second=0.5, create_leases_burst=2)
    stub = lease_pb2_grpc.LeaseServiceStub(grpc.insecure_channel(fed.replicas[0].address))
    req = lease_pb2.CreateLeaseRequest(gpu_count=1)
    stub.CreateLease(req, metadata=metadata(token), timeout=10)
    stub.CreateLease(req, metadata=metadata(token), timeout=10)
    err = _exhausted(lambda: stub.CreateLease(req, metadata=metadata(token), timeout=10))
    assert error_reason(err) == "RATE_LIMITED"
    delay = retry_delay(err)
    assert delay is not None and 0 < delay <= 2.0


def test_the_sdk_waits_out_a_rate_limit_it_was_told_about(fed: Federation) -> None:
    token = _tenant(fed, "q-rate-sdk", create_leases_per_second=2, create_leases_burst=1)
    with Client(fed.replicas[0].address, token, retries=2) as c:
        c.create_lease(1, ttl_s=30)
        t0 = time.monotonic()
        c.create_lease(1, ttl_s=30)  # refused once, then granted after the RetryInfo's delay
        assert time.monotonic() - t0 >= 0.3


def test_streams_past_the_quota_are_refused(fed: Federation) -> None:
    token = _tenant(fed, "q-streams", max_streams=1)
    lease = _create(token, fed.replicas[0].address)
    stub = lease_pb2_grpc.LeaseServiceStub(grpc.insecure_channel(fed.replicas[0].address))
    first = stub.WatchLease(lease_pb2.WatchLeaseRequest(name=lease.name), metadata=metadata(token))
    assert next(first).type == lease_pb2.WatchLeaseResponse.EVENT_TYPE_GRANTED
    second = stub.WatchLease(lease_pb2.WatchLeaseRequest(name=lease.name), metadata=metadata(token))
    err = _exhausted(lambda: next(second))
    assert error_reason(err) == "TOO_MANY_STREAMS"
    first.cancel()
    # The slot comes back when the stream ends.
    wait_until(lambda: _opens(stub, lease.name, token), timeout=5)


def _opens(stub: lease_pb2_grpc.LeaseServiceStub, name: str, token: str) -> bool:
    stream = stub.WatchLease(lease_pb2.WatchLeaseRequest(name=name), metadata=metadata(token))
    try:
        next(stream)
        return True
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()


def _hello(provider: str, node: str, gpus: int) -> node_pb2.NodeMessage:
    hello = node_pb2.NodeHello(
        provider=provider,
        node_id=node,
        location=common_pb2.Location(country_code="DE", region="eu-central"),
        price_per_gpu_hour=1.0,
        currency_code="USD",
        daemon_version=__version__,
    )
    for i in range(gpus):
        hello.gpus.add(
            uuid=f"GPU-{node}-{i:04d}",
            index=i,
            model="NVIDIA H100 80GB HBM3",
            memory_total_bytes=80 << 30,
            health=common_pb2.GPU_HEALTH_HEALTHY,
        )
    return node_pb2.NodeMessage(hello=hello)


def _connect(
    addr: str, token: str, *messages: node_pb2.NodeMessage, hold: float = 0.0
) -> grpc.RpcError | None:
    """Send the messages on one Connect stream (then keep it open `hold` s); its error, if any."""
    stub = node_pb2_grpc.NodeServiceStub(grpc.insecure_channel(addr))

    def gen() -> Iterator[node_pb2.NodeMessage]:
        yield from messages
        time.sleep(hold)

    try:
        for _ in stub.Connect(gen(), metadata=metadata(token), timeout=hold + 5):
            pass
    except grpc.RpcError as e:
        return e
    return None


def _provider(fed: Federation, name: str, **limits: float) -> str:
    with fed.admin() as admin:
        token = admin.create_token("provider", name).secret
        admin.set_quota(f"quotas/providers/{name}", **limits)
    return token


def test_a_node_past_the_providers_node_quota_is_refused(fed: Federation) -> None:
    token = _provider(fed, "q-nodes", max_nodes=1)
    addr = fed.replicas[0].address
    holder = threading.Thread(
        target=_connect, args=(addr, token, _hello("q-nodes", "a", 2)), kwargs={"hold": 3}
    )
    holder.start()
    with fed.admin() as admin:
        wait_until(lambda: admin.get_quota("quotas/providers/q-nodes").nodes == 1, timeout=5)
    err = _connect(addr, token, _hello("q-nodes", "b", 2))
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(err) == "QUOTA_NODES"
    # The registered node itself may reconnect.
    holder.join()
    again = _connect(addr, token, _hello("q-nodes", "a", 2), hold=0.5)
    assert again is None or again.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_hello_with_more_gpus_than_the_quota_is_refused(fed: Federation) -> None:
    token = _provider(fed, "q-gpn", max_gpus_per_node=4)
    err = _connect(fed.replicas[1].address, token, _hello("q-gpn", "big", 8))
    assert err is not None and error_reason(err) == "QUOTA_NODE_GPUS"
    with fed.admin() as admin:
        assert admin.get_quota("quotas/providers/q-gpn").nodes == 0  # nothing was written


def test_reports_past_the_rate_end_the_stream_rate_limited(fed: Federation) -> None:
    token = _provider(fed, "q-reports", reports_per_second=1, report_burst=3)
    report = node_pb2.NodeMessage(report=common_pb2.NodeReport())
    err = _connect(fed.replicas[0].address, token, _hello("q-reports", "r", 1), *[report] * 10, hold=1)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(err) == "RATE_LIMITED" and retry_delay(err) is not None


def test_quotas_are_read_by_their_owner_and_set_by_admins_only(fed: Federation) -> None:
    token = _tenant(fed, "q-own", max_gpus=7)
    with Client(fed.replicas[1].address, token) as c:
        got = c.get_quota("quotas/tenants/q-own")  # the other replica: the watch delivered it
        assert got.quota.tenant.max_gpus == 7 and got.quota.tenant.max_leases > 0  # default merged
        with pytest.raises(GpufedError) as e:
            c.get_quota("quotas/tenants/someone-else")
        assert e.value.reason == "OTHER_PRINCIPAL"
        with pytest.raises(GpufedError) as e:
            c.set_quota("quotas/tenants/q-own", max_gpus=1000)
        assert e.value.reason == "WRONG_TOKEN_KIND"


@pytest.mark.parametrize(
    ("name", "limits", "field"),
    [
        ("quotas/tenants/x", {"max_gpus": 100_001}, "tenant.max_gpus"),
        ("quotas/tenants/x", {"create_leases_per_second": float("nan")}, "tenant.create_leases_per_second"),
        ("quotas/providers/x", {"max_gpus_per_node": 5000}, "provider.max_gpus_per_node"),
        ("quotas/tenants/X Y", {"max_gpus": 1}, "name"),
        ("quotas/users/x", {}, "name"),
    ],
)
def test_a_quota_out_of_bounds_is_invalid_and_changes_nothing(
    fed: Federation, name: str, limits: dict[str, float], field: str
) -> None:
    ch = grpc.insecure_channel(fed.replicas[0].address)
    from gpufed.v1 import admin_pb2_grpc

    stub = admin_pb2_grpc.AdminServiceStub(ch)
    quota = admin_pb2.Quota(name=name)
    part = quota.provider if "/providers/" in name else quota.tenant
    part.SetInParent()
    for k, v in limits.items():
        setattr(part, k, v)
    with pytest.raises(grpc.RpcError) as e:
        stub.SetQuota(admin_pb2.SetQuotaRequest(quota=quota), metadata=metadata(ADMIN_TOKEN), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(e.value) == "INVALID_QUOTA"
    status = rpc_status.from_call(e.value)
    assert status is not None
    violations = [
        v.field
        for d in status.details
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for v in _unpack_bad_request(d).field_violations
    ]
    assert violations == [field]


def _unpack_bad_request(detail: object) -> error_details_pb2.BadRequest:
    out = error_details_pb2.BadRequest()
    detail.Unpack(out)  # type: ignore[attr-defined]
    return out


def test_renewals_past_the_tenants_rate_are_rate_limited_on_both_rpcs(fed: Federation) -> None:
    token = _tenant(fed, "q-renewals", renewals_per_second=1, renewal_burst=3)
    addr = fed.replicas[0].address
    lease = _create(token, addr)
    with grpc.insecure_channel(addr) as ch:
        stub = lease_pb2_grpc.LeaseServiceStub(ch)
        answers = list(
            stub.KeepAlive(iter([lease_pb2.KeepAliveRequest(name=lease.name)] * 5), metadata=metadata(token))
        )
        assert [a.error for a in answers] == ["", "", "", "RATE_LIMITED", "RATE_LIMITED"]
        e = _exhausted(
            lambda: stub.RenewLease(lease_pb2.RenewLeaseRequest(name=lease.name), metadata=metadata(token))
        )
        assert error_reason(e) == "RATE_LIMITED" and retry_delay(e) is not None


def test_a_renewal_that_moves_expire_time_by_less_than_a_tenth_of_the_ttl_writes_nothing(
    fed: Federation, etcd: EtcdCluster
) -> None:
    import etcd3

    token = _tenant(fed, "q-noop-renewals")
    host, port = etcd.endpoints[0].rsplit(":", 1)
    kv = etcd3.client(host=host, port=int(port))
    replica = fed.replicas[0].replica
    assert replica is not None
    with Client(fed.replicas[0].address, token) as c:
        lease = c.create_lease(1, ttl_s=30)
        key = replica.store.keys.lease(lease.name.split("/")[1])
        for _ in range(20):  # a tight loop, all within 3 s (a tenth of the ttl)
            assert c.renew_lease(lease.name).expire_time == lease.expire_time
        assert c.get_lease(lease.name).expire_time == lease.expire_time
        _, meta = kv.get(key)
        assert meta is not None and meta.mod_revision == meta.create_revision  # never rewritten
        time.sleep(3.1)
        assert c.renew_lease(lease.name).expire_time.ToSeconds() >= lease.expire_time.ToSeconds() + 3
        c.release_lease(lease.name)


def test_list_and_summary_calls_past_the_tenants_read_budget_are_rate_limited(fed: Federation) -> None:
    token = _tenant(fed, "q-reads", reads_per_second=0.5, read_burst=3)
    with grpc.insecure_channel(fed.replicas[0].address) as ch:
        disc = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        md = metadata(token)
        disc.SummarizeCapacity(discovery_pb2.SummarizeCapacityRequest(), metadata=md)
        disc.ListNodes(discovery_pb2.ListNodesRequest(), metadata=md)
        disc.ListProviders(discovery_pb2.ListProvidersRequest(), metadata=md)
        e = _exhausted(lambda: disc.SummarizeCapacity(discovery_pb2.SummarizeCapacityRequest(), metadata=md))
        assert error_reason(e) == "RATE_LIMITED" and retry_delay(e) is not None
        # SearchOffers, which reads only what matches and is cached, is not charged.
        disc.SearchOffers(discovery_pb2.SearchOffersRequest(), metadata=md)
