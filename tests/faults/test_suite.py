"""The fault suite (tests/faults/suite.py): its short form in `make test`, the long form
(three rounds, twice the clients) in `make test-faults` (GPUFED_FAULTS=long)."""

from __future__ import annotations

import os

import pytest

from tests.faults.suite import LONG, SHORT, suite

pytestmark = [pytest.mark.integration, pytest.mark.fault]


@pytest.mark.timeout(900)
def test_no_lease_gpu_or_usage_record_is_lost_through_every_fault() -> None:
    plan = LONG if os.environ.get("GPUFED_FAULTS") == "long" else SHORT
    with suite(plan) as s:
        summary = s.run()
    print(summary.text())
    assert summary.violations == []
    # The run did what it claims: every fault, real load, abandoned leases, a record for each.
    assert len(summary.faults) == 8 * plan.rounds
    assert summary.leases_granted >= 20 * plan.rounds
    assert summary.leases_abandoned >= 3 * plan.rounds
    assert summary.usage_records >= summary.leases_granted
    for what, took in summary.recovery_s.items():
        assert all(t >= 0 for t in took), f"never recovered: {what}"
