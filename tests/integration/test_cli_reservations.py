"""`gpufed reservation` and the windowed `capacity` / `offers search` end to end against a real
federation of two replicas."""

from __future__ import annotations

import json
import time

import pytest

from gpufed.client import Client
from tests.harness import reservations_open, wait_until
from tests.integration.federation import Federation
from tests.integration.test_cli import gpufed

pytestmark = pytest.mark.integration


def _open(fed: Federation) -> None:
    with Client(fed.replicas[0].address, fed.tenant_token) as c:
        wait_until(lambda: reservations_open(c), timeout=20)


def test_book_list_draw_and_cancel_from_the_command_line(fed: Federation) -> None:
    _open(fed)
    created = gpufed(
        fed, "-o", "json", "reservation", "create", "--count", "2", "--model", "H100", "--country", "DE",
        "--at", "+2h", "--for", "3h",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    r = json.loads(created.stdout)
    assert r["state"] == "RESERVATION_STATE_SCHEDULED" and len(r["gpus"]) == 2
    assert {g["location"]["country_code"] for g in r["gpus"]} == {"DE"}
    table = gpufed(fed, "reservation", "list")
    assert table.returncode == 0 and r["name"] in table.stdout and "SCHEDULED" in table.stdout
    drawn = gpufed(fed, "reservation", "list", "--calendar", "--state", "scheduled")
    assert drawn.returncode == 0, drawn.stderr
    rows = [line for line in drawn.stdout.splitlines() if r["gpus"][0]["node"] in line]
    assert len(rows) == 2 and all("A" in row for row in rows)  # one row per GPU, marked A
    assert f"A  {r['name']}  SCHEDULED" in drawn.stdout
    got = gpufed(fed, "reservation", "get", r["name"])
    assert r["gpus"][0]["uuid"] in got.stdout
    cancelled = gpufed(fed, "-o", "json", "reservation", "cancel", r["name"])
    assert json.loads(cancelled.stdout)["end_reason"] == "RESERVATION_END_REASON_CANCELLED"
    bad = gpufed(fed, "reservation", "create", "--count", "1", "--at", "tomorrow", "--for", "1h")
    assert bad.returncode == 2 and "not a time" in bad.stderr


def test_capacity_and_offers_for_a_window_leave_out_what_is_booked_in_it(fed: Federation) -> None:
    _open(fed)
    start = time.time() + 3 * 86_400
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    window = ("--at", at, "--for", "24h")
    before = json.loads(gpufed(fed, "-o", "json", "capacity", "--model", "H100", *window).stdout)
    with Client(fed.replicas[1].address, fed.tenant_token) as c:  # booked through the other replica
        booked = c.create_reservation(3, start + 3600, 3600, gpu_model="H100")
    try:

        def free(*flags: str) -> int:
            out = gpufed(fed, "-o", "json", "capacity", "--model", "H100", *flags)
            assert out.returncode == 0, out.stderr
            return int(json.loads(out.stdout).get("free_gpus", 0))

        wait_until(lambda: free(*window) == before.get("free_gpus", 0) - 3, timeout=5)
        assert free("--at", at, "--for", "1h") == before.get("free_gpus", 0)  # ends as the booking starts
        node = booked.gpus[0].node
        offers = json.loads(
            gpufed(
                fed, "-o", "json", "offers", "search", "--model", "H100", "--at", at, "--for", "24h"
            ).stdout
        )
        on_node = [o for o in offers if o["node"] == node]
        assert all(set(o["gpu_uuids"]).isdisjoint({g.uuid for g in booked.gpus}) for o in on_node)
        now = json.loads(gpufed(fed, "-o", "json", "offers", "search", "--model", "H100").stdout)
        assert any(set(o["gpu_uuids"]) & {g.uuid for g in booked.gpus} for o in now)  # free today
        no_for = gpufed(fed, "capacity", "--at", at)
        assert no_for.returncode == 2 and "--at needs --for" in no_for.stderr
    finally:
        with Client(fed.replicas[0].address, fed.tenant_token) as c:
            c.cancel_reservation(booked.name)
