"""Liveness with real processes: daemons and replicas die by SIGKILL, go silent by SIGSTOP;
steady-state reports write nothing to etcd."""

from __future__ import annotations

import signal
import time

import etcd3
import pytest

from gpufed.client import Client
from gpufed.v1 import common_pb2
from node_daemon.fake_nvml import FakeNvml, parse_event
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    daemon_process,
    replica_config,
    replica_process,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def offered(c: Client) -> set[str]:
    return {o.node_id for o in c.search_offers()}


def test_sigkilled_daemon_leaves_the_offers_of_both_replicas_within_grace_plus_one_second(
    etcd: EtcdCluster, prefix: str
) -> None:
    # Default settings: 2 s reports, grace of 3 intervals.
    a = ReplicaThread(replica_config(etcd.endpoints, prefix)).start()
    b = ReplicaThread(replica_config(etcd.endpoints, prefix)).start()
    try:
        with Client(a.address, ADMIN_TOKEN) as ca, Client(b.address, ADMIN_TOKEN) as cb:
            token = ca.create_token("provider", "neo").secret
            with daemon_process([a.address], token, "neo", "n1") as proc:
                wait_until(lambda: "n1" in offered(ca) and "n1" in offered(cb), timeout=20)
                proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                wait_until(lambda: "n1" not in offered(ca) and "n1" not in offered(cb), timeout=10)
                took = time.monotonic() - killed
            assert took < 7.0
            assert cb.get_node("providers/neo/nodes/n1").state == common_pb2.NODE_STATE_OFFLINE
    finally:
        a.stop()
        b.stop()


def test_silent_daemon_goes_offline_after_the_grace_period(etcd: EtcdCluster, prefix: str) -> None:
    # 0.5 s reports: grace 1.5 s. SIGSTOP keeps the TCP stream open but stops the reports.
    r = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=0.5)).start()
    try:
        with Client(r.address, ADMIN_TOKEN) as c:
            token = c.create_token("provider", "neo").secret
            with daemon_process([r.address], token, "neo", "n1", "--report-interval", "0.5") as proc:
                wait_until(lambda: "n1" in offered(c), timeout=20)
                proc.send_signal(signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    wait_until(lambda: "n1" not in offered(c), timeout=10)
                    took = time.monotonic() - stopped
                finally:
                    proc.send_signal(signal.SIGCONT)
                assert 1.0 < took < 1.5 + 1.0
                # Back from its pause the daemon reconnects by itself.
                wait_until(lambda: "n1" in offered(c), timeout=20)
    finally:
        r.stop()


def test_sigkilled_replica_nodes_reconnect_to_the_other_and_are_offered_again(
    etcd: EtcdCluster, prefix: str
) -> None:
    with (
        replica_process(etcd.endpoints, prefix) as (pa, addr_a),
        replica_process(etcd.endpoints, prefix) as (_, addr_b),
        Client(addr_b, ADMIN_TOKEN) as cb,
    ):
        token = cb.create_token("provider", "neo").secret
        with (
            daemon_process([addr_a, addr_b], token, "neo", "n1"),
            daemon_process([addr_a, addr_b], token, "neo", "n2"),
        ):
            wait_until(lambda: {"n1", "n2"} <= offered(cb), timeout=20)
            owners = {n.replica for n in cb.list_nodes()}
            assert len(owners) == 1  # both on replica A, their first endpoint
            pa.send_signal(signal.SIGKILL)
            pa.wait()
            took = wait_until(
                lambda: {"n1", "n2"} <= offered(cb) and {n.replica for n in cb.list_nodes()} != owners,
                timeout=20,
            )
            assert took < 10
            # A's session lease expires a few seconds later; the takeover must survive it.
            time.sleep(6)
            assert {"n1", "n2"} <= offered(cb)
            assert all(n.state == common_pb2.NODE_STATE_READY for n in cb.list_nodes())


def test_xid_79_takes_the_gpu_out_of_offers_within_one_report_interval(
    etcd: EtcdCluster, prefix: str
) -> None:
    interval = 2.0
    a = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=interval)).start()
    b = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=interval)).start()
    with Client(a.address, ADMIN_TOKEN) as ca, Client(b.address, ADMIN_TOKEN) as cb:
        token = ca.create_token("provider", "neo").secret
        fake = FakeNvml("h100-sxm-8")
        d = DaemonThread(
            daemon_config([a.address], token, "neo", "n1", report_interval=interval), fake
        ).start()
        try:
            wait_until(lambda: sum(o.free_gpus for o in cb.search_offers()) == 8, timeout=20)
            fake.apply(parse_event("0:3:xid=79"))
            t0 = time.monotonic()
            wait_until(
                lambda: (
                    sum(o.free_gpus for o in ca.search_offers()) == 7
                    and sum(o.free_gpus for o in cb.search_offers()) == 7
                ),
                timeout=10,
            )
            assert time.monotonic() - t0 < interval
        finally:
            d.stop()
            a.stop()
            b.stop()


def test_steady_state_reports_write_nothing_to_etcd(etcd: EtcdCluster, prefix: str) -> None:
    # 0.1 s reports from 3 daemons for 10 s: 300 reports, more than a minute's worth at the
    # default interval for each node.
    r = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=0.1)).start()
    daemons = []
    try:
        with Client(r.address, ADMIN_TOKEN) as c:
            token = c.create_token("provider", "neo").secret
            for i, profile in enumerate(["h100-sxm-8", "a100-mig", "l40s-4"]):
                cfg = daemon_config([r.address], token, "neo", f"n{i}", report_interval=0.1)
                daemons.append(DaemonThread(cfg, FakeNvml(profile, host=f"n{i}")).start())
            wait_until(lambda: len(c.list_nodes(state=common_pb2.NODE_STATE_READY)) == 3, timeout=20)
            time.sleep(1.0)
            host, port = etcd.endpoints[0].split(":")
            raw = etcd3.client(host, int(port))
            try:
                before = raw.status().raft_index, raw.get_response(prefix + "/x").header.revision
                ingested = r.replica.nodes.reports_ingested  # type: ignore[union-attr]
                time.sleep(10)
                after = raw.status().raft_index, raw.get_response(prefix + "/x").header.revision
                ingested = r.replica.nodes.reports_ingested - ingested  # type: ignore[union-attr]
            finally:
                raw.close()
            assert ingested >= 250
            assert after[1] == before[1], "reports must not write to etcd"
    finally:
        for d in daemons:
            d.stop()
        r.stop()
