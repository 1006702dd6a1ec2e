"""The `gpufed` CLI end to end against a real replica: tables for people, JSON for scripts,
exit codes scripts can rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpufed.transport import INSECURE_WARNING
from tests.integration.federation import Federation

pytestmark = pytest.mark.integration


def gpufed(fed: Federation, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GPUFED_ENDPOINT": fed.replicas[0].address,
        "GPUFED_TOKEN": token if token is not None else fed.tenant_token,
        "GPUFED_CONFIG": "/nonexistent",
    }
    return subprocess.run(
        [sys.executable, "-m", "gpufed", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_search_as_a_table_and_as_json(fed: Federation) -> None:
    table = gpufed(fed, "offers", "search", "--model", "H100", "--country", "DE,FI", "--count", "4")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "MODEL", "MEM", "FREE"]
    assert any("providers/neo/nodes/fra-1" in line for line in lines[1:])
    assert not any("nyc-1" in line for line in lines)
    js = gpufed(fed, "-o", "json", "offers", "search", "--max-price", "1.0")
    assert js.returncode == 0
    assert [o["node_id"] for o in json.loads(js.stdout)] == ["ams-1"]


def test_lease_create_list_get_release(fed: Federation) -> None:
    created = gpufed(fed, "-o", "json", "lease", "create", "--count", "2", "--model", "A100", "--ttl", "30")
    assert created.returncode == 0, created.stderr
    lease = json.loads(created.stdout)
    assert lease["state"] == "LEASE_STATE_ACTIVE" and len(lease["gpus"]) == 2
    listed = gpufed(fed, "lease", "list", "--state", "active")
    assert lease["name"] in listed.stdout and "ACTIVE" in listed.stdout
    got = gpufed(fed, "-o", "yaml", "lease", "get", lease["name"])
    assert f"name: {lease['name']}" in got.stdout
    released = gpufed(fed, "-o", "json", "lease", "release", lease["name"])
    assert json.loads(released.stdout)["end_reason"] == "LEASE_END_REASON_RELEASED"
    ended = gpufed(fed, "lease", "list", "--state", "ended")
    assert lease["name"] in ended.stdout and "RELEASED" in ended.stdout


def test_errors_are_one_readable_line_with_reason_and_a_stable_exit_code(fed: Federation) -> None:
    no_capacity = gpufed(fed, "lease", "create", "--count", "3", "--country", "JP")
    assert no_capacity.returncode == 4
    # Plaintext to a replica on loopback: no warning (the token never leaves the host), the error.
    assert no_capacity.stderr.strip().splitlines() == [
        "error: FAILED_PRECONDITION NO_MATCHING_CAPACITY: no 3 free GPUs match the request",
    ]
    assert INSECURE_WARNING not in no_capacity.stderr
    bad = gpufed(fed, "offers", "search", "--country", "XX")
    assert bad.returncode == 7 and "INVALID_COUNTRY_CODE" in bad.stderr
    missing = gpufed(fed, "lease", "get", "leases/0123456789abcdef")
    assert missing.returncode == 3 and "LEASE_NOT_FOUND" in missing.stderr
    denied = gpufed(fed, "offers", "search", token="wrong")
    assert denied.returncode == 5 and "UNAUTHENTICATED" in denied.stderr
    usage = gpufed(fed, "lease", "create")
    assert usage.returncode == 2


def test_admin_tokens_capacity_and_nodes(fed: Federation) -> None:
    from tests.harness import ADMIN_TOKEN

    created = gpufed(
        fed, "admin", "tokens", "create", "--kind", "tenant", "--name", "cli-user", token=ADMIN_TOKEN
    )
    assert created.returncode == 0 and created.stdout.startswith("gpf_")
    secret = created.stdout.strip()
    assert gpufed(fed, "offers", "search", token=secret).returncode == 0
    tokens = gpufed(fed, "-o", "json", "admin", "tokens", "list", token=ADMIN_TOKEN)
    assert "cli-user" in {t["principal"] for t in json.loads(tokens.stdout)}
    capacity = gpufed(fed, "capacity", "--country", "NL")
    assert "NVIDIA L40S" in capacity.stdout and capacity.stdout.splitlines()[-1].split()[:3] == [
        "TOTAL",
        "4",
        "4",
    ]
    nodes = gpufed(fed, "-o", "json", "nodes", "list", "--provider", "acme")
    assert [n["node_id"] for n in json.loads(nodes.stdout)] == ["ams-1", "nyc-1"]
    node = gpufed(fed, "nodes", "get", "providers/blue/nodes/hel-1")
    assert "DEGRADED" in node.stdout


def test_admin_quota_set_and_get_and_a_tenant_reads_its_own(fed: Federation) -> None:
    from tests.harness import ADMIN_TOKEN

    set_ = gpufed(
        fed,
        "admin",
        "quota",
        "set",
        "--tenant",
        "dev",
        "--max-gpus",
        "40",
        "--max-leases",
        "9",
        token=ADMIN_TOKEN,
    )
    assert set_.returncode == 0, set_.stderr
    assert any(line.split() == ["max_gpus", "40"] for line in set_.stdout.splitlines())
    got = gpufed(fed, "-o", "json", "admin", "quota", "get", "--tenant", "dev")  # the tenant itself
    assert got.returncode == 0, got.stderr
    quota = json.loads(got.stdout)["quota"]["tenant"]
    assert (quota["max_gpus"], quota["max_leases"]) == (40, 9)
    wrong = gpufed(fed, "admin", "quota", "set", "--tenant", "dev", "--max-nodes", "3", token=ADMIN_TOKEN)
    assert wrong.returncode != 0 and "not a limit" in wrong.stderr
    back = gpufed(fed, "admin", "quota", "set", "--tenant", "dev", token=ADMIN_TOKEN)  # defaults again
    assert back.returncode == 0, back.stderr
    lower = gpufed(fed, "offers", "search", "--country", "de")  # the CLI upper-cases codes
    assert lower.returncode == 0, lower.stderr


def test_admin_usage_export_streams_a_window_as_csv_and_json_lines(fed: Federation, tmp_path: object) -> None:
    import csv
    import io
    from datetime import UTC, datetime, timedelta

    created = gpufed(fed, "-o", "json", "lease", "create", "--count", "1", "--ttl", "30")
    lease = json.loads(created.stdout)["name"]
    assert gpufed(fed, "lease", "release", lease).returncode == 0
    today = datetime.now(UTC).date()
    window = ("--since", str(today), "--until", str(today + timedelta(days=1)))
    rows = gpufed(fed, "-o", "csv", "admin", "usage", "export", *window)
    assert rows.returncode == 0, rows.stderr
    table = list(csv.DictReader(io.StringIO(rows.stdout)))
    mine = [r for r in table if r["lease"] == lease]
    assert len(mine) == 1 and mine[0]["tenant"] == "dev" and mine[0]["end_reason"] == "RELEASED"
    lines = gpufed(fed, "-o", "jsonl", "admin", "usage", "export", *window)
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["lease"] for r in records if r["lease"] == lease] == [lease]
    # A window that ends before today holds none of today's records.
    before = gpufed(fed, "-o", "jsonl", "admin", "usage", "export", "--until", str(today))
    assert lease not in before.stdout


def test_nodes_telemetry_shows_each_gpus_profiling_from_gpm_and_dashes_where_none(fed: Federation) -> None:
    from tests.harness import ADMIN_TOKEN, wait_until

    def table(node: str) -> list[list[str]]:
        out = gpufed(fed, "nodes", "telemetry", f"providers/{node}", token=ADMIN_TOKEN)
        assert out.returncode == 0, out.stderr
        return [line.split() for line in out.stdout.splitlines()]

    # fra-1 is eight H100s (GPM); its second report carries the profiling shares. Split on
    # spaces, a row is: index, uuid, health, util, engine, tensor, dram, pcie, temp, power, trend.
    wait_until(lambda: table("neo/nodes/fra-1")[1][4] != "-", timeout=10)
    rows = table("neo/nodes/fra-1")
    assert rows[0][:6] == ["GPU", "HEALTH", "UTIL%", "ENGINE%", "TENSOR%", "DRAM%"]
    assert len(rows) == 9 and all(0 <= int(r[4]) <= 100 and r[8] != "-" for r in rows[1:])
    js = gpufed(fed, "-o", "json", "nodes", "telemetry", "providers/neo/nodes/fra-1", token=ADMIN_TOKEN)
    gpu = json.loads(js.stdout)["latest"]["gpus"][0]
    assert 0 <= gpu["gr_engine_active"] <= 1 and gpu["pcie_rx_bytes_per_second"] > 0
    # ams-1 is four L40S (Ada: no GPM): the columns are dashes, never zeros.
    rows = table("acme/nodes/ams-1")
    assert all(r[4:7] == ["-", "-", "-"] for r in rows[1:])
