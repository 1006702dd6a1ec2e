"""The repair lifecycle of a GPU, as GPUd keeps it: what a fault asks for, what clears it, and
when it escalates. Pure functions over the GPU's entry in the node record (its GpuRepair).

- A fault whose action is RESET_GPU, REBOOT_SYSTEM or HARDWARE_INSPECTION makes a pending
  repair; the GPU's health stays at least what the fault made it until the repair is cleared,
  whatever the daemon reports meanwhile (a daemon restart on the same boot is not a repair).
- A reboot (a new boot id in the hello) that shows the GPU clean clears RESET_GPU and
  REBOOT_SYSTEM. HARDWARE_INSPECTION stays until an operator clears it (set_healthy).
- A cleared fault that comes back within ESCALATION_WINDOW_S escalates one step per
  recurrence: RESET_GPU -> REBOOT_SYSTEM -> HARDWARE_INSPECTION.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from gpufed.v1 import common_pb2

NONE = common_pb2.REPAIR_ACTION_NONE
RESTART_APP = common_pb2.REPAIR_ACTION_RESTART_APP
RESET_GPU = common_pb2.REPAIR_ACTION_RESET_GPU
REBOOT_SYSTEM = common_pb2.REPAIR_ACTION_REBOOT_SYSTEM
HARDWARE_INSPECTION = common_pb2.REPAIR_ACTION_HARDWARE_INSPECTION
HEALTHY = common_pb2.GPU_HEALTH_HEALTHY

PENDING = frozenset({RESET_GPU, REBOOT_SYSTEM, HARDWARE_INSPECTION})
CLEARED_BY_REBOOT = frozenset({RESET_GPU, REBOOT_SYSTEM})
ESCALATION_WINDOW_S = 7 * 86400
# After an operator's clear, the daemon may still report the old XIDs until the clear command
# reaches it: reports of only the cleared codes within this time do not bring them back.
OPERATOR_CLEAR_GRACE_S = 15
MAX_CODES = 8
REASON_CODE = "REPAIR_PENDING"


def escalate(action: int, steps: int) -> int:
    return min(HARDWARE_INSPECTION, action + steps) if action in PENDING else action


def faults(reasons: Sequence[common_pb2.HealthReason]) -> tuple[int, list[str]]:
    """The worst repair action the reasons ask for (0 when none asks for a repair) and the
    codes that ask for one."""
    hits = [r for r in reasons if r.action in PENDING]
    return max((r.action for r in hits), default=0), sorted({r.code for r in hits})


def worst_action(reasons: Sequence[common_pb2.HealthReason]) -> int:
    return max((r.action for r in reasons), default=NONE)


def _seconds(a: timestamp_pb2.Timestamp, b: timestamp_pb2.Timestamp) -> float:
    return (a.ToNanoseconds() - b.ToNanoseconds()) / 1e9


def pending(gpu: common_pb2.Gpu) -> bool:
    return gpu.HasField("repair") and gpu.repair.action in PENDING


def observe(
    gpu: common_pb2.Gpu,
    health: int,
    reasons: Sequence[common_pb2.HealthReason],
    boot_id: str,
    now: timestamp_pb2.Timestamp,
    new_boot: bool,
) -> None:
    """Fold what the daemon reports of the GPU (its health and reasons, on boot `boot_id`;
    `new_boot`: the first report of a boot) into its repair, then set the GPU's health and
    reasons: the report's, or the pending repair's when that is worse."""
    action, codes = faults(reasons)
    rep = gpu.repair if gpu.HasField("repair") else None
    if rep is not None and rep.action == NONE and rep.cleared_by != "reboot" and action:
        in_grace = _seconds(now, rep.cleared_time) < OPERATOR_CLEAR_GRACE_S
        if in_grace and set(codes) <= set(rep.cleared_codes):
            action, codes = 0, []  # the daemon has not heard of the operator's clear yet
            health, reasons = HEALTHY, [r for r in reasons if r.code not in rep.cleared_codes]
    if action:
        _record_fault(gpu, action, codes, health, boot_id, now)
    elif rep is not None and rep.action in CLEARED_BY_REBOOT and new_boot:
        _clear(rep, now, "reboot", "a reboot showed the GPU clean")
    _set_health(gpu, health, reasons)


def _record_fault(
    gpu: common_pb2.Gpu,
    action: int,
    codes: list[str],
    health: int,
    boot_id: str,
    now: timestamp_pb2.Timestamp,
) -> None:
    rep = gpu.repair
    if rep.action in PENDING:
        new_codes = sorted(set(rep.codes) | set(codes))[:MAX_CODES]
        rep.action = max(rep.action, escalate(action, rep.escalations))  # type: ignore[assignment]
        del rep.codes[:]
        rep.codes.extend(new_codes)
        rep.health = max(rep.health, health)  # type: ignore[assignment]
        rep.boot_id = boot_id
        return
    recent = gpu.HasField("repair") and rep.HasField("cleared_time")
    recent = recent and _seconds(now, rep.cleared_time) < ESCALATION_WINDOW_S
    recurring = recent and bool(set(codes) & set(rep.cleared_codes))
    escalations = rep.escalations + 1 if recurring else 0
    rep.action = escalate(action, escalations)  # type: ignore[assignment]
    del rep.codes[:]
    rep.codes.extend(codes[:MAX_CODES])
    rep.since.CopyFrom(now)
    rep.boot_id = boot_id
    rep.escalations = escalations
    rep.health = health  # type: ignore[assignment]


def _clear(rep: common_pb2.GpuRepair, now: timestamp_pb2.Timestamp, by: str, why: str) -> None:
    cleared = list(rep.codes)
    rep.action = NONE
    del rep.codes[:]
    del rep.cleared_codes[:]
    rep.cleared_codes.extend(cleared)
    rep.cleared_time.CopyFrom(now)
    rep.cleared_by = by
    rep.cleared_reason = why
    rep.health = HEALTHY


def _set_health(gpu: common_pb2.Gpu, health: int, reasons: Sequence[common_pb2.HealthReason]) -> None:
    out = list(reasons)
    if pending(gpu):
        rep = gpu.repair
        health = max(health, rep.health)
        if not set(rep.codes) <= {r.code for r in out}:
            wanted = common_pb2.RepairAction.Name(rep.action).removeprefix("REPAIR_ACTION_")
            message = f"waiting for {wanted}: {', '.join(rep.codes)}"
            out.append(common_pb2.HealthReason(code=REASON_CODE, message=message[:128], action=rep.action))
    gpu.health = health  # type: ignore[assignment]
    del gpu.health_reasons[:]
    gpu.health_reasons.extend(out[:MAX_CODES])


def set_healthy(gpu: common_pb2.Gpu, who: str, why: str, now: timestamp_pb2.Timestamp) -> None:
    """An operator's clear: the repair, whatever its action, and the GPU's health reasons; a
    later fault starts again from its own action (escalation counts from here)."""
    rep = gpu.repair
    codes = sorted((set(rep.codes) | {r.code for r in gpu.health_reasons}) - {REASON_CODE})[:MAX_CODES]
    del rep.codes[:]
    rep.codes.extend(codes)
    _clear(rep, now, who, why)
    rep.escalations = 0
    _set_health(gpu, HEALTHY, [])
