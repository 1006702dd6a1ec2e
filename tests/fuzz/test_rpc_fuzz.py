"""Generated requests to every RPC of a real replica: whatever arrives, the answer is a status
the proto documents (never INTERNAL, UNKNOWN or UNAVAILABLE with etcd up), a rejected request
writes nothing to etcd, and the replica keeps serving. Bounded: a fixed number of examples per
RPC (GPUFED_FUZZ_EXAMPLES scales them: `make test-fuzz`), short deadlines, loopback only."""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2 as etcd_rpc
from etcd3.etcdrpc import rpc_pb2_grpc as etcd_grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.adapters.store import prefix_end
from control_plane.domain import schema
from gpufed.client import Client
from gpufed.v1 import (
    admin_pb2,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    peer_pb2,
    telemetry_pb2,
)
from node_daemon.fake_nvml import FakeNvml
from tests.harness import (
    ADMIN_TOKEN,
    PEER_TOKEN,
    DaemonThread,
    ReplicaThread,
    daemon_config,
    metadata,
    replica_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration

# Examples per unary RPC in `make test` (x 21 RPCs, plus the streams: over 5,000 in all; an
# RPC with a small request space may run fewer, hypothesis stops when it has tried them all).
EXAMPLES = int(240 * float(os.environ.get("GPUFED_FUZZ_EXAMPLES", "1")))
FORBIDDEN = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,  # etcd is up: nothing may claim otherwise
}
MB = 1 << 20
STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "DE",
            "XX",
            "de",
            "GB ",
            "H100",
            "leases/0123456789abcdef",
            "leases/zz",
            "providers/neo/nodes/n1",
            "providers//nodes/",
            "quotas/tenants/fuzz",
            "quotas/providers/neo",
            "tokens/abc",
            "neo",
            "x\n",
            "a.b",
            "a" * 300,
            "a" * 70_000,
            "🙂" * 1000,
            "\x00",
            "../../etc",
            "H100\x1b]52;c;ZXZpbA==\x07",  # a terminal's clipboard write
            "eu-\u202etsew",  # right-to-left override
            "a\u2028b\u200b",
            "\x9b31m",
        ]
    ),
    st.text(max_size=24),
)
# Up to 1 MB (the replica must answer, not buffer or echo it): one draw in 20.
STRINGS = st.one_of(*[STRINGS] * 19, st.sampled_from(["z" * MB, "z" * 100_000]))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 91.0, 1e308, math.nan, math.inf, -math.inf]),
)
INTS = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31 - 1), st.sampled_from([0, 1, 8, 64, 65, 10**6])
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Crafted tokens: nested junk, out-of-range and non-integer offsets, wrong shapes.
JUNK_TOKENS = [
    _b64(b"[" * 5000 + b"]" * 5000),
    _b64(b'{"q":"x","o":1e999}'),
    _b64(b'{"q":"x","o":Infinity}'),
    _b64(b'{"q":"x","o":NaN}'),
    _b64(b'{"q":"x","o":-1}'),
    _b64(b'{"q":"x","o":true}'),
    _b64(b'{"q":"x","o":1.5}'),
    _b64(b'{"q":1,"o":1}'),
    _b64(b'{"o":1}'),
    _b64(b"\xff\xfe"),
    "!!!",
    "a" * 513,
]
REAL_TOKENS: list[str] = []  # filled by the fixture: next_page_tokens the replica handed out


def _flipped(token: str, bit: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    if raw:
        raw[(bit // 8) % len(raw)] ^= 1 << (bit % 8)
    return _b64(bytes(raw))


PAGE_TOKENS = st.one_of(
    st.sampled_from(JUNK_TOKENS),
    st.builds(
        lambda i, bit: _flipped(REAL_TOKENS[i % len(REAL_TOKENS)], bit),
        st.integers(0, 99),
        st.integers(0, 4000),
    ),
    st.builds(lambda i: REAL_TOKENS[i % len(REAL_TOKENS)], st.integers(0, 99)),
    STRINGS,
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
        return PAGE_TOKENS if f.name == "page_token" else STRINGS
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return FLOATS
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.integers(min_value=-2, max_value=12), st.sampled_from([2**31 - 1, -(2**31)]))
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
    (admin_pb2, "AdminService", "SetQuota"),
    (admin_pb2, "AdminService", "GetQuota"),
    (admin_pb2, "AdminService", "SetBurstPolicy"),
    (admin_pb2, "AdminService", "GetBurstPolicy"),
    (admin_pb2, "AdminService", "GetCaller"),
    (admin_pb2, "AdminService", "ListAuditEvents"),
    (peer_pb2, "PeerService", "ForwardNodeTelemetry"),
]
WHO = st.sampled_from(["tenant", "tenant", "provider", "admin", "admin", "peer", "bogus"])


class Target:
    def __init__(self, replica: ReplicaThread, etcd_endpoint: str, prefix: str) -> None:
        self.replica = replica
        self.channel = grpc.insecure_channel(replica.address)
        self.kv = etcd_grpc.KVStub(grpc.insecure_channel(etcd_endpoint))
        self.prefix = prefix.rstrip("/").encode()
        with Client(replica.address, ADMIN_TOKEN) as admin:
            self.tokens = {
                "tenant": admin.create_token("tenant", "fuzz").secret,
                "provider": admin.create_token("provider", "neo").secret,
                "admin": ADMIN_TOKEN,
                "peer": PEER_TOKEN,
                "bogus": "gpf_000000000000_nope",
            }
        self.cases = 0

    def revision(self) -> int:
        resp = self.kv.Range(etcd_rpc.RangeRequest(key=b"\0", count_only=True), timeout=5)
        return int(resp.header.revision)

    def written_since(self, revision: int) -> list[bytes]:
        """Keys of ours put after `revision`. Not seen: deletions (an earlier, accepted case's
        lease may expire meanwhile), and what the leader writes when it bills such an expiry
        (history, usage, the journal, the spent request id) at any moment."""
        billing = tuple(
            self.prefix + b".records/" + d
            for d in (b"history/", b"tenants/", b"usage/", b"tenant-usage/", b"journal/", b"requests/")
        )
        out: list[bytes] = []
        for start in (self.prefix + b"/", self.prefix + b".records/"):
            resp = self.kv.Range(
                etcd_rpc.RangeRequest(
                    key=start, range_end=prefix_end(start), min_mod_revision=revision + 1, keys_only=True
                ),
                timeout=5,
            )
            out += [kv.key for kv in resp.kvs if not kv.key.startswith(billing)]
        return out

    def unary(self, module: Any, service: str, method: str, request: Message, token: str) -> None:
        desc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        call = self.channel.unary_unary(
            f"/{desc.containing_service.full_name}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        self.cases += 1
        before = self.revision()
        try:
            call(request, metadata=metadata(token), timeout=10)
        except grpc.RpcError as e:
            assert e.code() not in FORBIDDEN, (service, method, e.code(), e.details(), str(request)[:300])
            assert len(e.details() or "") < 2000, (method, "an error message must not echo its input")
            if self.revision() != before:
                assert not self.written_since(before), (method, e.code(), "a rejected request wrote")


@pytest.fixture(scope="module")
def target(etcd: Any) -> Iterator[Target]:
    prefix = unique_prefix()
    r = ReplicaThread(
        replica_config(etcd.endpoints, prefix, report_interval=0.5, auth_failures_per_minute=1_000_000)
    ).start()
    t = Target(r, etcd.endpoints[0], prefix)
    # A fresh federation's leader moves the schema on (and stamps the tokens above) within
    # seconds: let it finish, so what it writes is not taken for a refused request's write.
    wait_until(
        lambda: (
            r.replica is not None
            and schema.parse_state(r.replica.inventory.schema).state == schema.DONE
            and schema.parse_state(r.replica.inventory.schema).version == schema.SCHEMA
        ),
        timeout=30,
    )
    daemons = [
        DaemonThread(daemon_config([r.address], t.tokens["provider"], "neo", n), FakeNvml("l40s-4")).start()
        for n in ("n1", "n2")
    ]
    with Client(r.address, t.tokens["tenant"]) as c:
        wait_until(lambda: len(c.list_nodes()) == 2)
        nodes = discovery_pb2_grpc.DiscoveryServiceStub(t.channel)
        md = metadata(t.tokens["tenant"])
        REAL_TOKENS.append(
            nodes.ListNodes(discovery_pb2.ListNodesRequest(page_size=1), metadata=md).next_page_token
        )
        REAL_TOKENS.append(
            nodes.SearchOffers(discovery_pb2.SearchOffersRequest(page_size=1), metadata=md).next_page_token
        )
        assert all(REAL_TOKENS)
    yield t
    for d in daemons:
        d.stop()
    t.channel.close()
    r.stop()


@pytest.mark.parametrize(("module", "service", "method"), UNARY, ids=[m for _, _, m in UNARY])
def test_generated_requests_get_documented_statuses_and_write_nothing_when_refused(
    target: Target, module: Any, service: str, method: str
) -> None:
    desc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    cls = getattr(module, desc.input_type.name)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(values=message(desc.input_type), who=WHO)
    def check(values: dict[str, Any], who: str) -> None:
        target.unary(module, service, method, build(cls, values), target.tokens[who])

    check()


def _stream_codes(call: Any) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_generated_connect_streams_get_documented_statuses(target: Target) -> None:
    node = node_pb2_grpc.NodeServiceStub(target.channel)
    hellos = message(node_pb2.NodeHello.DESCRIPTOR)
    followers = st.lists(
        st.one_of(
            message(common_pb2.NodeReport.DESCRIPTOR).map(lambda v: ("report", v)),
            message(node_pb2.NodeEvent.DESCRIPTOR).map(lambda v: ("event", v)),
            message(node_pb2.NodeMessage.DESCRIPTOR).map(lambda v: ("any", v)),
        ),
        max_size=4,
    )

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hello=hellos, then=followers, who=st.sampled_from(["provider", "provider", "tenant", "bogus"]))
    def check(hello: dict[str, Any], then: list[tuple[str, dict[str, Any]]], who: str) -> None:
        h = build(node_pb2.NodeHello, hello)
        assert isinstance(h, node_pb2.NodeHello)
        h.provider = h.provider or "neo"
        msgs = [node_pb2.NodeMessage(hello=h)]
        for kind, values in then:
            if kind == "report":
                msgs.append(node_pb2.NodeMessage(report=build(common_pb2.NodeReport, values)))  # type: ignore[arg-type]
            elif kind == "event":
                msgs.append(node_pb2.NodeMessage(event=build(node_pb2.NodeEvent, values)))  # type: ignore[arg-type]
            else:
                msgs.append(build(node_pb2.NodeMessage, values))  # type: ignore[arg-type]
        target.cases += 1
        code = _stream_codes(node.Connect(iter(msgs), metadata=metadata(target.tokens[who]), timeout=3))
        assert code not in FORBIDDEN, (code, str(msgs)[:300])

    check()


HOSTILE_CHARS = st.sampled_from(
    ["\x1b", "\x07", "\x00", "\x7f", "\x9b", "\u202e", "\u2066", "\u200b", "\u2028", "\r"]
)
HELLO_STRINGS = ("model", "region", "zone", "label", "daemon_version", "driver_version", "boot_id", "reason")


def test_a_hello_with_any_hostile_character_in_any_shown_string_is_invalid_and_writes_nothing(
    target: Target,
) -> None:
    node = node_pb2_grpc.NodeServiceStub(target.channel)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        where=st.sampled_from(HELLO_STRINGS),
        char=HOSTILE_CHARS,
        text=st.text(max_size=8),
        at=st.integers(0, 8),
    )
    def check(where: str, char: str, text: str, at: int) -> None:
        value = text[:at] + char + text[at:]
        h = node_pb2.NodeHello(
            provider="neo", node_id="fuzz-strings", location=common_pb2.Location(country_code="DE")
        )
        gpu = h.gpus.add(uuid="GPU-fuzz-strings", model="NVIDIA L40S", health=common_pb2.GPU_HEALTH_HEALTHY)
        if where == "model":
            gpu.model = value
        elif where in ("region", "zone"):
            setattr(h.location, where, value)
        elif where == "label":
            h.labels["rack"] = value
        elif where == "reason":
            gpu.health_reasons.add(code="XID_79", message=value, action=common_pb2.REPAIR_ACTION_NONE)
        else:
            setattr(h, where, value)
        target.cases += 1
        before = target.revision()
        msgs = iter([node_pb2.NodeMessage(hello=h)])
        code = _stream_codes(node.Connect(msgs, metadata=metadata(target.tokens["provider"]), timeout=3))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (where, repr(value), code)
        assert not target.written_since(before), (where, repr(value), "a refused hello wrote")

    check()


def test_any_spelling_of_a_valid_bearer_header_authenticates_and_anything_else_is_unauthenticated(
    target: Target,
) -> None:
    """The token cache is keyed by token id: spellings of one token are one entry, and made-up
    or mangled tokens (bounded by the lookup budget) are UNAUTHENTICATED, never a crash."""
    discovery = discovery_pb2_grpc.DiscoveryServiceStub(target.channel)
    token = target.tokens["tenant"]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]),
        before=st.sampled_from(["", " ", "  "]),
        after=st.sampled_from(["", " ", "   "]),
        mangle=st.one_of(st.none(), st.integers(0, 200), st.text(alphabet="abXY09_- ", max_size=6)),
    )
    def check(scheme: str, before: str, after: str, mangle: int | str | None) -> None:
        value = token
        if isinstance(mangle, int):
            i = mangle % len(token)
            value = token[:i] + ("x" if token[i] != "x" else "y") + token[i + 1 :]
        elif isinstance(mangle, str) and mangle:
            value = token + mangle
        target.cases += 1
        header = f"{scheme} {before}{value}{after}"
        try:
            discovery.SearchOffers(
                discovery_pb2.SearchOffersRequest(page_size=1),
                metadata=(("authorization", header),),
                timeout=5,
            )
            ok = True
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), e.code()
            ok = False
        assert ok == (value == token or value.strip() == token), (header[:80], ok)

    check()


def test_generated_server_streams_get_documented_statuses(target: Target) -> None:
    leases = lease_pb2_grpc.LeaseServiceStub(target.channel)
    discovery = discovery_pb2_grpc.DiscoveryServiceStub(target.channel)

    @settings(
        max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(
        watch=message(lease_pb2.WatchLeaseRequest.DESCRIPTOR),
        capacity=message(discovery_pb2.WatchCapacityRequest.DESCRIPTOR),
        keepalive=st.lists(message(lease_pb2.KeepAliveRequest.DESCRIPTOR), max_size=4),
        who=WHO,
    )
    def check(
        watch: dict[str, Any], capacity: dict[str, Any], keepalive: list[dict[str, Any]], who: str
    ) -> None:
        md = metadata(target.tokens[who])
        target.cases += 3
        calls = [
            leases.WatchLease(build(lease_pb2.WatchLeaseRequest, watch), metadata=md, timeout=0.5),
            discovery.WatchCapacity(
                build(discovery_pb2.WatchCapacityRequest, capacity), metadata=md, timeout=0.5
            ),
            leases.KeepAlive(
                iter([build(lease_pb2.KeepAliveRequest, k) for k in keepalive]), metadata=md, timeout=2
            ),
        ]
        for call in calls:
            code = _stream_codes(call)
            # A watch that was accepted runs until its deadline: DEADLINE_EXCEEDED is ours.
            assert code not in FORBIDDEN, (code, watch, capacity, keepalive)

    check()


def test_garbage_bytes_are_invalid_argument_not_a_crash(target: Target) -> None:
    call = target.channel.unary_unary(
        "/gpufed.v1.DiscoveryService/SearchOffers",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    for garbage in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as e:
            call(garbage, metadata=metadata(target.tokens["tenant"]), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_suite_ran_its_cases_and_the_replica_still_serves(target: Target) -> None:
    if EXAMPLES >= 240:
        assert target.cases >= 5000, target.cases
    health = health_pb2_grpc.HealthStub(target.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    with Client(target.replica.address, target.tokens["tenant"]) as c:
        assert {n.node_id for n in c.list_nodes()} >= {"n1", "n2"}
