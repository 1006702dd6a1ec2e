"""Generated requests to every RPC of a real replica: whatever arrives, the answer is a clear
status (never INTERNAL, UNKNOWN or a crash) and the replica keeps serving. Bounded: a fixed
number of examples per RPC, short deadlines, loopback only."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufed.client import Client
from gpufed.v1 import (
    admin_pb2,
    discovery_pb2,
    lease_pb2,
    lease_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    peer_pb2,
    telemetry_pb2,
)
from node_daemon.fake_nvml import FakeNvml
from tests.harness import ADMIN_TOKEN, DaemonThread, ReplicaThread, daemon_config, metadata, wait_until

pytestmark = pytest.mark.integration

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}
STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "DE",
            "XX",
            "de",
            "H100",
            "leases/0123456789abcdef",
            "leases/zz",
            "providers/neo/nodes/n1",
            "providers//nodes/",
            "tokens/abc",
            "neo",
            "a" * 300,
            "🙂",
            "\x00",
            "../../etc",
        ]
    ),
    st.text(max_size=24),
)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 91.0, 1e308]))
INTS = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31 - 1), st.sampled_from([0, 1, 8, 64, 65, 10**6])
)


def message(desc: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        s = scalar(f, depth)
        if s is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = scalar(f.message_type.fields_by_name["value"], depth + 1)
            if value is None:
                value = st.just(0)
            fields[f.name] = st.dictionaries(STRINGS, value, max_size=3)
        elif f.is_repeated:
            fields[f.name] = st.lists(s, max_size=3)
        else:
            fields[f.name] = s
    return st.fixed_dictionaries({}, optional=fields)


def scalar(f: Any, depth: int) -> st.SearchStrategy[Any] | None:
    t = f.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.full_name == "google.protobuf.Timestamp":
            return st.fixed_dictionaries(
                {"seconds": st.integers(-(10**11), 10**11), "nanos": st.integers(0, 999_999_999)}
            )
        if f.message_type.full_name == "google.protobuf.Duration":
            return st.fixed_dictionaries(
                {"seconds": st.integers(-(10**6), 10**6), "nanos": st.integers(0, 999_999_999)}
            )
        if depth >= 3:
            return None
        return message(f.message_type, depth + 1)
    if t == FieldDescriptor.TYPE_STRING:
        return STRINGS
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return FLOATS
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(min_value=-2, max_value=12)
    if t in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    ):
        return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 8, 64, 65]))
    return INTS


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    _fill(msg, values)
    return msg


def _fill(msg: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            if vf.message_type is not None:
                for k, v in value.items():
                    _fill(getattr(msg, name)[k], v)
            else:
                getattr(msg, name).update({k: _clamp(vf, v) for k, v in value.items()})
        elif f.is_repeated:
            if f.message_type is not None:
                for v in value:
                    _fill(getattr(msg, name).add(), v)
            else:
                getattr(msg, name).extend(_clamp(f, v) for v in value)
        elif f.message_type is not None:
            _fill(getattr(msg, name), value)
        else:
            setattr(msg, name, _clamp(f, value))


def _clamp(f: Any, v: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_FLOAT and isinstance(v, float) and math.isfinite(v):
        return max(min(v, 3e38), -3e38)
    if f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return max(min(v, 2**31 - 1), -(2**31))
    if f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return max(min(v, 2**32 - 1), 0)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return v if f.enum_type.values_by_number.get(v) is not None or not f.enum_type.is_closed else 0
    return v


UNARY = [
    (discovery_pb2, "DiscoveryService", "SearchOffers"),
    (discovery_pb2, "DiscoveryService", "GetNode"),
    (discovery_pb2, "DiscoveryService", "ListNodes"),
    (discovery_pb2, "DiscoveryService", "ListProviders"),
    (discovery_pb2, "DiscoveryService", "SummarizeCapacity"),
    (lease_pb2, "LeaseService", "CreateLease"),
    (lease_pb2, "LeaseService", "GetLease"),
    (lease_pb2, "LeaseService", "ListLeases"),
    (lease_pb2, "LeaseService", "RenewLease"),
    (lease_pb2, "LeaseService", "ReleaseLease"),
    (telemetry_pb2, "TelemetryService", "GetNodeTelemetry"),
    (admin_pb2, "AdminService", "CordonNode"),
    (admin_pb2, "AdminService", "UncordonNode"),
    (admin_pb2, "AdminService", "DrainNode"),
    (admin_pb2, "AdminService", "RevokeLease"),
    (admin_pb2, "AdminService", "ListUsageRecords"),
    (admin_pb2, "AdminService", "CreateToken"),
    (admin_pb2, "AdminService", "DeleteToken"),
    (peer_pb2, "PeerService", "ForwardNodeTelemetry"),
]


class Target:
    def __init__(self, replica: ReplicaThread) -> None:
        self.replica = replica
        self.channel = grpc.insecure_channel(replica.address)
        with Client(replica.address, ADMIN_TOKEN) as admin:
            self.tokens = {
                "tenant": admin.create_token("tenant", "fuzz").secret,
                "provider": admin.create_token("provider", "neo").secret,
                "admin": ADMIN_TOKEN,
                "bogus": "gpf_000000000000_nope",
            }

    def unary(self, module: Any, service: str, method: str, request: Message, token: str) -> None:
        desc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        call = self.channel.unary_unary(
            f"/{desc.containing_service.full_name}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        try:
            call(request, metadata=metadata(token), timeout=10)
        except grpc.RpcError as e:
            assert e.code() not in FORBIDDEN, (service, method, e.code(), e.details(), request)


@pytest.fixture(scope="module")
def target(etcd: Any) -> Iterator[Target]:
    from tests.harness import replica_config, unique_prefix

    r = ReplicaThread(replica_config(etcd.endpoints, unique_prefix(), report_interval=0.5)).start()
    t = Target(r)
    d = DaemonThread(
        daemon_config([r.address], t.tokens["provider"], "neo", "n1"), FakeNvml("l40s-4")
    ).start()
    with Client(r.address, ADMIN_TOKEN) as admin:
        wait_until(lambda: len(admin.list_nodes()) == 1)
    yield t
    d.stop()
    t.channel.close()
    r.stop()


@pytest.mark.parametrize(("module", "service", "method"), UNARY, ids=[m for _, _, m in UNARY])
def test_generated_requests_get_clear_statuses(
    target: Target, module: Any, service: str, method: str
) -> None:
    desc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    cls = getattr(module, desc.input_type.name)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(values=message(desc.input_type), who=st.sampled_from(["tenant", "provider", "admin", "bogus"]))
    def check(values: dict[str, Any], who: str) -> None:
        target.unary(module, service, method, build(cls, values), target.tokens[who])

    check()


def test_generated_streams_get_clear_statuses(target: Target) -> None:
    node = node_pb2_grpc.NodeServiceStub(target.channel)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        first=message(node_pb2.NodeMessage.DESCRIPTOR), who=st.sampled_from(["tenant", "provider", "bogus"])
    )
    def check(first: dict[str, Any], who: str) -> None:
        msg = build(node_pb2.NodeMessage, first)
        stream = node.Connect(iter([msg]), metadata=metadata(target.tokens[who]), timeout=2)
        try:
            for _ in stream:
                pass
        except grpc.RpcError as e:
            assert e.code() not in FORBIDDEN, (e.code(), e.details(), msg)

    check()
    keepalive = lease_pb2_grpc.LeaseServiceStub(target.channel)
    reqs = [lease_pb2.KeepAliveRequest(name=n) for n in ("", "leases/zz", "leases/0123456789abcdef", "🙂")]
    answers = list(keepalive.KeepAlive(iter(reqs), metadata=metadata(target.tokens["tenant"]), timeout=5))
    assert len(answers) == 4 and all(a.error for a in answers)


def test_replica_still_serves_after_the_fuzzing(target: Target) -> None:
    health = health_pb2_grpc.HealthStub(target.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    with Client(target.replica.address, target.tokens["tenant"]) as c:
        assert c.get_node("providers/neo/nodes/n1").node_id == "n1"
