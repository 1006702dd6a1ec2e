"""A hostile provider at its node quota, every field at its bound, flipping the health of every
GPU on every report and reconnecting in a loop: etcd stays within the documented bytes and
write rate (docs/operations.md), and another tenant's leases keep being granted and renewed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

import etcd3
import grpc
import pytest

from control_plane.domain.registration import MAX_NODE_RECORD_BYTES
from gpufed.client import Client
from gpufed.errors import error_reason
from gpufed.v1 import node_pb2, node_pb2_grpc
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
from tests.hostile import flipping_report, maximal_hello

pytestmark = pytest.mark.integration

NODES = 3
WINDOW_S = 8.0
HEALTH_WRITE_INTERVAL_S = 2.0
REPORTS_PER_S = 10


def _hostile_stream(addr: str, token: str, node: str, stop: threading.Event, out: list[str]) -> None:
    """Hello, then a report every 1/REPORTS_PER_S s flipping all 64 GPUs until `stop`."""
    stub = node_pb2_grpc.NodeServiceStub(grpc.insecure_channel(addr))

    def messages() -> Iterator[node_pb2.NodeMessage]:
        yield node_pb2.NodeMessage(hello=maximal_hello("evil", node))
        healthy = False
        while not stop.is_set():
            time.sleep(1 / REPORTS_PER_S)
            healthy = not healthy
            yield flipping_report(node, 64, healthy)

    try:
        for _ in stub.Connect(messages(), metadata=metadata(token), timeout=WINDOW_S + 10):
            pass
        out.append("OK")
    except grpc.RpcError as e:
        out.append(error_reason(e) or e.code().name)


@pytest.fixture
def setup(etcd: EtcdCluster) -> Iterator[tuple[ReplicaThread, str, dict[str, str]]]:
    prefix = unique_prefix()
    replica = ReplicaThread(
        replica_config(
            etcd.endpoints, prefix, report_interval=0.5, health_write_interval=HEALTH_WRITE_INTERVAL_S
        )
    ).start()
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tokens = {
            "evil": admin.create_token("provider", "evil").secret,
            "honest": admin.create_token("provider", "honest").secret,
            "tenant": admin.create_token("tenant", "good").secret,
        }
        admin.set_quota(
            "quotas/providers/evil",
            max_nodes=NODES,
            reports_per_second=REPORTS_PER_S * 1.5,
            report_burst=20,
            connects_per_minute=6,
        )
    daemon = DaemonThread(
        daemon_config([replica.address], tokens["honest"], "honest", "h1", report_interval=0.5),
        FakeNvml("h100-sxm-8"),
    ).start()
    with Client(replica.address, tokens["tenant"]) as c:
        wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8, timeout=20)
    yield replica, prefix, tokens
    daemon.stop()
    replica.stop()


def test_a_hostile_provider_stays_within_its_bounds_and_others_keep_leasing(
    etcd: EtcdCluster, setup: tuple[ReplicaThread, str, dict[str, str]]
) -> None:
    replica, prefix, tokens = setup
    host, port = etcd.endpoints[0].rsplit(":", 1)
    kv = etcd3.client(host=host, port=int(port))
    evil_dir = f"{prefix}/nodes/evil/"
    stop = threading.Event()
    outcomes: list[str] = []
    streams = [
        threading.Thread(
            target=_hostile_stream, args=(replica.address, tokens["evil"], f"e{i}", stop, outcomes)
        )
        for i in range(NODES)
    ]
    for t in streams:
        t.start()
    with Client(replica.address, ADMIN_TOKEN) as admin:
        try:
            wait_until(lambda: admin.get_quota("quotas/providers/evil").nodes == NODES, timeout=10)
        except TimeoutError as e:
            raise AssertionError(f"streams ended early: {outcomes}") from e

    # One node past the quota is refused; a reconnect loop is rate limited.
    extra: list[str] = []
    _hostile_stream(replica.address, tokens["evil"], "e-extra", threading.Event(), extra)
    assert extra == ["QUOTA_NODES"]

    # Meanwhile another tenant's leases are granted and renewed, every time.
    cycles = 0
    t0 = time.monotonic()
    with Client(replica.address, tokens["tenant"], retries=0) as c:
        while time.monotonic() - t0 < WINDOW_S:
            lease = c.create_lease(2, ttl_s=30)
            c.renew_lease(lease.name)
            c.release_lease(lease.name)
            cycles += 1
    elapsed = time.monotonic() - t0
    stop.set()
    for t in streams:
        t.join(15)
    assert outcomes == ["OK"] * NODES, outcomes  # within the report rate: never cut off
    assert cycles >= 10, f"{cycles} lease cycles in {elapsed:.1f} s"

    loop: list[str] = []
    for _ in range(6):
        once = threading.Event()
        once.set()
        _hostile_stream(replica.address, tokens["evil"], "e0", once, loop)
    assert "RATE_LIMITED" in loop, loop

    # Bytes: each record within its bound, the provider within quota x bound.
    records = list(kv.get_prefix(evil_dir))
    assert len(records) == NODES
    assert all(len(value) <= MAX_NODE_RECORD_BYTES for value, _ in records)
    assert sum(len(value) for value, _ in records) <= NODES * MAX_NODE_RECORD_BYTES
    # Writes: per node one registration, one health write per interval, the reconnects (burst
    # 3) and their health writes; not one write per report (that would be ~80 per node).
    per_node = {meta.key: meta.version for _, meta in records}  # version: puts since created
    bound = 1 + math.ceil(elapsed / HEALTH_WRITE_INTERVAL_S) + 1
    reconnects = 2 * 3
    assert all(n <= bound + (reconnects if key.endswith(b"/e0") else 0) for key, n in per_node.items()), (
        per_node,
        bound,
    )


def _connect_once(addr: str, token: str, *messages: node_pb2.NodeMessage) -> str:
    """Send the messages on one stream and wait for its end: the error reason, or "OK"."""
    stub = node_pb2_grpc.NodeServiceStub(grpc.insecure_channel(addr))

    def send() -> Iterator[node_pb2.NodeMessage]:
        yield from messages
        time.sleep(2)  # the server ends a bad stream before this

    try:
        for _ in stub.Connect(send(), metadata=metadata(token), timeout=10):
            pass
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name} {error_reason(e)}"


def _model(h: node_pb2.NodeHello) -> None:
    h.gpus[0].model = "H100\x1b]52;c;ZXZpbA==\x07"  # OSC 52: writes the developer's clipboard


def _region(h: node_pb2.NodeHello) -> None:
    h.location.region = "eu-\u202etsew"  # right-to-left override: reads "eu-west"


def _label(h: node_pb2.NodeHello) -> None:
    h.labels["rack"] = "r1\x1b[2J"  # clears the screen


def _driver(h: node_pb2.NodeHello) -> None:
    h.driver_version = "550\u2028ok"  # a line separator


def _reason(h: node_pb2.NodeHello) -> None:
    del h.gpus[0].health_reasons[:]
    h.gpus[0].health_reasons.add(code="XID_79", message="\x1b[31mok", action=1)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_model, "INVALID_INVENTORY"),
        (_region, "INVALID_LOCATION"),
        (_label, "INVALID_LABELS"),
        (_driver, "INVALID_HELLO"),
        (_reason, "INVALID_HEALTH"),
    ],
)
def test_a_hello_with_control_or_format_characters_is_refused_and_registers_nothing(
    replica: ReplicaThread, spoil: Callable[[node_pb2.NodeHello], None], reason: str
) -> None:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "inky").secret
        hello = maximal_hello("inky", "n1")
        del hello.gpus[1:]
        hello.labels.clear()
        spoil(hello)
        assert _connect_once(replica.address, token, node_pb2.NodeMessage(hello=hello)) == (
            f"INVALID_ARGUMENT {reason}"
        )
        assert not admin.list_nodes(provider="inky")


def test_a_report_with_an_escape_in_a_health_reason_ends_the_stream(replica: ReplicaThread) -> None:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "inky2").secret
    hello = maximal_hello("inky2", "n1")
    del hello.gpus[1:]
    hello.labels.clear()
    report = flipping_report("n1", 1, healthy=False)
    report.report.gpus[0].health_reasons[0].message = "fell off\x1b]0;owned\x07"
    got = _connect_once(replica.address, token, node_pb2.NodeMessage(hello=hello), report)
    assert got == "INVALID_ARGUMENT INVALID_HEALTH"


def test_a_stream_without_a_hello_ends_after_the_hello_timeout(replica: ReplicaThread) -> None:
    assert replica.replica is not None
    replica.replica.nodes.hello_timeout = 0.5
    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "mute").secret
    t = time.monotonic()
    assert _connect_once(replica.address, token) == "DEADLINE_EXCEEDED HELLO_TIMEOUT"
    assert time.monotonic() - t < 2.5  # the helper keeps its side open for 2 s


def test_a_providers_streams_on_a_replica_are_capped_by_its_node_quota(
    replica: ReplicaThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from control_plane.app import quotas

    monkeypatch.setattr(quotas, "PROVIDER_STREAM_SLACK", 1)
    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "many").secret
        admin.set_quota("quotas/providers/many", max_nodes=1)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(_connect_once(replica.address, token)))
        for _ in range(3)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results)[-1] == "RESOURCE_EXHAUSTED TOO_MANY_STREAMS"
    assert results.count("RESOURCE_EXHAUSTED TOO_MANY_STREAMS") == 1  # max_nodes 1 + slack 1


def test_every_message_kind_counts_against_the_streams_rate_except_the_answers_owed(
    replica: ReplicaThread,
) -> None:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "acker").secret
        admin.set_quota("quotas/providers/acker", reports_per_second=5, report_burst=50)
    hello = maximal_hello("acker", "n1")
    del hello.gpus[1:]
    hello.labels.clear()
    acks = [
        node_pb2.NodeMessage(assignment_ack=node_pb2.AssignmentAck(lease=f"leases/{i:016x}", accepted=False))
        for i in range(200)
    ]  # none was asked for: past the bucket of 5/s with a burst of 50
    assert _connect_once(replica.address, token, node_pb2.NodeMessage(hello=hello), *acks) == (
        "RESOURCE_EXHAUSTED RATE_LIMITED"
    )
