"""The repair lifecycle (control_plane.domain.repair): what sets a repair, what clears it, when it
escalates, over a GPU entry and a fake clock."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from control_plane.domain import repair
from control_plane.domain.repair import HARDWARE_INSPECTION, NONE, REBOOT_SYSTEM, RESET_GPU, RESTART_APP
from gpufed.v1 import common_pb2

HEALTHY, DEGRADED, UNHEALTHY = (
    common_pb2.GPU_HEALTH_HEALTHY,
    common_pb2.GPU_HEALTH_DEGRADED,
    common_pb2.GPU_HEALTH_UNHEALTHY,
)
DAY = 86400


def ts(s: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(s))


def reason(code: str, action: int) -> common_pb2.HealthReason:
    return common_pb2.HealthReason(code=code, message=code, action=action)  # type: ignore[arg-type]


XID_48 = reason("XID_48", RESET_GPU)
XID_79 = reason("XID_79", REBOOT_SYSTEM)
REMAP_FAILURE = reason("ROW_REMAP_FAILURE", HARDWARE_INSPECTION)


def see(
    gpu: common_pb2.Gpu, health: int, reasons: list[common_pb2.HealthReason], boot: str, t: float
) -> None:
    """What a hello (a new boot when `boot` changes) or a report shows."""
    new_boot = gpu.repair.boot_id != boot if gpu.HasField("repair") else False
    repair.observe(gpu, health, reasons, boot, ts(t), new_boot=new_boot)


@pytest.mark.parametrize(
    ("reasons", "action", "health"),
    [
        ([XID_48], RESET_GPU, UNHEALTHY),
        ([XID_79], REBOOT_SYSTEM, UNHEALTHY),
        ([REMAP_FAILURE], HARDWARE_INSPECTION, UNHEALTHY),
        ([reason("ROW_REMAP_PENDING", RESET_GPU)], RESET_GPU, DEGRADED),
        ([XID_48, XID_79], REBOOT_SYSTEM, UNHEALTHY),
    ],
)
def test_a_fault_that_asks_for_a_repair_makes_one_pending(
    reasons: list[common_pb2.HealthReason], action: int, health: int
) -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, health, reasons, "boot-a", 0)
    assert gpu.repair.action == action and gpu.health == health
    assert list(gpu.repair.codes) == sorted(r.code for r in reasons)


@pytest.mark.parametrize("r", [reason("XID_13", RESTART_APP), reason("THERMAL_SLOWDOWN", NONE)])
def test_faults_without_a_repair_leave_no_repair(r: common_pb2.HealthReason) -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, DEGRADED, [r], "boot-a", 0)
    assert not gpu.HasField("repair") and gpu.health == DEGRADED


def test_a_daemon_restart_on_the_same_boot_is_not_a_repair() -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [XID_48], "boot-a", 0)
    see(gpu, HEALTHY, [], "boot-a", 60)  # the restarted daemon forgot the XID
    assert gpu.health == UNHEALTHY and gpu.repair.action == RESET_GPU
    assert [r.code for r in gpu.health_reasons] == [repair.REASON_CODE]
    assert gpu.health_reasons[0].action == RESET_GPU


@pytest.mark.parametrize("fault", [XID_48, XID_79])
def test_a_reboot_that_shows_the_gpu_clean_clears_reset_and_reboot(fault: common_pb2.HealthReason) -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [fault], "boot-a", 0)
    see(gpu, HEALTHY, [], "boot-b", 300)
    assert gpu.health == HEALTHY and not gpu.health_reasons
    assert gpu.repair.action == NONE and gpu.repair.cleared_by == "reboot"
    assert list(gpu.repair.cleared_codes) == [fault.code]


def test_a_reboot_that_still_shows_the_fault_clears_nothing() -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [XID_79], "boot-a", 0)
    see(gpu, UNHEALTHY, [XID_79], "boot-b", 300)
    assert gpu.repair.action == REBOOT_SYSTEM and gpu.health == UNHEALTHY


def test_hardware_inspection_survives_reboots_until_an_operator_clears_it() -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [REMAP_FAILURE], "boot-a", 0)
    see(gpu, HEALTHY, [], "boot-b", 300)
    see(gpu, HEALTHY, [], "boot-c", 600)
    assert gpu.health == UNHEALTHY and gpu.repair.action == HARDWARE_INSPECTION
    repair.set_healthy(gpu, "admin:ops", "GPU replaced, ticket 42", ts(900))
    assert gpu.health == HEALTHY and not gpu.health_reasons
    assert gpu.repair.action == NONE
    assert (gpu.repair.cleared_by, gpu.repair.cleared_reason) == ("admin:ops", "GPU replaced, ticket 42")


def test_a_fault_that_comes_back_after_a_reboot_escalates_one_step_each_time() -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [XID_48], "boot-a", 0)
    assert gpu.repair.action == RESET_GPU
    see(gpu, HEALTHY, [], "boot-b", 100)  # cleared by the reboot
    see(gpu, UNHEALTHY, [XID_48], "boot-b", 200)
    assert (gpu.repair.action, gpu.repair.escalations) == (REBOOT_SYSTEM, 1)
    see(gpu, HEALTHY, [], "boot-c", 300)
    assert gpu.repair.action == NONE  # REBOOT_SYSTEM is cleared by a reboot too
    see(gpu, UNHEALTHY, [XID_48], "boot-c", 400)
    assert (gpu.repair.action, gpu.repair.escalations) == (HARDWARE_INSPECTION, 2)
    see(gpu, HEALTHY, [], "boot-d", 500)
    assert gpu.repair.action == HARDWARE_INSPECTION and gpu.health == UNHEALTHY


def test_another_fault_or_one_past_the_window_starts_again_from_its_own_action() -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [XID_48], "boot-a", 0)
    see(gpu, HEALTHY, [], "boot-b", 100)
    see(gpu, UNHEALTHY, [reason("XID_74", RESET_GPU)], "boot-b", 200)  # a different fault
    assert (gpu.repair.action, gpu.repair.escalations) == (RESET_GPU, 0)
    see(gpu, HEALTHY, [], "boot-c", 300)
    see(gpu, UNHEALTHY, [reason("XID_74", RESET_GPU)], "boot-c", 300 + repair.ESCALATION_WINDOW_S + 1)
    assert (gpu.repair.action, gpu.repair.escalations) == (RESET_GPU, 0)


def test_reports_of_the_cleared_codes_right_after_an_operator_clear_do_not_bring_them_back() -> None:
    gpu = common_pb2.Gpu(uuid="GPU-1")
    see(gpu, UNHEALTHY, [XID_48], "boot-a", 0)
    repair.set_healthy(gpu, "admin:ops", "reset by hand", ts(100))
    see(gpu, UNHEALTHY, [XID_48], "boot-a", 101)  # the daemon has not heard of the clear yet
    assert gpu.health == HEALTHY and gpu.repair.action == NONE
    # Later, the same XID again is a new fault, and one that came back: it escalates.
    see(gpu, UNHEALTHY, [XID_48], "boot-a", 100 + repair.OPERATOR_CLEAR_GRACE_S + 1)
    assert (gpu.repair.action, gpu.repair.escalations) == (REBOOT_SYSTEM, 1)


def test_the_escalation_ladder_stops_at_hardware_inspection() -> None:
    assert repair.escalate(RESET_GPU, 1) == REBOOT_SYSTEM
    assert repair.escalate(RESET_GPU, 5) == HARDWARE_INSPECTION
    assert repair.escalate(REBOOT_SYSTEM, 1) == HARDWARE_INSPECTION
    assert repair.escalate(NONE, 3) == NONE
