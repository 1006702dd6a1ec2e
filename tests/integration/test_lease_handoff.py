"""From a granted lease to GPUs a developer can log into: the daemon hands the lease to the
provider's hook, the hook's answer reaches the tenant, and only the tenant."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpufed import __version__, cli
from gpufed.client import Client, GpufedError, LeaseEnded
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2
from node_daemon.fake_nvml import FakeNvml
from node_daemon.session import DaemonSession
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    wait_until,
)

pytestmark = pytest.mark.integration

KEY = (Path(__file__).parents[1] / "data" / "ssh_keys" / "ed25519.pub").read_text(encoding="utf-8").strip()
W = lease_pb2.WatchLeaseResponse


def write_hook(path: Path, log: Path, body: str = "") -> str:
    """A hook that appends its input to `log`, runs `body` (may exit), answers for a start."""
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time\n"
        "doc = json.load(sys.stdin)\n"
        f"open({str(log)!r}, 'a').write(json.dumps(doc) + '\\n')\n"
        f"{body}\n"
        "if doc['action'] == 'start':\n"
        "    user = 'u-' + doc['lease'][-8:]\n"
        "    print(json.dumps({'ssh': f'ssh {user}@' + doc['node_id'] + '.example',"
        " 'instructions': 'GPUs ' + doc['cuda_visible_devices']}))\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return str(path)


def runs(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


@contextlib.contextmanager
def hooked_node(
    replica: ReplicaThread, tmp_path: Path, body: str = "", node: str = "n1", timeout: float = 10.0
) -> Iterator[tuple[str, Path, DaemonThread]]:
    """A provider 'neo' node with 4 GPUs and the test hook, and a tenant token: (token, hook log, daemon)."""
    log = tmp_path / "hook.jsonl"
    hook = write_hook(tmp_path / "hook.py", log, body)
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", "dev").secret
        provider = admin.create_token("provider", "neo").secret
    cfg = daemon_config(
        [replica.address],
        provider,
        "neo",
        node,
        lease_hook=hook,
        lease_hook_timeout=timeout,
        state_dir=str(tmp_path / "state"),
    )
    daemon = DaemonThread(cfg, FakeNvml("l40s-4")).start()
    try:
        with Client(replica.address, tenant) as c:
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers(providers=["neo"])) == 4, timeout=20)
        yield tenant, log, daemon
    finally:
        daemon.stop()


def test_a_lease_with_a_key_is_provisioned_by_the_hook_and_only_its_tenant_reads_the_access(
    replica: ReplicaThread, tmp_path: Path
) -> None:
    with (
        hooked_node(replica, tmp_path, body="time.sleep(0.5)") as (tenant, log, _),
        Client(replica.address, tenant) as c,
    ):
        lease = c.create_lease(2, ttl_s=30, ssh_keys=[KEY], provider_options={"image": "pytorch"})
        assert lease.state == lease_pb2.LEASE_STATE_PROVISIONING
        assert not lease.HasField("active_time")
        events = c.watch_lease(lease.name)
        assert next(events).type == W.EVENT_TYPE_GRANTED
        provisioned = next(events)
        assert provisioned.type == W.EVENT_TYPE_PROVISIONED
        assert provisioned.lease.state == lease_pb2.LEASE_STATE_ACTIVE

        # The hook got the lease's GPUs (uuids and indexes), its token and the tenant's request.
        (start,) = runs(log)
        assert start["action"] == "start" and start["lease"] == lease.name and start["tenant"] == "dev"
        assert [g["uuid"] for g in start["gpus"]] == [g.uuid for g in lease.gpus]
        assert start["cuda_visible_devices"] == ",".join(str(g.index) for g in lease.gpus)
        assert start["fencing_token"] == lease.fencing_token
        assert start["access"] == {"ssh_public_keys": [KEY], "provider_options": {"image": "pytorch"}}

        # The tenant reads the details: GetLease, the CLI.
        got = c.get_lease(lease.name)
        (details,) = got.access_details
        assert details.node == "providers/neo/nodes/n1"
        assert details.ssh == f"ssh u-{lease.name[-8:]}@n1.example"
        assert got.active_time.ToNanoseconds() >= got.create_time.ToNanoseconds()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.main(["--endpoint", replica.address, "--token", tenant, "lease", "get", lease.name])
        assert details.ssh in out.getvalue()

        # Another tenant sees nothing of it, by any read.
        with Client(replica.address, ADMIN_TOKEN) as admin:
            other = admin.create_token("tenant", "eve").secret
        with Client(replica.address, other) as eve:
            with pytest.raises(GpufedError) as e:
                eve.get_lease(lease.name)
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            assert lease.name not in {x.name for x in eve.list_leases()}
            with pytest.raises(GpufedError) as e:
                next(eve.watch_lease(lease.name))
            assert e.value.code == grpc.StatusCode.NOT_FOUND

        c.release_lease(lease.name)
        wait_until(lambda: len(runs(log)) == 2, timeout=10)
        end = runs(log)[1]
        assert (
            end["action"] == "end"
            and end["lease"] == lease.name
            and end["fencing_token"] == lease.fencing_token
        )
        # Billing starts when the lease became ACTIVE.
        with Client(replica.address, ADMIN_TOKEN) as admin:
            (usage,) = admin.call(
                admin.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest()
            ).usage_records
        assert usage.start_time == got.active_time


def test_the_cli_waits_for_the_access_details_and_prints_them(replica: ReplicaThread, tmp_path: Path) -> None:
    key_file = tmp_path / "id_ed25519.pub"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    (tmp_path / "id_ed25519").write_text("the private half\n", encoding="utf-8")
    with hooked_node(replica, tmp_path) as (tenant, log, _):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(
                [
                    *("--endpoint", replica.address, "--token", tenant, "lease", "create", "--count", "1"),
                    *("--ssh-key", str(tmp_path / "id_ed25519"), "--wait"),
                ]
            )
        assert code == 0
        assert "ACTIVE" in out.getvalue() and "ssh u-" in out.getvalue()
        assert runs(log)[0]["access"]["ssh_public_keys"] == [KEY]
        name = runs(log)[0]["lease"]
        login = f"ssh -i {tmp_path / 'id_ed25519'} u-{name[-8:]}@n1.example"
        assert f"login: {login}\n" in out.getvalue()  # the private half of the key it was given
        assert f"gpufed lease ssh {name} --key {tmp_path / 'id_ed25519'}" in out.getvalue()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(
                [
                    *("--endpoint", replica.address, "--token", tenant, "lease", "ssh", name, "--print"),
                    *("--key", str(key_file), "--ssh-option", "ConnectTimeout=5", "--", "nvidia-smi", "-L"),
                ]
            )
        assert code == 0
        assert printed.getvalue().strip() == (
            f"ssh -i {tmp_path / 'id_ed25519'} -o ConnectTimeout=5 u-{name[-8:]}@n1.example -- nvidia-smi -L"
        )
        with Client(replica.address, tenant) as c:
            for lease in c.list_leases(lease_pb2.LEASE_STATE_ACTIVE):
                c.release_lease(lease.name)  # an expiry later would write into the next tests' etcd


def test_a_failing_hook_ends_the_lease_frees_the_gpus_at_once_and_bills_nothing(
    replica: ReplicaThread, tmp_path: Path
) -> None:
    body = "if doc['action'] == 'start':\n    print('no docker here', file=sys.stderr); sys.exit(3)"
    with hooked_node(replica, tmp_path, body=body) as (tenant, log, _), Client(replica.address, tenant) as c:
        lease = c.create_lease(4, ttl_s=60)
        with pytest.raises(LeaseEnded) as e:
            c.wait_active(lease.name, timeout=20)
        assert e.value.reason == "PROVISIONING_FAILED"
        assert "status 3" in e.value.message and "no docker here" in e.value.message
        ended = c.get_lease(lease.name)
        assert ended.end_reason == lease_pb2.LEASE_END_REASON_PROVISIONING_FAILED
        # The GPUs are free at once (not at the ttl), and the end hook cleaned up after the start.
        assert sum(o.free_gpus for o in c.search_offers()) == 4
        wait_until(lambda: [r["action"] for r in runs(log)] == ["start", "end"], timeout=10)
        with Client(replica.address, ADMIN_TOKEN) as admin:
            (usage,) = admin.call(
                admin.admin.ListUsageRecords, admin_pb2.ListUsageRecordsRequest()
            ).usage_records
        assert usage.gpu_seconds == 0 and usage.quoted_cost == 0
        assert usage.end_reason == lease_pb2.LEASE_END_REASON_PROVISIONING_FAILED


def test_a_failed_end_keeps_its_gpus_out_of_offers_until_the_daemons_retry_succeeds(
    replica: ReplicaThread, tmp_path: Path
) -> None:
    stuck = tmp_path / "processes-survive"
    stuck.write_text("1", encoding="utf-8")
    body = (
        f"if doc['action'] == 'end' and os.path.exists({str(stuck)!r}):\n"
        "    print('3 processes of the user survive', file=sys.stderr); sys.exit(1)"
    )
    with (
        hooked_node(replica, tmp_path, body="import os\n" + body) as (tenant, log, daemon),
        Client(replica.address, tenant) as c,
    ):
        lease = c.wait_active(c.create_lease(2, ttl_s=60).name, timeout=20)
        c.release_lease(lease.name)
        wait_until(lambda: [r["action"] for r in runs(log)].count("end") >= 1, timeout=10)
        # The last tenant may still reach those GPUs: nobody else is offered them meanwhile.
        wait_until(lambda: sum(o.free_gpus for o in c.search_offers(providers=["neo"])) == 2, timeout=10)
        with Client(replica.address, ADMIN_TOKEN) as admin:
            node = admin.get_node("providers/neo/nodes/n1")
        held = {g.uuid: g for g in node.gpus if g.uuid in {x.uuid for x in lease.gpus}}
        assert {g.health for g in held.values()} == {common_pb2.GPU_HEALTH_UNHEALTHY}
        assert all(lease.name in r.message for g in held.values() for r in g.health_reasons)
        assert {r.code for g in held.values() for r in g.health_reasons} == {"LEASE_CLEANUP_PENDING"}
        session = daemon.session
        assert isinstance(session, DaemonSession) and session.provisioner is not None
        assert session.provisioner.unended[lease.name].attempts >= 1

        stuck.unlink()  # the operator fixed what blocked the end: the next retry succeeds

        wait_until(lambda: sum(o.free_gpus for o in c.search_offers(providers=["neo"])) == 4, timeout=15)
        assert not session.provisioner.unended


def test_a_hook_answer_with_terminal_escapes_fails_the_lease_and_its_error_reaches_the_tenant_scrubbed(
    replica: ReplicaThread, tmp_path: Path
) -> None:
    body = (
        "if doc['action'] == 'start' and doc['access']['provider_options'].get('how') == 'answer':\n"
        "    print(json.dumps({'ssh': 'ssh u@h', 'instructions': 'hi\\x1b]0;owned\\x07'})); sys.exit(0)\n"
        "if doc['action'] == 'start':\n"
        "    print('no GPU\\x1b[2J\\u202e', file=sys.stderr); sys.exit(3)"
    )
    with hooked_node(replica, tmp_path, body=body) as (tenant, _, _d), Client(replica.address, tenant) as c:
        answered = c.create_lease(1, ttl_s=60, provider_options={"how": "answer"})
        with pytest.raises(LeaseEnded) as e:
            c.wait_active(answered.name, timeout=20)
        assert e.value.reason == "PROVISIONING_FAILED" and "control or format characters" in e.value.message
        failed = c.create_lease(1, ttl_s=60)
        with pytest.raises(LeaseEnded) as e:
            c.wait_active(failed.name, timeout=20)
        message = c.get_lease(failed.name).end_message
        assert "no GPU" in message and "\x1b" not in message and "\u202e" not in message


def test_a_hook_that_times_out_fails_the_lease(replica: ReplicaThread, tmp_path: Path) -> None:
    body = "if doc['action'] == 'start':\n    time.sleep(30)"
    with (
        hooked_node(replica, tmp_path, body=body, timeout=0.5) as (tenant, _, _d),
        Client(replica.address, tenant) as c,
    ):
        lease = c.create_lease(1, ttl_s=60)
        with pytest.raises(LeaseEnded) as e:
            c.wait_active(lease.name, timeout=20)
        assert "timed out" in e.value.message


def test_a_daemon_restarted_mid_lease_ensures_the_live_ones_and_ends_the_gone_ones(
    replica: ReplicaThread, tmp_path: Path
) -> None:
    with hooked_node(replica, tmp_path) as (tenant, log, daemon), Client(replica.address, tenant) as c:
        kept = c.wait_active(c.create_lease(1, ttl_s=60).name, timeout=20)
        gone = c.wait_active(c.create_lease(1, ttl_s=60).name, timeout=20)
        daemon.stop()
        c.release_lease(gone.name)  # while no daemon runs: its ENDED reaches no one
        assert [r["action"] for r in runs(log)] == ["start", "start"]
        again = DaemonThread(daemon.config, FakeNvml("l40s-4")).start()  # same node, same state dir
        try:
            wait_until(lambda: len(runs(log)) == 4, timeout=20)
            after = {(r["action"], r["lease"]) for r in runs(log)[2:]}
            assert after == {("start", kept.name), ("end", gone.name)}
            assert c.get_lease(kept.name).state == lease_pb2.LEASE_STATE_ACTIVE
            c.release_lease(kept.name)
            wait_until(
                lambda: runs(log)[-1] == {**runs(log)[-1], "action": "end", "lease": kept.name}, timeout=10
            )
        finally:
            again.stop()


def test_another_providers_daemon_cannot_set_a_leases_access_details(
    replica: ReplicaThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import queue
    import threading

    from gpufed.v1 import node_pb2, node_pb2_grpc
    from tests.harness import channel, metadata
    from tests.hostile import gpu_uuid

    with Client(replica.address, ADMIN_TOKEN) as admin:
        evil_token = admin.create_token("provider", "evil").secret
    outbox: queue.Queue[node_pb2.NodeMessage | None] = queue.Queue()
    hello = node_pb2.NodeHello(provider="evil", node_id="x1", lease_hook=True, daemon_version=__version__)
    hello.location.country_code = "DE"
    hello.gpus.add(uuid=gpu_uuid("x1", 0), index=0, model="L40S", memory_total_bytes=48 << 30)
    outbox.put(node_pb2.NodeMessage(hello=hello))

    def messages() -> Iterator[node_pb2.NodeMessage]:
        while True:
            try:
                m = outbox.get(timeout=0.2)
            except queue.Empty:  # keep the stream alive, as a daemon would
                report = node_pb2.NodeMessage(report=common_pb2.NodeReport())
                report.report.gpus.add(uuid=gpu_uuid("x1", 0), health=common_pb2.GPU_HEALTH_HEALTHY)
                yield report
                continue
            if m is None:
                return
            yield m

    ch = channel(replica.address)
    stream = node_pb2_grpc.NodeServiceStub(ch).Connect(messages(), metadata=metadata(evil_token), timeout=60)

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # the stream ends when the test does
            for _ in stream:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with (
            hooked_node(replica, tmp_path, body="time.sleep(1.5)") as (tenant, _, _d),
            Client(replica.address, tenant) as c,
        ):
            lease = c.create_lease(1, ttl_s=30, providers=["neo"])
            forged = node_pb2.ProvisionResult(
                lease=lease.name,
                fencing_token=lease.fencing_token,
                ok=True,
                details=lease_pb2.AccessDetails(ssh="ssh evil@attacker"),
            )
            outbox.put(node_pb2.NodeMessage(provisioned=forged))
            failed = node_pb2.ProvisionResult(
                lease=lease.name, fencing_token=lease.fencing_token, ok=False, error="x"
            )
            outbox.put(node_pb2.NodeMessage(provisioned=failed))
            active = c.wait_active(lease.name, timeout=20)
            assert [d.ssh for d in active.access_details] == [f"ssh u-{lease.name[-8:]}@n1.example"]
            ignored = [r for r in caplog.text.splitlines() if "not a node of the lease" in r]
            assert len(ignored) == 2  # the forged answer and the forged failure, both heard
            c.release_lease(lease.name)
    finally:
        outbox.put(None)
        stream.cancel()
        ch.close()


def test_a_lease_no_hook_answers_within_the_provision_timeout_ends_provisioning_failed(
    etcd: EtcdCluster, prefix: str, tmp_path: Path
) -> None:
    r = ReplicaThread(
        replica_config(etcd.endpoints, prefix, report_interval=0.5, provision_timeout=1.5)
    ).start()
    try:
        body = "if doc['action'] == 'start':\n    time.sleep(60)"  # a daemon that never answers
        with (
            hooked_node(r, tmp_path, body=body, timeout=120) as (tenant, _, _d),
            Client(r.address, tenant) as c,
        ):
            lease = c.create_lease(1, ttl_s=60)
            with pytest.raises(LeaseEnded) as e:
                c.wait_active(lease.name, timeout=20)
            assert e.value.reason == "PROVISIONING_FAILED"
            assert "no lease hook answered within" in e.value.message
            assert sum(o.free_gpus for o in c.search_offers(providers=["neo"])) == 4
    finally:
        r.stop()
