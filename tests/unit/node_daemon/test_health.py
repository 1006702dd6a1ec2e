"""The health rules, row by row of NVIDIA's tables."""

from __future__ import annotations

import pytest

from node_daemon.health import APPLICATION_XIDS, DEGRADED, FATAL_XIDS, HEALTHY, UNHEALTHY, Reading, evaluate


def test_a_clean_reading_is_healthy_with_no_reasons() -> None:
    v = evaluate(Reading())
    assert v.health == HEALTHY
    assert v.reasons == ()


@pytest.mark.parametrize("xid", sorted(FATAL_XIDS))
def test_fatal_xids_make_the_gpu_unhealthy(xid: int) -> None:
    v = evaluate(Reading(xids=frozenset({xid})))
    assert v.health == UNHEALTHY
    assert (f"XID_{xid}") in dict(v.reasons)


@pytest.mark.parametrize("xid", sorted(APPLICATION_XIDS))
def test_application_xids_leave_the_gpu_healthy(xid: int) -> None:
    assert evaluate(Reading(xids=frozenset({xid}))).health == HEALTHY


@pytest.mark.parametrize("xid", [8, 32, 56, 57, 61, 62, 63, 92, 94])
def test_other_xids_degrade_the_gpu(xid: int) -> None:
    v = evaluate(Reading(xids=frozenset({xid})))
    assert v.health == DEGRADED
    assert f"XID_{xid}" in dict(v.reasons)


@pytest.mark.parametrize(
    ("reading", "health", "code"),
    [
        (Reading(ecc_volatile_uncorrected=1), UNHEALTHY, "ECC_DBE_VOLATILE"),
        (Reading(ecc_volatile_uncorrected=0), HEALTHY, None),
        (Reading(remapped_rows_failure=True), UNHEALTHY, "ROW_REMAP_FAILURE"),
        (Reading(remapped_rows_pending=True), DEGRADED, "ROW_REMAP_PENDING"),
        (Reading(retired_pages_pending=True), DEGRADED, "PAGE_RETIREMENT_PENDING"),
        (Reading(clock_event_reasons=0x40), DEGRADED, "THERMAL_SLOWDOWN"),
        (Reading(clock_event_reasons=0x20), DEGRADED, "THERMAL_SLOWDOWN"),
        (Reading(clock_event_reasons=0x80), DEGRADED, "POWER_SLOWDOWN"),
        (Reading(clock_event_reasons=0x01 | 0x04), HEALTHY, None),  # idle, software power cap: normal
        (Reading(lost=True), UNHEALTHY, "GPU_LOST"),
        (Reading(ecc_volatile_uncorrected=None, remapped_rows_failure=None), HEALTHY, None),
    ],
)
def test_ecc_remap_slowdown_and_lost_rows(reading: Reading, health: int, code: str | None) -> None:
    v = evaluate(reading)
    assert v.health == health
    if code is not None:
        assert code in dict(v.reasons)


def test_the_worst_verdict_wins_and_every_reason_is_kept() -> None:
    v = evaluate(Reading(clock_event_reasons=0x40, xids=frozenset({79})))
    assert v.health == UNHEALTHY
    assert {"THERMAL_SLOWDOWN", "XID_79"} <= set(dict(v.reasons))
