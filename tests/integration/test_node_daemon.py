"""The daemon against a real replica on loopback: registration, telemetry, events, reconnect."""

from __future__ import annotations

import pytest

from gpufed import __version__
from gpufed.client import Client
from gpufed.v1 import common_pb2, lease_pb2
from node_daemon.fake_nvml import FakeNvml, parse_event
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    free_port,
    replica_config,
    wait_until,
)

pytestmark = pytest.mark.integration
NODE = "providers/neo/nodes/n1"


def test_daemon_registers_reports_and_reconnects_after_the_server_restarts(
    etcd: EtcdCluster, prefix: str
) -> None:
    port = free_port()
    cfg = replica_config(etcd.endpoints, prefix, report_interval=0.5)
    cfg.listen = f"127.0.0.1:{port}"
    replica = ReplicaThread(cfg).start()
    admin = Client(replica.address, ADMIN_TOKEN)
    provider_token = admin.create_token("provider", "neo").secret
    daemon = DaemonThread(
        daemon_config([f"127.0.0.1:{port}"], provider_token, "neo", "n1"), FakeNvml("l40s-4")
    ).start()
    try:
        wait_until(lambda: NODE in {n.name for n in admin.list_nodes()})
        node = admin.get_node(NODE)
        assert node.state == common_pb2.NODE_STATE_READY
        assert [g.model for g in node.gpus] == ["NVIDIA L40S"] * 4
        assert node.location.country_code == "DE" and node.price_per_gpu_hour == 2.0
        wait_until(lambda: len(admin.node_telemetry(NODE).recent) >= 2)
        assert admin.node_telemetry(NODE).latest.gpus[0].HasField("power_watts")

        replica.stop()
        admin.close()
        session = daemon.session
        wait_until(lambda: not session.state.connected)  # type: ignore[attr-defined]

        cfg2 = replica_config(etcd.endpoints, prefix, report_interval=0.5)
        cfg2.listen = f"127.0.0.1:{port}"
        replica = ReplicaThread(cfg2).start()
        admin = Client(replica.address, ADMIN_TOKEN)
        wait_until(lambda: session.state.connects >= 2, timeout=20)  # type: ignore[attr-defined]
        wait_until(lambda: admin.get_node(NODE).state == common_pb2.NODE_STATE_READY)
        # The backlog kept while disconnected reaches the new replica.
        wait_until(lambda: len(admin.node_telemetry(NODE, 600).recent) >= 2)
    finally:
        daemon.stop()
        admin.close()
        replica.stop()


def test_daemon_with_a_foreign_provider_name_is_refused(replica: ReplicaThread) -> None:
    admin = Client(replica.address, ADMIN_TOKEN)
    token = admin.create_token("provider", "neo").secret
    daemon = DaemonThread(daemon_config([replica.address], token, "other", "n1"), FakeNvml("l40s-4")).start()
    try:
        wait_until(lambda: "PERMISSION_DENIED" in daemon.session.state.last_error)  # type: ignore[attr-defined]
        assert admin.list_nodes() == []
    finally:
        daemon.stop()
        admin.close()


def test_xid_event_reaches_the_control_plane_before_the_next_report(replica: ReplicaThread) -> None:
    admin = Client(replica.address, ADMIN_TOKEN)
    token = admin.create_token("provider", "neo").secret
    fake = FakeNvml("h100-sxm-8")
    # A long report interval: only the event path can be this quick.
    daemon = DaemonThread(
        daemon_config([replica.address], token, "neo", "n1", report_interval=30.0), fake
    ).start()
    try:
        wait_until(lambda: NODE in {n.name for n in admin.list_nodes()})
        fake.apply(parse_event("0:3:xid=79"))
        took = wait_until(
            lambda: admin.get_node(NODE).gpus[3].health == common_pb2.GPU_HEALTH_UNHEALTHY, timeout=5
        )
        assert took < 3
        assert "XID_79" in {r.code for r in admin.get_node(NODE).gpus[3].health_reasons}
    finally:
        daemon.stop()
        admin.close()


def test_daemon_process_stops_cleanly_on_sigterm(etcd: EtcdCluster, prefix: str) -> None:
    import signal
    import time

    from tests.harness import daemon_process

    # 2 s reports: a grace of 6 s, so going offline within 3 s means the stream ended cleanly.
    replica = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=2.0)).start()
    admin = Client(replica.address, ADMIN_TOKEN)
    token = admin.create_token("provider", "neo").secret
    try:
        with daemon_process([replica.address], token, "neo", "n1") as proc:
            wait_until(lambda: admin.get_node(NODE).state == common_pb2.NODE_STATE_READY, timeout=20)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            assert proc.wait(10) == 0
            assert time.monotonic() - t0 < 5
        # The stream ended cleanly: the node is offline at once, not after the grace period.
        wait_until(lambda: admin.get_node(NODE).state == common_pb2.NODE_STATE_OFFLINE, timeout=3)
    finally:
        admin.close()
        replica.stop()


def test_daemon_without_nvml_exits_with_one_clear_line() -> None:
    import ctypes.util
    import os
    import subprocess
    import sys

    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this host has NVML")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_daemon",
            "--provider",
            "neo",
            "--country",
            "DE",
            "--control-plane",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GPUFED_LOG_FORMAT": "json"},
    )
    assert proc.returncode == 1
    assert "--fake-nvml" in proc.stderr and "Traceback" not in proc.stderr


def test_a_hello_with_an_unknown_health_or_unbounded_strings_is_refused_and_writes_nothing(
    replica: ReplicaThread,
) -> None:
    import asyncio

    import grpc

    from control_plane.adapters.store import EtcdStore
    from gpufed.errors import error_reason
    from gpufed.v1 import common_pb2, node_pb2, node_pb2_grpc
    from tests.harness import metadata

    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "neo").secret

    async def revision() -> int:
        """The newest write under this replica's prefix (etcd's own revision also moves with
        other tests' replicas on the shared member)."""
        store = EtcdStore(replica.config.etcd_endpoints, replica.config.etcd_prefix)
        try:
            kvs, _ = await store.get_prefix(store.keys.root)
            return max(kv.mod_revision for kv in kvs)
        finally:
            await store.close()

    def hello(**gpu: object) -> node_pb2.NodeMessage:
        h = node_pb2.NodeHello(
            provider="neo",
            node_id="n1",
            location=common_pb2.Location(country_code="DE"),
            driver_version="1",
            daemon_version=__version__,
        )
        h.gpus.add(uuid="GPU-1", index=0, model="NVIDIA H100 80GB HBM3", **gpu)
        return node_pb2.NodeMessage(hello=h)

    # The leader's first writes (the schema key) settle before the count.
    wait_until(lambda: replica.replica is not None and b'"done"' in (replica.replica.inventory.schema or b""))
    long_reasons = hello()
    for i in range(100):
        long_reasons.hello.gpus[0].health_reasons.add(code=f"R{i}", message="x" * 10_000)
    before = asyncio.run(revision())
    with grpc.insecure_channel(replica.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        for msg in (hello(health=7), long_reasons):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Connect(iter([msg]), metadata=metadata(token), timeout=10))
            assert (
                e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and error_reason(e.value) == "INVALID_HEALTH"
            )
    assert asyncio.run(revision()) == before


def test_every_outage_after_a_working_stream_starts_the_backoff_again(replica: ReplicaThread) -> None:
    from control_plane.domain import errors

    with Client(replica.address, ADMIN_TOKEN) as admin:
        token = admin.create_token("provider", "neo").secret
    d = DaemonThread(daemon_config([replica.address], token, "neo", "n1"), FakeNvml("l40s-4")).start()
    try:
        session = d.session
        assert session is not None
        wait_until(lambda: session.state.connected, timeout=10)  # type: ignore[attr-defined]
        nodes = replica.replica.nodes  # type: ignore[union-attr]
        for n in range(6):  # six outages in a row: each must be as short as the first
            connects = session.state.connects  # type: ignore[attr-defined]
            ended = errors.unavailable("TEST_OUTAGE", "the test ends the stream")
            replica.loop.call_soon_threadsafe(nodes.sessions[NODE].end, ended)
            took = wait_until(lambda c=connects: session.state.connects > c, timeout=15)  # type: ignore[attr-defined]
            assert took < 1.5, f"outage {n + 1}: back after {took:.1f} s"
    finally:
        d.stop()


def free_of(c: Client, provider: str) -> int:
    return sum(o.free_gpus for o in c.search_offers(providers=[provider]))


def test_a_hello_without_a_leased_gpu_ends_its_lease_first_and_never_sells_the_gpu_twice(
    replica: ReplicaThread,
) -> None:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", "swapped-dev").secret
        provider = admin.create_token("provider", "swapper").secret
    cfg = daemon_config([replica.address], provider, "swapper", "n1")
    first = DaemonThread(cfg, FakeNvml("l40s-4", host="board-a")).start()
    with Client(replica.address, tenant) as c:
        wait_until(lambda: free_of(c, "swapper") == 4, timeout=20)
        lease = c.create_lease(2, ttl_s=60, providers=["swapper"])
        events = c.watch_lease(lease.name)
        assert next(events).type == lease_pb2.WatchLeaseResponse.EVENT_TYPE_GRANTED
        first.stop()
        # The host comes back with other boards: the leased uuids are gone from its inventory.
        second = DaemonThread(cfg, FakeNvml("l40s-4", host="board-b")).start()
        try:
            ended = next(e for e in events if e.type == lease_pb2.WatchLeaseResponse.EVENT_TYPE_ENDED)
            assert ended.lease.end_reason == lease_pb2.LEASE_END_REASON_GPU_REMOVED
            assert c.get_lease(lease.name).end_reason == lease_pb2.LEASE_END_REASON_GPU_REMOVED
            wait_until(
                lambda: sum(o.free_gpus for o in c.search_offers(providers=["swapper"])) == 4, timeout=20
            )
            with Client(replica.address, ADMIN_TOKEN) as admin:
                node = admin.get_node("providers/swapper/nodes/n1")
            assert not {g.uuid for g in lease.gpus} & {g.uuid for g in node.gpus}
            assert all(not g.lease for g in node.gpus)  # nothing holds a GPU that is gone
        finally:
            second.stop()
