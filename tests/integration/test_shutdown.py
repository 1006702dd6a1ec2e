"""Graceful shutdown: on SIGTERM a replica says NOT_SERVING at once, tells its daemons to move
(they are on another replica within a second, not after a backoff), refuses new streams, still
answers unary calls while it drains, and exits within its bound."""

from __future__ import annotations

import signal
import time
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufed.client import Client
from node_daemon.fake_nvml import FakeNvml
from node_daemon.session import DaemonSession
from tests.harness import ADMIN_TOKEN, DaemonThread, EtcdCluster, daemon_config, replica_process, wait_until

pytestmark = pytest.mark.integration


def test_sigterm_moves_daemons_drains_and_exits_within_the_bound(etcd: EtcdCluster, prefix: str) -> None:
    grace = ("--shutdown-grace", "6", "--shutdown-delay", "2")
    with (
        replica_process(etcd.endpoints, prefix, *grace) as (going, addr_a),
        replica_process(etcd.endpoints, prefix, *grace) as (_, addr_b),
    ):
        with Client(addr_a, ADMIN_TOKEN) as admin:
            provider = admin.create_token("provider", "neo").secret
            tenant = admin.create_token("tenant", "dev").secret
        daemon = DaemonThread(
            daemon_config([addr_a, addr_b], provider, "neo", "n1", report_interval=0.5), FakeNvml("l40s-4")
        ).start()
        try:
            session = cast(DaemonSession, daemon.session)
            wait_until(lambda: session.state.connected, timeout=10)
            first = session.state.replica
            with Client(addr_a, tenant) as c:
                ids = {r.replica for r in c.list_nodes()}
            assert ids == {first}
            channel = grpc.insecure_channel(addr_a)
            health = health_pb2_grpc.HealthStub(channel)

            t0 = time.monotonic()
            going.send_signal(signal.SIGTERM)
            wait_until(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                timeout=2,
            )
            # Told to move: on the other replica well before the delay is over, no backoff.
            wait_until(
                lambda: session.state.connected and session.state.replica != first,
                timeout=2,
            )
            moved = time.monotonic() - t0
            # While it drains, unary calls are still answered; new streams are refused.
            with Client(addr_a, tenant, retries=0) as c:
                assert c.get_node("providers/neo/nodes/n1").node_id == "n1"
                with pytest.raises(Exception) as e:
                    next(iter(c.watch_lease("leases/0123456789abcdef")))
                assert "REPLICA_SHUTTING_DOWN" in str(e.value)
            going.wait(10)
            exited = time.monotonic() - t0
            channel.close()
            assert going.returncode == 0
            assert moved < 1.5, f"daemon moved after {moved:.2f} s"
            assert 2.0 <= exited <= 6.0 + 1.0, f"exited after {exited:.2f} s (delay 2, bound 6)"
        finally:
            daemon.stop()
