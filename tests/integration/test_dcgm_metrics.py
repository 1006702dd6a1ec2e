"""The daemon's /metrics speaks dcgm-exporter: scraped from a real daemon process over HTTP and
compared with dcgm-exporter's default counter list and NVIDIA's Grafana dashboard (copies in
tests/data/dcgm_exporter/, their source and version named in each file)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    wait_until,
)

pytestmark = pytest.mark.integration
DATA = Path(__file__).parent.parent / "data" / "dcgm_exporter"
# dcgm-exporter's labels on every series, then gpufed's own.
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "hostname", "DCGM_FI_DRIVER_VERSION"}
GPUFED_LABELS = {"provider", "node"}
# NVML answers NotSupported for these on a MIG-enabled GPU: absent there, never zero.
NOT_ON_MIG_PARENTS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_ENC_UTIL",
    "DCGM_FI_DEV_DEC_UTIL",
}


@dataclass(frozen=True)
class Series:
    name: str
    labels: dict[str, str]
    value: float


_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[dict[str, str], list[Series]]:
    """Prometheus text format: the TYPE of each metric and every sample line."""
    types: dict[str, str] = {}
    series = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            m = _LINE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            series.append(Series(m[1], dict(_LABEL.findall(m[2])), float(m[3])))
    return types, series


def default_counters() -> dict[str, str]:
    out = {}
    for line in (DATA / "default-counters.csv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind, _ = (part.strip() for part in line.split(",", 2))
            out[name] = kind
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(r.read().decode())


@pytest.fixture(scope="module")
def daemon(etcd: EtcdCluster) -> Iterator[tuple[Client, int]]:
    """A daemon process over `h100-mig` (six whole H100s, two split in seven 1g.10gb each)."""
    replica = ReplicaThread(replica_config(etcd.endpoints, unique_prefix())).start()
    admin = Client(replica.address, ADMIN_TOKEN)
    provider = admin.create_token("provider", "neo").secret
    tenant = Client(replica.address, admin.create_token("tenant", "dev").secret)
    port = free_port()
    extra = ("--insecure", "--metrics-listen", f"127.0.0.1:{port}", "--report-interval", "0.5")
    try:
        with daemon_process([replica.address], provider, "neo", "n1", *extra, profile="h100-mig"):
            # The profiling fields come with the second report (GPM averages two samples).
            wait_until(lambda: "DCGM_FI_PROF_GR_ENGINE_ACTIVE" in scrape(port), timeout=20)
            wait_until(lambda: sum(o.free_gpus for o in tenant.search_offers()) == 8, timeout=20)
            yield tenant, port
    finally:
        tenant.close()
        admin.close()
        replica.stop()


def test_every_default_counter_nvml_gives_has_dcgm_exporters_name_type_and_labels(
    daemon: tuple[Client, int],
) -> None:
    _, port = daemon
    types, series = parse(scrape(port))
    gpus = {s.labels["UUID"] for s in series if s.name == "DCGM_FI_DEV_GPU_TEMP"}
    assert len(gpus) == 8
    mig_parents = {s.labels["UUID"] for s in series if "GPU_I_ID" in s.labels}
    assert len(mig_parents) == 2
    counters = default_counters()
    assert len(counters) == 26
    for name, kind in counters.items():
        if kind == "label":  # DCGM_FI_DRIVER_VERSION: a label on every series
            assert all(s.labels.get(name) == "550.90.07" for s in series), name
            continue
        assert types.get(name) == kind, f"{name}: TYPE {types.get(name)}, dcgm-exporter says {kind}"
        whole = [s for s in series if s.name == name and "GPU_I_ID" not in s.labels]
        expected = gpus - mig_parents if name in NOT_ON_MIG_PARENTS else gpus
        assert {s.labels["UUID"] for s in whole} == expected, name
        for s in whole:
            assert set(s.labels) >= DCGM_LABELS | GPUFED_LABELS, (name, s.labels)
            assert s.labels["device"] == f"nvidia{s.labels['gpu']}"
            assert s.labels["node"] == "providers/neo/nodes/n1" and s.labels["provider"] == "neo"
    # The profiling ratios are ratios; PCIe rates are bytes per second of a busy H100.
    for s in series:
        if s.name in (
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
            "DCGM_FI_PROF_DRAM_ACTIVE",
        ):
            assert 0 <= s.value <= 1, s
        if s.name.startswith("DCGM_FI_PROF_PCIE_"):
            assert 1e8 < s.value < 64e9, s


def test_mig_instances_get_their_own_framebuffer_series_with_dcgm_exporters_mig_labels(
    daemon: tuple[Client, int],
) -> None:
    _, port = daemon
    _, series = parse(scrape(port))
    mig = [s for s in series if s.name == "DCGM_FI_DEV_FB_USED" and "GPU_I_ID" in s.labels]
    assert len(mig) == 14
    assert {s.labels["GPU_I_PROFILE"] for s in mig} == {"1g.10gb"}
    assert all(0 < s.value < 10 * 1024 for s in mig)  # MiB of a 10 GB slice
    # Profiling per GPU instance (GPM's MIG samples); PCIe is the board's, so not per instance.
    for name in (
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE",
    ):
        per_instance = [s for s in series if s.name == name and "GPU_I_ID" in s.labels]
        assert len(per_instance) == 14, name
    assert not [s for s in series if s.name.startswith("DCGM_FI_PROF_PCIE_") and "GPU_I_ID" in s.labels]


def test_nvidias_grafana_dashboard_finds_every_metric_and_label_it_queries(
    daemon: tuple[Client, int],
) -> None:
    _, port = daemon
    _, series = parse(scrape(port))
    # Written for `Hostname`: this daemon labels `hostname`, as current dcgm-exporter and
    # dashboards updated for its rename (the legacy label: test_prometheus_dashboard).
    queries = [
        line.split(": ", 1)[1].replace("Hostname", "hostname")
        for line in (DATA / "dashboard-queries.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for q in queries:
        for name in set(re.findall(r"\b(DCGM_FI_[A-Z0-9_]+)\b", q)):
            found = [s for s in series if s.name == name]
            assert found, f"the dashboard queries {name}: {q}"
            # Its matchers and template variables (hostname, gpu) must select something.
            for label in re.findall(r"(\w+)=~", q):
                assert all(s.labels.get(label) for s in found), (label, q)
            # `by (...)` labels dcgm-exporter defines must be there (MIG ones on MIG series).
            for group in re.findall(r"by \(([^)]*)\)", q):
                for label in (x.strip() for x in group.split(",")):
                    if label in DCGM_LABELS:
                        assert all(label in s.labels for s in found), (label, q)
                    if label in ("GPU_I_ID", "GPU_I_PROFILE"):
                        assert any(label in s.labels for s in found), (label, q)


def test_a_leased_gpu_carries_its_lease_as_a_label_and_a_free_one_none(daemon: tuple[Client, int]) -> None:
    tenant, port = daemon
    lease = tenant.create_lease(1, gpu_model="H100")
    try:
        uuid = lease.gpus[0].uuid

        def labelled() -> bool:
            _, series = parse(scrape(port))
            temps = [s for s in series if s.name == "DCGM_FI_DEV_GPU_TEMP"]
            held = [s for s in temps if s.labels.get("lease")]
            return [s.labels["UUID"] for s in held] == [uuid] and held[0].labels["lease"] == lease.name

        wait_until(labelled, timeout=10)
    finally:
        tenant.release_lease(lease.name)


def test_anything_but_metrics_is_not_found(daemon: tuple[Client, int]) -> None:
    import urllib.error

    _, port = daemon
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    assert e.value.code == 404
