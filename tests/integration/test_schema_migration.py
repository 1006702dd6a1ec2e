"""The schema key, the member keys and the leader's migration, against a real etcd (replicas of
this tree; tests/upgrade runs them beside the previous release)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import etcd3
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.app import leader as leader_mod
from control_plane.domain.schema import DONE, MIGRATING, SCHEMA, SchemaState
from gpufed import __version__
from gpufed.client import Client, GpufedError
from gpufed.v1 import discovery_pb2, discovery_pb2_grpc
from tests.harness import (
    ADMIN_TOKEN,
    EtcdCluster,
    ReplicaThread,
    channel,
    one_node,
    replica_config,
    wait_until,
)


@pytest.fixture(autouse=True)
def _quick_schema_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader_mod, "SCHEMA_CHECK_S", 0.2)


@pytest.fixture
def kv(etcd: EtcdCluster) -> Iterator[etcd3.Etcd3Client]:
    client = etcd3.client("127.0.0.1", etcd.members[0].client_port, timeout=5)
    yield client
    client.close()


def _json(kv: etcd3.Etcd3Client, key: str) -> dict[str, object]:
    value, _ = kv.get(key)
    assert value is not None, key
    return json.loads(value)  # type: ignore[no-any-return]


def _records(kv: etcd3.Etcd3Client, prefix: str) -> dict[str, dict[str, object]]:
    out = {}
    for d in ("tokens", "quotas", "burst"):
        for value, meta in kv.get_prefix(f"{prefix}/{d}/"):
            out[meta.key.decode()] = json.loads(value)
    return out


def _health(address: str) -> int:
    with channel(address) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="")).status)


def test_the_leader_migrates_json_records_once_every_replica_understands_the_new_schema(
    etcd: EtcdCluster, prefix: str, kv: etcd3.Etcd3Client
) -> None:
    # A replica of a release before 0.2.0: a replica key on its session lease, no member key.
    old_lease = kv.lease(60)
    kv.put(f"{prefix}/replicas/old", "127.0.0.1:1", lease=old_lease)
    r = ReplicaThread(replica_config(etcd.endpoints, prefix)).start()
    try:
        with Client(r.address, ADMIN_TOKEN) as admin:
            tenant = admin.create_token("tenant", "acme").secret
            admin.set_quota("quotas/tenants/acme", max_gpus=7)
            admin.set_burst_policy("acme", max_price_per_gpu_hour=3.0, countries=["DE"])
        member = _json(kv, f"{prefix}/members/{r.config.replica_id}")
        assert member["release"] == __version__ and member["schema"] == SCHEMA
        # While the old replica lives, records keep the shape it reads, and no migration starts.
        wait_until(lambda: r.replica is not None and r.replica.leader.is_leader.is_set())
        records = _records(kv, prefix)
        assert len(records) == 3 and all("v" not in rec for rec in records.values())
        assert kv.get(f"{prefix}/schema")[0] is None
        # The old replica is upgraded (its key goes): the leader migrates, then says done.
        kv.revoke_lease(old_lease.id)
        wait_until(
            lambda: (
                kv.get(f"{prefix}/schema")[0] is not None and _json(kv, f"{prefix}/schema")["state"] == DONE
            )
        )
        state = _json(kv, f"{prefix}/schema")
        assert state["version"] == SCHEMA and state["release"] == __version__
        migrated = _records(kv, prefix)
        assert migrated.keys() == records.keys()
        for key, rec in migrated.items():
            assert rec.pop("v") == 2
            assert rec == records[key], "the migration changed more than the record's version"
        assert r.replica is not None and r.replica.leader.migration.migrated == 3
        # Nothing was lost: the token still authenticates, the quota still binds.
        with Client(r.address, tenant) as c:
            c.search_offers()
        with Client(r.address, ADMIN_TOKEN) as admin:
            assert admin.get_quota("quotas/tenants/acme").quota.tenant.max_gpus == 7
            admin.create_token("tenant", "later")
        # Writers write the new shape now.
        later = [rec for rec in _records(kv, prefix).values() if rec.get("principal") == "later"]
        assert later and later[0]["v"] == 2
    finally:
        r.stop()


def test_a_migrated_leader_reads_nothing_from_etcd_between_checks(replica: ReplicaThread) -> None:
    # Once the watched index says done, a check is free: no background reads that would load
    # etcd every SCHEMA_CHECK_S or skew a page's read count (tests/integration/test_list_pages).
    r = replica.replica
    assert r is not None
    wait_until(lambda: r.leader.is_leader.is_set() and r.inventory.schema is not None)
    wait_until(lambda: json.loads(r.inventory.schema or b"{}").get("state") == DONE)
    before = r.store.keys_read
    assert replica.call(r.leader.migration.step()) == ""
    assert r.store.keys_read == before


def test_a_replica_finding_a_newer_schema_writes_nothing_and_says_why(
    etcd: EtcdCluster, prefix: str, kv: etcd3.Etcd3Client
) -> None:
    newer = SchemaState(SCHEMA + 1, MIGRATING, "9.0.0").to_json()
    kv.put(f"{prefix}/schema", newer)
    r = ReplicaThread(replica_config(etcd.endpoints, prefix)).start()
    try:
        member = _json(kv, f"{prefix}/members/{r.config.replica_id}")
        assert f"schema {SCHEMA + 1}" in str(member["refusing"])
        assert _health(r.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        before = {meta.key for _, meta in kv.get_prefix(prefix + "/")}
        with Client(r.address, ADMIN_TOKEN) as admin, pytest.raises(GpufedError) as e:
            admin.create_token("tenant", "acme")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.reason == "SCHEMA_TOO_NEW"
        assert "9.0.0" in e.value.message
        # Reads go on (and say which release answered).
        with channel(r.address) as ch:
            resp = discovery_pb2_grpc.DiscoveryServiceStub(ch).ListProviders(
                discovery_pb2.ListProvidersRequest(), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)
            )
        assert resp.replica_version == __version__
        assert {meta.key for _, meta in kv.get_prefix(prefix + "/")} == before
        assert kv.get(f"{prefix}/leader")[0] is None, "a refusing replica must not lead"
        # The newer release rolled back (etcd restored): this replica writes again.
        kv.delete(f"{prefix}/schema")
        wait_until(lambda: _health(r.address) == health_pb2.HealthCheckResponse.SERVING)
        with Client(r.address, ADMIN_TOKEN) as admin:
            admin.create_token("tenant", "acme")
        assert "refusing" not in _json(kv, f"{prefix}/members/{r.config.replica_id}")
    finally:
        r.stop()


def test_get_node_and_list_providers_say_which_release_answered(replica: ReplicaThread) -> None:
    with one_node(replica.address) as tenant, channel(replica.address) as ch:
        stub = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        md = (("authorization", f"Bearer {tenant}"),)
        node = stub.GetNode(discovery_pb2.GetNodeRequest(name="providers/neo/nodes/n1"), metadata=md)
        assert node.replica_version == __version__ and node.node.daemon_version == __version__
        providers = stub.ListProviders(discovery_pb2.ListProvidersRequest(), metadata=md)
        assert providers.replica_version == __version__
