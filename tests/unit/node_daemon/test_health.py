"""The health rules and their repair actions, row by row of NVIDIA's tables (docs/health.md)."""

from __future__ import annotations

import pytest

from node_daemon.health import (
    DEGRADED,
    HARDWARE_INSPECTION,
    HEALTHY,
    NONE,
    REBOOT_SYSTEM,
    RESET_GPU,
    RESTART_APP,
    UNHEALTHY,
    XID_CATALOG,
    Reading,
    evaluate,
    is_sticky,
    xid_reason,
)


def test_a_clean_reading_is_healthy_with_no_reasons_and_no_action() -> None:
    v = evaluate(Reading())
    assert (v.health, v.reasons, v.action) == (HEALTHY, (), NONE)


# Each XID class of NVIDIA's Xid catalog (Resolution Bucket, Immediate Action).
@pytest.mark.parametrize(
    ("xid", "health", "action"),
    [
        # The application's faults: restart it; the GPU is fine.
        (13, HEALTHY, RESTART_APP),
        (31, HEALTHY, RESTART_APP),
        (43, HEALTHY, RESTART_APP),
        (68, HEALTHY, RESTART_APP),
        (94, HEALTHY, RESTART_APP),  # contained ECC: the app is killed, the remap is pending
        (109, HEALTHY, RESTART_APP),
        # Informational.
        (45, HEALTHY, NONE),
        (121, HEALTHY, NONE),
        (92, DEGRADED, NONE),
        # Reset the GPU.
        (48, UNHEALTHY, RESET_GPU),
        (63, DEGRADED, RESET_GPU),
        (64, UNHEALTHY, RESET_GPU),
        (74, UNHEALTHY, RESET_GPU),
        (95, UNHEALTHY, RESET_GPU),
        (119, UNHEALTHY, RESET_GPU),
        (120, UNHEALTHY, RESET_GPU),
        (140, UNHEALTHY, RESET_GPU),
        # Reboot the host.
        (79, UNHEALTHY, REBOOT_SYSTEM),
        (143, UNHEALTHY, REBOOT_SYSTEM),
        # Not in the catalog: shown, offered only on request, no action guessed.
        (999, DEGRADED, NONE),
    ],
)
def test_each_xid_class_carries_the_catalogs_action(xid: int, health: int, action: int) -> None:
    got_health, reason = xid_reason(xid)
    assert (got_health, reason.code, reason.action) == (health, f"XID_{xid}", action)
    # Only an XID that points at the GPU stays with it (and shows in every later reading).
    assert is_sticky(xid) == (health != HEALTHY)
    if is_sticky(xid):
        v = evaluate(Reading(xids=frozenset({xid})))
        assert (v.health, v.action) == (health, action)


def test_every_catalog_row_has_a_name_and_a_known_action() -> None:
    for xid, rule in XID_CATALOG.items():
        assert rule.name and rule.action in (NONE, RESTART_APP, RESET_GPU, REBOOT_SYSTEM), xid


@pytest.mark.parametrize(
    ("reading", "health", "code", "action"),
    [
        (Reading(ecc_volatile_uncorrected=1), UNHEALTHY, "ECC_DBE_VOLATILE", RESET_GPU),
        (Reading(ecc_volatile_uncorrected=0), HEALTHY, None, NONE),
        (Reading(remapped_rows_failure=True), UNHEALTHY, "ROW_REMAP_FAILURE", HARDWARE_INSPECTION),
        (Reading(remapped_rows_pending=True), DEGRADED, "ROW_REMAP_PENDING", RESET_GPU),
        (Reading(retired_pages_pending=True), DEGRADED, "PAGE_RETIREMENT_PENDING", RESET_GPU),
        (Reading(clock_event_reasons=0x40), DEGRADED, "THERMAL_SLOWDOWN", NONE),
        (Reading(clock_event_reasons=0x20), DEGRADED, "THERMAL_SLOWDOWN", NONE),
        (Reading(clock_event_reasons=0x80), DEGRADED, "POWER_SLOWDOWN", NONE),
        (Reading(clock_event_reasons=0x01 | 0x04), HEALTHY, None, NONE),  # idle, power cap: normal
        (Reading(lost=True), UNHEALTHY, "GPU_LOST", REBOOT_SYSTEM),
        (Reading(ecc_volatile_uncorrected=None, remapped_rows_failure=None), HEALTHY, None, NONE),
    ],
)
def test_ecc_remap_slowdown_and_lost_rows_with_their_actions(
    reading: Reading, health: int, code: str | None, action: int
) -> None:
    v = evaluate(reading)
    assert (v.health, v.action) == (health, action)
    if code is not None:
        assert code in v.codes


def test_the_worst_verdict_and_action_win_and_every_reason_is_kept() -> None:
    v = evaluate(Reading(clock_event_reasons=0x40, xids=frozenset({79}), remapped_rows_failure=True))
    assert (v.health, v.action) == (UNHEALTHY, HARDWARE_INSPECTION)
    assert {"THERMAL_SLOWDOWN", "XID_79", "ROW_REMAP_FAILURE"} <= v.codes
    assert {r.action for r in v.to_proto_reasons()} == {NONE, REBOOT_SYSTEM, HARDWARE_INSPECTION}


def test_pcie_replays_beyond_nvidias_eight_per_minute_degrade_the_gpu_and_say_how_busy_the_link_was() -> None:
    assert evaluate(Reading(pcie_replays_last_minute=8)).health == HEALTHY
    v = evaluate(Reading(pcie_replays_last_minute=9, pcie_bytes_per_second=4.2e9))
    assert v.health == DEGRADED and v.codes == {"PCIE_REPLAY_RATE"}
    assert "9 PCIe replays" in v.reasons[0].message and "4.2 GB/s" in v.reasons[0].message
    assert v.action == NONE  # a rate: it clears when the link does
