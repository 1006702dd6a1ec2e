"""The replica process as a user first meets it: reflection, health, authentication."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpufed.errors import error_reason
from gpufed.v1 import admin_pb2, admin_pb2_grpc, discovery_pb2, discovery_pb2_grpc
from tests.harness import EtcdCluster, ReplicaThread, metadata, replica_process, wait_until

pytestmark = pytest.mark.integration


def test_reflection_lists_every_gpufed_service_and_health(replica_channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(replica_channel)
    responses = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "gpufed.v1.NodeService",
        "gpufed.v1.DiscoveryService",
        "gpufed.v1.LeaseService",
        "gpufed.v1.TelemetryService",
        "gpufed.v1.AdminService",
        "gpufed.v1.PeerService",
        "grpc.health.v1.Health",
    } <= names


def test_health_check_answers_serving_without_a_token(replica_channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(replica_channel)
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    resp = stub.Check(health_pb2.HealthCheckRequest(service="gpufed.v1.LeaseService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_call_without_token_is_unauthenticated_with_reason(replica_channel: grpc.Channel) -> None:
    stub = discovery_pb2_grpc.DiscoveryServiceStub(replica_channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.ListProviders(discovery_pb2.ListProvidersRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(e.value) == "MISSING_TOKEN"


def test_call_with_unknown_token_is_unauthenticated(replica_channel: grpc.Channel) -> None:
    stub = discovery_pb2_grpc.DiscoveryServiceStub(replica_channel)
    for bad in ("nonsense", "gpf_abcdef012345_wrongsecret"):
        with pytest.raises(grpc.RpcError) as e:
            stub.ListProviders(discovery_pb2.ListProvidersRequest(), metadata=metadata(bad))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(e.value) == "UNKNOWN_TOKEN"


def test_a_denied_call_is_logged_with_the_callers_request_id(
    replica_channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = discovery_pb2_grpc.DiscoveryServiceStub(replica_channel)
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError):
        stub.ListProviders(
            discovery_pb2.ListProvidersRequest(),
            metadata=(*metadata("gpf_abcdef012345_wrongsecret"), ("x-request-id", "req-denied-1")),
        )
    # structlog hands the event to stdlib logging as a dict: the per-RPC fields are in it.
    denials = [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "access denied"
    ]
    assert len(denials) == 1, caplog.records
    assert denials[0]["request_id"] == "req-denied-1"
    assert denials[0]["method"] == "DiscoveryService.ListProviders"
    assert denials[0]["reason"] == "UNKNOWN_TOKEN"


def test_created_token_reaches_the_servicer_and_deleted_token_is_refused(
    replica_channel: grpc.Channel, admin_md: tuple[tuple[str, str]]
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(replica_channel)
    created = admin.CreateToken(
        admin_pb2.CreateTokenRequest(kind=admin_pb2.TOKEN_KIND_TENANT, principal="acme"), metadata=admin_md
    )
    assert created.secret.startswith("gpf_")
    disco = discovery_pb2_grpc.DiscoveryServiceStub(replica_channel)
    resp = disco.ListProviders(discovery_pb2.ListProvidersRequest(), metadata=metadata(created.secret))
    assert resp.revision > 0
    listed = admin.ListTokens(admin_pb2.ListTokensRequest(), metadata=admin_md)
    assert [t.principal for t in listed.tokens] == ["acme"]
    admin.DeleteToken(admin_pb2.DeleteTokenRequest(name=created.token.name), metadata=admin_md)
    with pytest.raises(grpc.RpcError) as e:
        disco.ListProviders(discovery_pb2.ListProvidersRequest(), metadata=metadata(created.secret))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenant_token_cannot_call_admin_rpcs(
    replica_channel: grpc.Channel, admin_md: tuple[tuple[str, str]]
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(replica_channel)
    tenant = admin.CreateToken(
        admin_pb2.CreateTokenRequest(kind=admin_pb2.TOKEN_KIND_TENANT, principal="acme"), metadata=admin_md
    ).secret
    with pytest.raises(grpc.RpcError) as e:
        admin.ListTokens(admin_pb2.ListTokensRequest(), metadata=metadata(tenant))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(e.value) == "WRONG_TOKEN_KIND"


def test_token_secret_is_stored_only_as_a_hash(
    replica_channel: grpc.Channel,
    admin_md: tuple[tuple[str, str]],
    etcd: EtcdCluster,
    prefix: str,
) -> None:
    import etcd3

    admin = admin_pb2_grpc.AdminServiceStub(replica_channel)
    secret = admin.CreateToken(
        admin_pb2.CreateTokenRequest(kind=admin_pb2.TOKEN_KIND_PROVIDER, principal="neo"), metadata=admin_md
    ).secret
    host, port = etcd.endpoints[0].split(":")
    client = etcd3.client(host, int(port))
    values = [v for v, _ in client.get_prefix(prefix + "/tokens/")]
    client.close()
    assert len(values) == 1
    assert secret.split("_", 2)[2].encode() not in values[0]


def test_replica_process_stops_cleanly_on_sigterm(etcd: EtcdCluster, prefix: str) -> None:
    with replica_process(etcd.endpoints, prefix) as (proc, address):
        ch = grpc.insecure_channel(address)
        grpc.channel_ready_future(ch).result(timeout=10)
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        ch.close()
        proc.terminate()
        assert proc.wait(15) == 0


def test_watch_capacity_ends_unavailable_when_the_replica_shuts_down(etcd: EtcdCluster, prefix: str) -> None:
    import threading

    from gpufed.v1 import discovery_pb2
    from tests.harness import ADMIN_TOKEN, ReplicaThread, replica_config

    r = ReplicaThread(replica_config(etcd.endpoints, prefix)).start()
    ch = grpc.insecure_channel(r.address)
    stream = discovery_pb2_grpc.DiscoveryServiceStub(ch).WatchCapacity(
        discovery_pb2.WatchCapacityRequest(), metadata=metadata(ADMIN_TOKEN), timeout=20
    )
    kinds: list[int] = []
    outcome: list[object] = []

    def read() -> None:
        try:
            for ev in stream:
                kinds.append(ev.type)
            outcome.append("ok")
        except grpc.RpcError as e:
            outcome.append((e.code(), error_reason(e)))

    t = threading.Thread(target=read)
    t.start()
    # Stop once the snapshot is through, not after a fixed pause (slow machines).
    snapshot_end = discovery_pb2.WatchCapacityResponse.EVENT_TYPE_SNAPSHOT_END
    wait_until(lambda: snapshot_end in kinds, timeout=15)
    r.stop()
    t.join(10)
    ch.close()
    assert kinds[-1] == discovery_pb2.WatchCapacityResponse.EVENT_TYPE_SNAPSHOT_END
    # Not OK: a client must tell "the replica went away, watch again elsewhere" from an end.
    assert outcome == [(grpc.StatusCode.UNAVAILABLE, "REPLICA_SHUTTING_DOWN")]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GPUFED_ADMIN_TOKEN": "short-token"}, "at least 32 characters"),
        ({"GPUFED_ADMIN_TOKEN": "a" * 40, "GPUFED_PEER_TOKEN": "a" * 40}, "must differ"),
    ],
)
def test_a_replica_refuses_to_start_with_a_weak_bootstrap_or_shared_peer_token(
    etcd: EtcdCluster, env: dict[str, str], message: str
) -> None:
    import os
    import subprocess
    import sys

    from tests.harness import free_port, unique_prefix

    out = subprocess.run(
        [
            *(sys.executable, "-m", "control_plane", "--listen", f"127.0.0.1:{free_port()}"),
            *("--etcd-endpoints", ",".join(etcd.endpoints), "--etcd-prefix", unique_prefix()),
        ],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("GPUFED_")}, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and message in out.stderr


def test_a_flood_of_bad_tokens_from_one_address_is_throttled_but_known_tokens_pass(
    replica: ReplicaThread,
) -> None:
    from tests.harness import ADMIN_TOKEN

    with grpc.insecure_channel(replica.address) as ch:
        stub = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        request = discovery_pb2.ListProvidersRequest()
        stub.ListProviders(request, metadata=metadata(ADMIN_TOKEN))
        codes = []
        for i in range(35):
            try:
                stub.ListProviders(request, metadata=metadata(f"gpf_{i:012x}_guess"))
            except grpc.RpcError as e:
                codes.append((e.code(), error_reason(e)))
        assert codes[0] == (grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_TOKEN")
        assert codes[-1] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "AUTH_THROTTLED")
        stub.ListProviders(request, metadata=metadata(ADMIN_TOKEN))  # the known token still works


def test_create_token_refuses_principals_off_its_pattern_and_writes_nothing(replica: ReplicaThread) -> None:
    from tests.harness import ADMIN_TOKEN

    with grpc.insecure_channel(replica.address) as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        md = metadata(ADMIN_TOKEN)
        before = stub.ListTokens(admin_pb2.ListTokensRequest(), metadata=md).tokens
        for principal in ("x\n", "a.b", "A", "p" * 100_000):
            with pytest.raises(grpc.RpcError) as e:
                stub.CreateToken(
                    admin_pb2.CreateTokenRequest(kind=admin_pb2.TOKEN_KIND_TENANT, principal=principal),
                    metadata=md,
                )
            assert (
                e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and error_reason(e.value) == "INVALID_PRINCIPAL"
            )
            assert len(e.value.details() or "") < 300  # the message quotes a bounded part
        assert stub.ListTokens(admin_pb2.ListTokensRequest(), metadata=md).tokens == before
