"""The repair lifecycle end to end: a daemon over the fake NVML reports faults, restarts and
"reboots" (a new boot id), and an operator clears what only an operator may clear."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from gpufed.client import Client, GpufedError
from gpufed.v1 import common_pb2
from node_daemon.fake_nvml import FakeNvml, parse_event
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration
NODE = "providers/neo/nodes/n1"
HEALTHY, UNHEALTHY = common_pb2.GPU_HEALTH_HEALTHY, common_pb2.GPU_HEALTH_UNHEALTHY
NONE, RESET_GPU, REBOOT_SYSTEM, HARDWARE_INSPECTION = (
    common_pb2.REPAIR_ACTION_NONE,
    common_pb2.REPAIR_ACTION_RESET_GPU,
    common_pb2.REPAIR_ACTION_REBOOT_SYSTEM,
    common_pb2.REPAIR_ACTION_HARDWARE_INSPECTION,
)


class Host:
    """One host whose daemon can be restarted, on the same boot or after a reboot."""

    def __init__(self, address: str, token: str) -> None:
        self.address, self.token = address, token
        self.daemon: DaemonThread | None = None
        self.nvml: FakeNvml | None = None

    def boot(self, boot_id: str) -> FakeNvml:
        """Start the daemon again (a fresh process: the fake GPU clean) on boot `boot_id`, and
        wait until its hello is in the node record."""
        self.stop()
        self.nvml = FakeNvml("h100-sxm-8", host="neo/n1")
        cfg = daemon_config([self.address], self.token, "neo", "n1", boot_id=boot_id)
        self.daemon = DaemonThread(cfg, self.nvml).start()
        with Client(self.address, ADMIN_TOKEN) as admin:

            def registered() -> bool:
                node = admin.get_node(NODE)
                return node.boot_id == boot_id and node.state == common_pb2.NODE_STATE_READY

            wait_until(registered, timeout=15)
        return self.nvml

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


@pytest.fixture
def host(etcd: EtcdCluster) -> Iterator[tuple[Host, Client]]:
    replica = ReplicaThread(replica_config(etcd.endpoints, unique_prefix())).start()
    admin = Client(replica.address, ADMIN_TOKEN)
    h = Host(replica.address, admin.create_token("provider", "neo").secret)
    try:
        yield h, admin
    finally:
        h.stop()
        admin.close()
        replica.stop()


def gpu(admin: Client, index: int) -> common_pb2.Gpu:
    return next(g for g in admin.get_node(NODE).gpus if g.index == index and not g.parent_uuid)


def wait_gpu(admin: Client, index: int, health: int, action: int) -> common_pb2.Gpu:
    def there() -> bool:
        g = gpu(admin, index)
        return g.health == health and (g.repair.action if g.HasField("repair") else NONE) == action

    wait_until(there, timeout=15)
    return gpu(admin, index)


def test_a_reset_fault_survives_a_daemon_restart_clears_at_reboot_and_escalates_when_it_comes_back(
    host: tuple[Host, Client],
) -> None:
    h, admin = host
    nvml = h.boot("boot-a")
    wait_gpu(admin, 2, HEALTHY, NONE)
    nvml.apply(parse_event("0:2:xid=48"))  # double-bit ECC: reset the GPU
    g = wait_gpu(admin, 2, UNHEALTHY, RESET_GPU)
    assert {(r.code, r.action) for r in g.health_reasons} >= {("XID_48", RESET_GPU)}

    h.boot("boot-a")  # the daemon restarts, the host did not: not a repair
    # Its hello shows the GPU clean; the record keeps it UNHEALTHY for the pending repair.
    wait_until(lambda: "REPAIR_PENDING" in {r.code for r in gpu(admin, 2).health_reasons}, timeout=15)
    g = gpu(admin, 2)
    assert (g.health, g.repair.action) == (UNHEALTHY, RESET_GPU)

    h.boot("boot-b")  # a reboot, and the GPU is clean
    g = wait_gpu(admin, 2, HEALTHY, NONE)
    assert (g.repair.cleared_by, list(g.repair.cleared_codes)) == ("reboot", ["XID_48"])

    h.nvml.apply(parse_event("0:2:xid=48"))  # type: ignore[union-attr]  # it comes back
    g = wait_gpu(admin, 2, UNHEALTHY, REBOOT_SYSTEM)
    assert g.repair.escalations == 1

    h.boot("boot-c")
    wait_gpu(admin, 2, HEALTHY, NONE)
    h.nvml.apply(parse_event("0:2:xid=48"))  # type: ignore[union-attr]  # and again
    wait_gpu(admin, 2, UNHEALTHY, HARDWARE_INSPECTION)

    h.boot("boot-d")  # no reboot clears a hardware inspection
    g = wait_gpu(admin, 2, UNHEALTHY, HARDWARE_INSPECTION)
    offered = {u for o in admin.search_offers(gpu_model="H100") for u in o.gpu_uuids}
    assert g.uuid not in offered and len(offered) == 7

    node = admin.set_gpu_healthy(NODE, g.uuid, "replaced the HBM stack, ticket 4711")
    cleared = next(x for x in node.gpus if x.uuid == g.uuid)
    assert cleared.health == HEALTHY and cleared.repair.action == NONE
    assert cleared.repair.cleared_by == "admin:bootstrap-admin"
    assert list(cleared.repair.cleared_codes) == ["XID_48"]
    wait_until(lambda: g.uuid in {u for o in admin.search_offers(gpu_model="H100") for u in o.gpu_uuids})


def test_an_operator_clear_reaches_the_daemon_and_the_old_xid_does_not_come_back(
    host: tuple[Host, Client],
) -> None:
    import time

    h, admin = host
    nvml = h.boot("boot-a")
    wait_gpu(admin, 5, HEALTHY, NONE)
    nvml.apply(parse_event("0:5:xid=74"))  # NVLink error: reset the GPU
    g = wait_gpu(admin, 5, UNHEALTHY, RESET_GPU)
    admin.set_gpu_healthy(NODE, g.uuid, "reset with nvidia-smi -r")
    # The daemon forgets the XID: reports stay clean past the grace the control plane allows.
    wait_until(lambda: 74 not in h.daemon.session.collector.gpus[5].xids, timeout=5)  # type: ignore[union-attr]
    time.sleep(2.0)
    assert gpu(admin, 5).health == HEALTHY


def test_a_row_remap_failure_asks_for_hardware_inspection_at_once(host: tuple[Host, Client]) -> None:
    h, admin = host
    nvml = h.boot("boot-a")
    wait_gpu(admin, 1, HEALTHY, NONE)
    nvml.apply(parse_event("0:1:remap_failure"))
    g = wait_gpu(admin, 1, UNHEALTHY, HARDWARE_INSPECTION)
    assert ("ROW_REMAP_FAILURE", HARDWARE_INSPECTION) in {(r.code, r.action) for r in g.health_reasons}


def test_set_healthy_wants_a_reason_an_existing_gpu_and_an_admin(host: tuple[Host, Client]) -> None:
    h, admin = host
    h.boot("boot-a")
    wait_gpu(admin, 0, HEALTHY, NONE)
    uuid = gpu(admin, 0).uuid
    for node, gpu_uuid, why, code, reason in [
        (NODE, uuid, "", grpc.StatusCode.INVALID_ARGUMENT, "REASON_REQUIRED"),
        (NODE, "GPU-nope", "x", grpc.StatusCode.NOT_FOUND, "GPU_NOT_FOUND"),
        ("providers/neo/nodes/gone", uuid, "x", grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND"),
    ]:
        with pytest.raises(GpufedError) as e:
            admin.set_gpu_healthy(node, gpu_uuid, why)
        assert (e.value.code, e.value.reason) == (code, reason)
    tenant = Client(h.address, admin.create_token("tenant", "dev").secret)
    try:
        with pytest.raises(GpufedError) as e:
            tenant.set_gpu_healthy(NODE, uuid, "not mine to say")
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        tenant.close()
