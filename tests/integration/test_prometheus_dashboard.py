"""NVIDIA's own dcgm-exporter Grafana dashboard works on gpufed daemons: a real Prometheus
(Debian's, set up by `make setup`) scrapes two daemons over the fake H100 profiles, and every
panel query of the dashboard runs through Prometheus' HTTP API as Grafana sends it, template
variables resolved to "All" the way Grafana does.

Daemon `h100` (h100-sxm-8) labels the host `hostname`, as current dcgm-exporter; daemon
`legacy` (h100-mig: six whole H100s, two split in seven 1g.10gb) keeps the old `Hostname`
(--metrics-hostname-label Hostname). Dashboards (copies in tests/data/dcgm_exporter/, sources
in its README): the JSON at d5e5f51 (8 panels, by Prometheus' `instance`), and the queries of
the version at 068798b (by `Hostname`), run against `legacy` as written and against `h100`
with the label renamed, as dashboards updated for the rename have it.

Set GPUFED_DASHBOARD_TABLE=path to write the panels and their series as a Markdown table
(docs/nvidia.md holds one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpufed.client import Client
from tests.harness import (
    ADMIN_TOKEN,
    EtcdCluster,
    ReplicaThread,
    daemon_process,
    free_port,
    replica_config,
    unique_prefix,
    wait_port,
    wait_until,
)

pytestmark = pytest.mark.integration
DATA = Path(__file__).parent.parent / "data" / "dcgm_exporter"
PROMETHEUS = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or ""
# Every series dcgm-exporter's default list names (the DRIVER_VERSION row is a label).
LABEL_FIELDS = {"DCGM_FI_DRIVER_VERSION"}


@dataclass(frozen=True)
class Panel:
    dashboard: str
    title: str
    expr: str


@dataclass
class Federation:
    prometheus: str  # http://127.0.0.1:PORT
    instances: dict[str, str]  # daemon name -> its scrape target (Prometheus' `instance`)


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query_range(base: str, expr: str) -> list[dict[str, Any]]:
    """A panel's query as a Grafana graph sends it: the last 20 s in steps of 2 s."""
    end = time.time()
    data = api(base, "/api/v1/query_range", query=expr, start=f"{end - 20:.3f}", end=f"{end:.3f}", step="2")
    result: list[dict[str, Any]] = data["result"]
    return result


def label_values(base: str, query: str) -> list[str]:
    """Grafana's `label_values(METRIC{...}, LABEL)` through Prometheus' series API."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert m, query
    selector, label = m[1], m[2]
    end = time.time()
    series = api(
        base, "/api/v1/series", **{"match[]": selector, "start": f"{end - 60:.3f}", "end": f"{end:.3f}"}
    )
    return sorted({s[label] for s in series if label in s})


def grafana_escape(value: str) -> str:
    """A value as Grafana's Prometheus data source escapes it into a regex matcher: regex
    metacharacters behind a backslash, itself doubled inside the PromQL string."""
    value = value.replace("\\", "\\" * 4)
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m[0], value)


def all_of(values: list[str]) -> str:
    """What Grafana puts for a multi-value variable on "All" without a custom value: a regex
    alternation of every value, each escaped."""
    return "(" + "|".join(grafana_escape(v) for v in values) + ")" if values else ".*"


def substitute(text: str, variables: dict[str, str]) -> str:
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"${name}", value)
    return text


def json_dashboard() -> tuple[list[Panel], list[tuple[str, str]]]:
    """The JSON dashboard's panels and its query variables (name, query) in order."""
    doc = json.loads((DATA / "dcgm-exporter-dashboard.json").read_text())
    panels = [
        Panel("dcgm-exporter-dashboard.json (d5e5f51)", p["title"], t["expr"])
        for p in doc["panels"]
        for t in p.get("targets", [])
    ]
    variables = [
        (v["name"], v["query"] if isinstance(v["query"], str) else v["query"]["query"])
        for v in doc["templating"]["list"]
        if v.get("type") == "query"
    ]
    return panels, variables


def text_dashboard(rename: bool) -> tuple[list[Panel], list[tuple[str, str]]]:
    """The 068798b dashboard's queries (`Hostname`), or with the label renamed `hostname`."""
    panels, variables = [], []
    name = "068798b, hostname" if rename else "068798b, Hostname"
    for line in (DATA / "dashboard-queries.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        head, query = line.split(": ", 1)
        if rename:
            query = query.replace("Hostname", "hostname")
        if head.startswith("variable "):
            var = head.removeprefix("variable ")
            variables.append(("hostname" if rename and var == "Hostname" else var, query))
        else:
            panels.append(Panel(name, head, query))
    return panels, variables


def resolve(base: str, variables: list[tuple[str, str]], fixed: dict[str, str]) -> dict[str, str]:
    """Each variable on "All", in order (later ones may use earlier ones), `fixed` pinned."""
    out = dict(fixed)
    for name, query in variables:
        if name in out:
            continue
        out[name] = all_of(label_values(base, substitute(query, out)))
    return out


@pytest.fixture(scope="module")
def federation(etcd: EtcdCluster) -> Iterator[Federation]:
    if not PROMETHEUS:
        pytest.skip(
            "no prometheus binary: `make setup` installs Debian's prometheus where it has root "
            "(scripts/ensure_prometheus.sh), or set PROMETHEUS_BIN"
        )
    replica = ReplicaThread(replica_config(etcd.endpoints, unique_prefix())).start()
    admin = Client(replica.address, ADMIN_TOKEN)
    provider = admin.create_token("provider", "neo").secret
    ports = {"h100": free_port(), "legacy": free_port()}
    common = ("--insecure", "--report-interval", "0.5")
    prom_port = free_port()
    with tempfile.TemporaryDirectory(prefix="gpufed-prom-") as tmp:
        targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        config = Path(tmp) / "prometheus.yml"
        # A JSON document is valid YAML: no YAML library needed.
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "gpufed-node-daemon",
                            "static_configs": [{"targets": list(targets.values())}],
                        }
                    ],
                }
            )
        )
        try:
            with (
                daemon_process(
                    [replica.address],
                    provider,
                    "neo",
                    "h100",
                    *common,
                    "--metrics-listen",
                    targets["h100"],
                    profile="h100-sxm-8",
                ),
                daemon_process(
                    [replica.address],
                    provider,
                    "neo",
                    "legacy",
                    *common,
                    "--metrics-listen",
                    targets["legacy"],
                    "--metrics-hostname-label",
                    "Hostname",
                    profile="h100-mig",
                ),
            ):
                prom = subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp}/data",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=warn",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    wait_port(prom_port, timeout=30)
                    base = f"http://127.0.0.1:{prom_port}"

                    def scraped() -> bool:
                        # Both targets up and their profiling series in: GPM needs two samples.
                        up = api(base, "/api/v1/query", query="up")["result"]
                        prof = api(
                            base, "/api/v1/query", query="count by (instance) (DCGM_FI_PROF_GR_ENGINE_ACTIVE)"
                        )
                        return (
                            len(up) == 2
                            and all(r["value"][1] == "1" for r in up)
                            and len(prof["result"]) == 2
                        )

                    wait_until(scraped, timeout=60, interval=0.5)
                    time.sleep(3)  # a few scrapes, so range queries have points
                    yield Federation(base, targets)
                finally:
                    prom.terminate()
                    prom.wait(timeout=10)
        finally:
            admin.close()
            replica.stop()


def run_panels(
    fed: Federation, panels: list[Panel], variables: list[tuple[str, str]], fixed: dict[str, str]
) -> list[tuple[Panel, list[dict[str, Any]]]]:
    values = resolve(fed.prometheus, variables, fixed)
    return [(p, query_range(fed.prometheus, substitute(p.expr, values))) for p in panels]


def test_every_panel_of_nvidias_json_dashboard_returns_series_for_the_h100_host(
    federation: Federation,
) -> None:
    panels, variables = json_dashboard()
    assert len(panels) == 8
    # Pinned to the h100 host, as a Grafana user picks it in the `instance` drop-down.
    results = run_panels(
        federation, panels, variables, {"instance": grafana_escape(federation.instances["h100"])}
    )
    empty = [p.title for p, series in results if not series]
    assert empty == [], f"panels without data: {empty}"
    _write_table(federation, results)
    per_gpu = {p.title: len(s) for p, s in results if not p.expr.startswith(("avg(", "sum("))}
    assert set(per_gpu.values()) == {8}, per_gpu  # one series per GPU of the host


def test_the_hostname_dashboard_works_on_a_legacy_labelled_daemon_and_renamed_on_a_current_one(
    federation: Federation,
) -> None:
    legacy_panels, legacy_vars = text_dashboard(rename=False)
    current_panels, current_vars = text_dashboard(rename=True)
    legacy = run_panels(federation, legacy_panels, legacy_vars, {})
    current = run_panels(federation, current_panels, current_vars, {})
    for results in (legacy, current):
        empty = [f"{p.dashboard}: {p.title}" for p, series in results if not series]
        assert empty == [], f"panels without data: {empty}"
    # `Hostname` selects only the legacy daemon and `hostname` only the current one.
    hosts = {
        s["metric"].get("Hostname") or s["metric"].get("hostname") for _, series in legacy for s in series
    } - {None}
    assert hosts == {"legacy"}
    hosts = {s["metric"].get("hostname") for _, series in current for s in series} - {None}
    assert hosts == {"h100"}
    # MIG: the utilization panels chart each 1g.10gb instance of the legacy host's two MIG GPUs.
    util = next(series for p, series in legacy if p.title == "GPU Utilization")
    assert sum(1 for s in util if s["metric"].get("GPU_I_PROFILE") == "1g.10gb") == 14
    _write_table(federation, legacy + current, append=True)


def test_an_h100_host_exports_26_of_26_dcgm_exporter_default_counters(federation: Federation) -> None:
    fields = []
    for line in (DATA / "default-counters.csv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            fields.append(line.split(",", 1)[0].strip())
    assert len(fields) == 26
    instance = federation.instances["h100"]
    found = []
    for name in fields:
        if name in LABEL_FIELDS:
            query = f'count({{instance="{instance}", __name__=~"DCGM_FI_.*", {name}!=""}})'
        else:
            query = f'count({name}{{instance="{instance}"}})'
        result = api(federation.prometheus, "/api/v1/query", query=query)["result"]
        if result and int(result[0]["value"][1]) >= 8:
            found.append(name)
    missing = [f for f in fields if f not in found]
    assert missing == [], f"{len(found)} of {len(fields)} default counters; missing {missing}"


def _write_table(
    fed: Federation, results: list[tuple[Panel, list[dict[str, Any]]]], append: bool = False
) -> None:
    path = os.environ.get("GPUFED_DASHBOARD_TABLE")
    if not path:
        return
    lines = [] if append else ["| Dashboard | Panel | Query | Series | Example |", "|---|---|---|---|---|"]
    for p, series in results:
        example = ""
        if series:
            metric = series[0]["metric"]
            keys = ("gpu", "hostname", "Hostname", "GPU_I_ID", "GPU_I_PROFILE")
            where = ", ".join(f"{k}={metric[k]}" for k in keys if k in metric)
            value = f"{float(series[0]['values'][-1][1]):.4g}"
            example = f"{{{where}}} {value}" if where else value
        expr = p.expr.replace("|", "\\|")
        lines.append(f"| {p.dashboard} | {p.title} | `{expr}` | {len(series)} | {example} |")
    with open(path, "a" if append else "w") as f:
        f.write("\n".join(lines) + "\n")
