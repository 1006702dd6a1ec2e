"""GPU health rules, from NVIDIA's own tables (XID catalogue and the DCGM/NVSentinel guidance).

Theory of operation: a GPU's health is the worst verdict of a small set of table rows, each a
pure predicate over one reading. Verdicts carry machine-readable reason codes (XID_79,
ECC_DBE_VOLATILE, ...) so operators and tenants see why. XIDs are sticky for the life of the
daemon process: a GPU that threw a fatal XID stays UNHEALTHY until the daemon restarts on a clean
GPU (after the reset an operator does anyway), which is how health recovers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gpufed.v1 import common_pb2

HEALTHY = common_pb2.GPU_HEALTH_HEALTHY
DEGRADED = common_pb2.GPU_HEALTH_DEGRADED
UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY

# XIDs after which the GPU needs a reset or replacement: 48 DBE, 64 ECC page retirement failure,
# 74 NVLink error, 79 fallen off the bus, 95 uncontained ECC, 119/120 GSP errors, 140 unrecovered
# ECC.
FATAL_XIDS = frozenset({48, 64, 74, 79, 95, 119, 120, 140})
# Raised by applications (illegal address, exceptions, timeouts): not the GPU's fault.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

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


@dataclass(frozen=True, slots=True)
class Verdict:
    health: int
    reasons: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_proto_reasons(self) -> list[common_pb2.HealthReason]:
        return [common_pb2.HealthReason(code=c, message=m) for c, m in self.reasons]


Rule = Callable[[Reading], Iterable[tuple[int, str, str]]]


def _lost(r: Reading) -> Iterable[tuple[int, str, str]]:
    if r.lost:
        yield UNHEALTHY, "GPU_LOST", "NVML reports the GPU as lost or failing"


def _xids(r: Reading) -> Iterable[tuple[int, str, str]]:
    for xid in sorted(r.xids):
        if xid in FATAL_XIDS:
            yield UNHEALTHY, f"XID_{xid}", f"XID {xid}: the GPU needs a reset"
        elif xid not in APPLICATION_XIDS:
            yield DEGRADED, f"XID_{xid}", f"XID {xid} seen"


def _ecc(r: Reading) -> Iterable[tuple[int, str, str]]:
    if r.ecc_volatile_uncorrected:
        yield (
            UNHEALTHY,
            "ECC_DBE_VOLATILE",
            f"{r.ecc_volatile_uncorrected} uncorrectable ECC errors since boot",
        )


def _remap(r: Reading) -> Iterable[tuple[int, str, str]]:
    if r.remapped_rows_failure:
        yield UNHEALTHY, "ROW_REMAP_FAILURE", "row remapping failed: the GPU should be replaced"
    if r.remapped_rows_pending:
        yield DEGRADED, "ROW_REMAP_PENDING", "a row remap is pending: reset the GPU"
    if r.retired_pages_pending:
        yield DEGRADED, "PAGE_RETIREMENT_PENDING", "a page retirement is pending: reset the GPU"


def _slowdown(r: Reading) -> Iterable[tuple[int, str, str]]:
    reasons = r.clock_event_reasons or 0
    if reasons & THERMAL_SLOWDOWN:
        yield DEGRADED, "THERMAL_SLOWDOWN", "clocks reduced by thermal slowdown"
    if reasons & POWER_SLOWDOWN:
        yield DEGRADED, "POWER_SLOWDOWN", "clocks reduced by power or hardware slowdown"


RULES: tuple[Rule, ...] = (_lost, _xids, _ecc, _remap, _slowdown)


def evaluate(reading: Reading) -> Verdict:
    found = [hit for rule in RULES for hit in rule(reading)]
    if not found:
        return Verdict(HEALTHY)
    worst = max(h for h, _, _ in found)
    return Verdict(worst, tuple((code, msg) for _, code, msg in found))
