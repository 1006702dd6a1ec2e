"""GPU health rules and repair actions, from NVIDIA's own tables (docs/health.md cites them).

Theory of operation: a GPU's health is the worst verdict of a small set of table rows, each a
pure predicate over one reading. Every reason carries a machine-readable code (XID_79,
ECC_DBE_VOLATILE, ...) and the repair it asks for (RepairAction), so operators, tenants and
the control plane's repair lifecycle (control_plane/domain/repair.py) see why and what to do.

XIDs that point at the GPU are sticky for the life of the daemon process; XIDs that point at
the application (RESTART_APP) are told once, in the event, and leave the GPU's health alone.
What clears a fault is the control plane's business: a reboot that shows the GPU clean, or an
operator (AdminService.SetGpuHealthy, which makes the daemon forget the GPU's XIDs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from gpufed.v1 import common_pb2

HEALTHY = common_pb2.GPU_HEALTH_HEALTHY
DEGRADED = common_pb2.GPU_HEALTH_DEGRADED
UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY

NONE = common_pb2.REPAIR_ACTION_NONE
RESTART_APP = common_pb2.REPAIR_ACTION_RESTART_APP
RESET_GPU = common_pb2.REPAIR_ACTION_RESET_GPU
REBOOT_SYSTEM = common_pb2.REPAIR_ACTION_REBOOT_SYSTEM
HARDWARE_INSPECTION = common_pb2.REPAIR_ACTION_HARDWARE_INSPECTION


class XidRule(NamedTuple):
    health: int
    action: int
    name: str


# NVIDIA's Xid catalog (Ampere and newer), "Resolution Bucket (Immediate Action)": RESTART_APP,
# RESET_GPU, RESTART_BM (here REBOOT_SYSTEM), IGNORE (NONE). What the GPU's health becomes is
# ours: a fault of the application leaves the GPU HEALTHY; one that needs a reset or a reboot
# takes the GPU out of offers.
XID_CATALOG: dict[int, XidRule] = {
    8: XidRule(HEALTHY, RESTART_APP, "GPU stopped processing"),
    13: XidRule(HEALTHY, RESTART_APP, "graphics engine exception"),
    31: XidRule(HEALTHY, RESTART_APP, "GPU memory page fault"),
    43: XidRule(HEALTHY, RESTART_APP, "GPU stopped processing"),
    45: XidRule(HEALTHY, NONE, "preemptive cleanup after an earlier error"),
    48: XidRule(UNHEALTHY, RESET_GPU, "double-bit ECC error"),
    61: XidRule(UNHEALTHY, RESET_GPU, "internal micro-controller breakpoint"),
    62: XidRule(UNHEALTHY, RESET_GPU, "internal micro-controller halt"),
    63: XidRule(DEGRADED, RESET_GPU, "ECC page retirement or row remap recorded"),
    64: XidRule(UNHEALTHY, RESET_GPU, "ECC page retirement or row remap recording failed"),
    68: XidRule(HEALTHY, RESTART_APP, "video decoder exception"),
    69: XidRule(HEALTHY, RESTART_APP, "graphics engine class error"),
    74: XidRule(UNHEALTHY, RESET_GPU, "NVLink error"),
    79: XidRule(UNHEALTHY, REBOOT_SYSTEM, "GPU has fallen off the bus"),
    92: XidRule(DEGRADED, NONE, "high single-bit ECC error rate"),
    94: XidRule(HEALTHY, RESTART_APP, "contained ECC error"),
    95: XidRule(UNHEALTHY, RESET_GPU, "uncontained ECC error"),
    109: XidRule(HEALTHY, RESTART_APP, "context switch timeout"),
    119: XidRule(UNHEALTHY, RESET_GPU, "GSP RPC timeout"),
    120: XidRule(UNHEALTHY, RESET_GPU, "GSP error"),
    121: XidRule(HEALTHY, NONE, "C2C link corrected error"),
    140: XidRule(UNHEALTHY, RESET_GPU, "unrecovered ECC error"),
    143: XidRule(UNHEALTHY, REBOOT_SYSTEM, "GPU initialization failure"),
}
# An XID the catalog does not list: shown, and the GPU offered only on request.
UNLISTED_XID = XidRule(DEGRADED, NONE, "not in NVIDIA's Xid catalog")


def xid_rule(xid: int) -> XidRule:
    return XID_CATALOG.get(xid, UNLISTED_XID)


def is_sticky(xid: int) -> bool:
    """Whether an XID stays on the GPU (it points at the GPU) or is told once (the app's)."""
    return xid_rule(xid).health != HEALTHY


# DCGM's PCIe health watch: more than 8 replays per minute is beyond what NVIDIA's driver team
# recommends (dcgm's DCGM_LIMIT_MAX_PCIREPLAY_RATE, DCGM_FR_PCI_REPLAY_RATE): the link is
# retrying, so every transfer of the tenant's is slower; reseat the card or check the riser.
PCIE_REPLAY_LIMIT = 8
PCIE_REPLAY_WINDOW_S = 60.0

# NVML clock event reasons that mean the GPU is being slowed by heat or power trouble.
THERMAL_SLOWDOWN = 0x20 | 0x40  # SwThermalSlowdown | HwThermalSlowdown
POWER_SLOWDOWN = 0x08 | 0x80  # HwSlowdown | HwPowerBrakeSlowdown


@dataclass(frozen=True, slots=True)
class Reading:
    """What the rules look at; None means the GPU does not support that counter."""

    lost: bool = False
    xids: frozenset[int] = frozenset()
    ecc_volatile_uncorrected: int | None = None
    remapped_rows_failure: bool | None = None
    remapped_rows_pending: bool | None = None
    retired_pages_pending: bool | None = None
    clock_event_reasons: int | None = None
    pcie_replays_last_minute: int | None = None
    # PCIe traffic both ways (NVML GPM), to tell in the reason how busy the link was.
    pcie_bytes_per_second: float | None = None


class Reason(NamedTuple):
    code: str
    message: str
    action: int


@dataclass(frozen=True, slots=True)
class Verdict:
    health: int
    reasons: tuple[Reason, ...] = field(default_factory=tuple)

    @property
    def codes(self) -> frozenset[str]:
        return frozenset(r.code for r in self.reasons)

    @property
    def action(self) -> int:
        """The worst action of the reasons (NONE for a clean GPU)."""
        return max((r.action for r in self.reasons), default=NONE)

    def to_proto_reasons(self) -> list[common_pb2.HealthReason]:
        return [
            common_pb2.HealthReason(code=r.code, message=r.message, action=r.action)  # type: ignore[arg-type]
            for r in self.reasons
        ]


Hit = tuple[int, Reason]
Rule = Callable[[Reading], Iterable[Hit]]


def xid_reason(xid: int) -> Hit:
    rule = xid_rule(xid)
    return rule.health, Reason(f"XID_{xid}", f"XID {xid}: {rule.name}", rule.action)


def _lost(r: Reading) -> Iterable[Hit]:
    if r.lost:
        yield UNHEALTHY, Reason("GPU_LOST", "NVML reports the GPU as lost or failing", REBOOT_SYSTEM)


def _xids(r: Reading) -> Iterable[Hit]:
    for xid in sorted(r.xids):
        yield xid_reason(xid)


def _ecc(r: Reading) -> Iterable[Hit]:
    if r.ecc_volatile_uncorrected:
        yield (
            UNHEALTHY,
            Reason(
                "ECC_DBE_VOLATILE",
                f"{r.ecc_volatile_uncorrected} uncorrectable ECC errors since boot",
                RESET_GPU,
            ),
        )


def _remap(r: Reading) -> Iterable[Hit]:
    # NVIDIA's row-remapping guidance: a failed remap means the bank has no spare rows left
    # (replace the GPU); a pending one takes effect at the next GPU reset.
    if r.remapped_rows_failure:
        yield (
            UNHEALTHY,
            Reason(
                "ROW_REMAP_FAILURE", "row remapping failed: the GPU should be replaced", HARDWARE_INSPECTION
            ),
        )
    if r.remapped_rows_pending:
        yield DEGRADED, Reason("ROW_REMAP_PENDING", "a row remap is pending: reset the GPU", RESET_GPU)
    if r.retired_pages_pending:
        yield (
            DEGRADED,
            Reason("PAGE_RETIREMENT_PENDING", "a page retirement is pending: reset the GPU", RESET_GPU),
        )


def _slowdown(r: Reading) -> Iterable[Hit]:
    reasons = r.clock_event_reasons or 0
    if reasons & THERMAL_SLOWDOWN:
        yield DEGRADED, Reason("THERMAL_SLOWDOWN", "clocks reduced by thermal slowdown", NONE)
    if reasons & POWER_SLOWDOWN:
        yield DEGRADED, Reason("POWER_SLOWDOWN", "clocks reduced by power or hardware slowdown", NONE)


def _pcie(r: Reading) -> Iterable[Hit]:
    n = r.pcie_replays_last_minute
    if n is not None and n > PCIE_REPLAY_LIMIT:
        traffic = (
            f" at {r.pcie_bytes_per_second / 1e9:.1f} GB/s" if r.pcie_bytes_per_second is not None else ""
        )
        yield (
            DEGRADED,
            Reason(
                "PCIE_REPLAY_RATE",
                f"{n} PCIe replays in the last minute{traffic} (NVIDIA's limit is {PCIE_REPLAY_LIMIT}): "
                "reseat the card or check its riser if it persists",
                NONE,
            ),
        )


RULES: tuple[Rule, ...] = (_lost, _xids, _ecc, _remap, _slowdown, _pcie)


def evaluate(reading: Reading) -> Verdict:
    found = [hit for rule in RULES for hit in rule(reading)]
    return verdict_of(found)


def verdict_of(found: list[Hit]) -> Verdict:
    if not found:
        return Verdict(HEALTHY)
    worst = max(h for h, _ in found)
    return Verdict(worst, tuple(reason for _, reason in found))
