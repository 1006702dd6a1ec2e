"""The collector over the fake NVML: every field, NotSupported as absent, lost GPUs, MIG, XIDs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pynvml
import pytest

from gpufed.clock import FakeClock
from gpufed.v1 import common_pb2
from node_daemon import health
from node_daemon.collector import Collector, GpuEvent, XidWatcher, mig_profile_name
from node_daemon.fake_nvml import FakeNvml, parse_event
from tests.nvml_c_shim import real_pynvml_over

HEALTHY, DEGRADED, UNHEALTHY = (
    common_pb2.GPU_HEALTH_HEALTHY,
    common_pb2.GPU_HEALTH_DEGRADED,
    common_pb2.GPU_HEALTH_UNHEALTHY,
)
EVERY_FIELD = [
    "memory_total_bytes",
    "memory_used_bytes",
    "memory_free_bytes",
    "utilization_gpu_percent",
    "utilization_memory_percent",
    "temperature_celsius",
    "power_watts",
    "sm_clock_mhz",
    "pcie_replay_count",
    "ecc_volatile_corrected",
    "ecc_volatile_uncorrected",
    "ecc_aggregate_corrected",
    "ecc_aggregate_uncorrected",
    "retired_pages_single_bit",
    "retired_pages_double_bit",
    "retired_pages_pending",
    "remapped_rows_correctable",
    "remapped_rows_uncorrectable",
    "remapped_rows_pending",
    "remapped_rows_failure",
    "clock_event_reasons",
    "mig_enabled",
    "nvlink_active_links",
    "nvlink_errors",
]


def recorder(got: list[GpuEvent], arrived: threading.Event) -> Callable[[GpuEvent], None]:
    def record(ev: GpuEvent) -> None:
        got.append(ev)
        arrived.set()

    return record


def collector(profile: str, **kw: object) -> tuple[Collector, FakeNvml]:
    fake = FakeNvml(profile, **kw)  # type: ignore[arg-type]
    clock = kw.get("clock")
    c = Collector(fake, clock) if isinstance(clock, FakeClock) else Collector(fake)
    c.start()
    return c, fake


def test_a100_reports_every_field_and_host_versions() -> None:
    c, _ = collector("a100-80g-8")
    assert c.driver_version and c.cuda_driver_version == "12.4"
    report = c.sample()
    assert len(report.gpus) == 8
    s = report.gpus[0]
    missing = [f for f in EVERY_FIELD if not s.HasField(f)]  # type: ignore[arg-type]
    assert missing == []
    assert s.memory_used_bytes + s.memory_free_bytes + s.memory_reserved_bytes == s.memory_total_bytes
    assert 0 < s.power_watts <= 400
    assert s.nvlink_active_links == 12
    assert s.health == HEALTHY


def test_one_report_carries_every_gpu_with_increasing_sequence() -> None:
    c, _ = collector("h200-8")
    a, b = c.sample(), c.sample()
    assert [g.index for g in a.gpus] == list(range(8))
    assert b.sequence == a.sequence + 1
    assert len({g.uuid for g in a.gpus}) == 8


def test_not_supported_fields_are_absent_not_zero() -> None:
    c, _ = collector("h100-sxm-8")  # Hopper: no page retirement
    s = c.sample().gpus[0]
    assert not s.HasField("retired_pages_single_bit")
    assert not s.HasField("retired_pages_pending")
    c, _ = collector("l40s-4")  # PCIe card: no NVLink
    s = c.sample().gpus[0]
    assert not s.HasField("nvlink_active_links")


def test_mig_gpu_has_no_utilization_but_everything_else() -> None:
    c, _ = collector("a100-mig")
    inv = c.inventory()
    assert inv[0].mig_enabled
    s = c.sample().gpus[0]
    assert not s.HasField("utilization_gpu_percent")
    assert s.mig_enabled
    assert s.HasField("temperature_celsius")


def test_lost_gpu_is_unhealthy_and_the_others_keep_reporting() -> None:
    c, fake = collector("h100-sxm-8")
    fake.apply(parse_event("0:2:lost"))
    report = c.sample()
    lost = report.gpus[2]
    assert lost.lost and lost.health == UNHEALTHY
    assert "GPU_LOST" in {r.code for r in lost.health_reasons}
    assert all(g.health == HEALTHY and g.HasField("power_watts") for i, g in enumerate(report.gpus) if i != 2)


def test_unknown_error_counts_as_lost() -> None:
    c, fake = collector("l40s-4")
    original = fake.nvmlDeviceGetMemoryInfo

    def broken(h: object, version: int | None = None) -> object:
        if fake.nvmlDeviceGetIndex(h) == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
        return original(h, version)

    fake.nvmlDeviceGetMemoryInfo = broken  # type: ignore[method-assign,assignment]
    report = c.sample()
    assert report.gpus[1].lost and report.gpus[1].health == UNHEALTHY
    assert not report.gpus[0].lost


@pytest.mark.parametrize(
    ("event", "health", "code"),
    [
        ("0:1:thermal", DEGRADED, "THERMAL_SLOWDOWN"),
        ("0:1:dbe=1", UNHEALTHY, "ECC_DBE_VOLATILE"),
        ("0:1:remap_failure", UNHEALTHY, "ROW_REMAP_FAILURE"),
        ("0:1:remap_pending", DEGRADED, "ROW_REMAP_PENDING"),
        ("0:1:page_pending", DEGRADED, "PAGE_RETIREMENT_PENDING"),
    ],
)
def test_injected_faults_change_health_in_the_next_report(event: str, health: int, code: str) -> None:
    c, fake = collector("a100-80g-8")
    fake.apply(parse_event(event))
    s = c.sample().gpus[1]
    assert s.health == health
    assert code in {r.code for r in s.health_reasons}


def test_xid_watcher_delivers_the_event_at_once_and_health_stays_sticky() -> None:
    c, fake = collector("h100-sxm-8")
    got: list[GpuEvent] = []
    arrived = threading.Event()
    w = XidWatcher(c, recorder(got, arrived), wait_ms=50)
    w.start()
    try:
        fake.apply(parse_event("0:4:xid=63"))  # a row remap recorded: degraded, reset the GPU
        assert arrived.wait(5)
    finally:
        w.stop()
    assert got[0].xid == 63 and got[0].gpu_uuid == c.gpus[4].uuid
    assert (got[0].verdict.health, got[0].verdict.action) == (DEGRADED, health.RESET_GPU)
    # Sticky: later clean readings keep the XID until it is cleared.
    assert c.sample().gpus[4].health == DEGRADED
    assert 63 in c.sample().gpus[4].xids
    c.clear_faults([c.gpus[4].uuid])  # an operator's SetGpuHealthy reached the daemon
    assert c.sample().gpus[4].health == HEALTHY and not c.sample().gpus[4].xids


def test_an_application_xid_is_told_in_its_event_and_leaves_the_gpu_healthy() -> None:
    c, fake = collector("h100-sxm-8")
    got: list[GpuEvent] = []
    arrived = threading.Event()
    w = XidWatcher(c, recorder(got, arrived), wait_ms=50)
    w.start()
    try:
        fake.apply(parse_event("0:2:xid=13"))  # graphics engine exception: the app's
        assert arrived.wait(5)
    finally:
        w.stop()
    assert (got[0].verdict.health, got[0].verdict.action) == (HEALTHY, health.RESTART_APP)
    assert "XID_13" in got[0].verdict.codes
    s = c.sample().gpus[2]
    assert s.health == HEALTHY and not s.xids and not s.health_reasons
    assert c.gpus[2].last_xid == 13  # dcgm-exporter's DCGM_FI_DEV_XID_ERRORS shows it


def test_mig_instances_are_listed_with_their_profiles_under_their_parent() -> None:
    c, _ = collector("a100-mig")
    inv = c.inventory()
    parent, *instances = inv
    assert parent.mig_enabled and not parent.parent_uuid
    assert [g.mig_profile for g in instances] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    assert all(g.uuid.startswith("MIG-") and g.parent_uuid == parent.uuid for g in instances)
    assert len({g.gpu_instance_id for g in instances}) == 4
    s = c.sample().gpus[0]
    assert not s.HasField("utilization_gpu_percent")  # NotSupported on a MIG-enabled GPU: absent
    assert [m.uuid for m in s.mig_devices] == [g.uuid for g in instances]
    assert all(
        m.memory_total_bytes == g.memory_total_bytes for m, g in zip(s.mig_devices, instances, strict=True)
    )


@pytest.mark.parametrize(
    ("gpu_slices", "memory_mb", "gpu_memory_mib", "name"),
    [
        # nvidia-smi mig -lgip on an A100-SXM4-80GB and an H100 80GB HBM3.
        (1, 9728, 81920, "1g.10gb"),
        (2, 19968, 81920, "2g.20gb"),
        (3, 40192, 81920, "3g.40gb"),
        (7, 80896, 81920, "7g.80gb"),
        (1, 9856, 81559, "1g.10gb"),
        (1, 19968, 81559, "1g.20gb"),
        (7, 80640, 81559, "7g.80gb"),
        # A100-SXM4-40GB.
        (1, 4864, 40960, "1g.5gb"),
        (3, 20096, 40960, "3g.20gb"),
    ],
)
def test_mig_profile_names_follow_nvidias_naming(
    gpu_slices: int, memory_mb: int, gpu_memory_mib: int, name: str
) -> None:
    assert mig_profile_name(gpu_slices, gpu_slices, memory_mb, gpu_memory_mib * 1024**2) == name


def test_collector_runs_unchanged_through_the_real_pynvml_module() -> None:
    fake = FakeNvml("a100-80g-8")
    with real_pynvml_over(fake) as lib:
        c = Collector(pynvml)
        c.start()
        fake.apply(parse_event("0:6:dbe=1"))
        report = c.sample()
        c.shutdown()
    assert lib.calls["nvmlInitWithFlags"] == 1
    assert [f for f in EVERY_FIELD if not report.gpus[0].HasField(f)] == []  # type: ignore[arg-type]
    assert report.gpus[6].health == UNHEALTHY
    # Through pynvml's wrappers the answers equal the fake's own.
    direct = Collector(FakeNvml("a100-80g-8"))
    direct.start()
    assert [g.uuid for g in direct.gpus] == [g.uuid for g in c.gpus]
    assert c.driver_version == direct.driver_version


def test_real_pynvml_maps_not_supported_and_lost_to_its_own_errors() -> None:
    fake = FakeNvml("a100-mig")
    with real_pynvml_over(fake):
        c = Collector(pynvml)
        c.start()
        s = c.sample().gpus[0]
        assert not s.HasField("utilization_gpu_percent")
        fake.apply(parse_event("0:0:lost"))
        assert c.sample().gpus[0].lost


def test_real_pynvml_delivers_xid_events_to_the_watcher() -> None:
    fake = FakeNvml("h100-sxm-8")
    with real_pynvml_over(fake):
        c = Collector(pynvml)
        c.start()
        arrived = threading.Event()
        got: list[GpuEvent] = []
        w = XidWatcher(c, recorder(got, arrived), wait_ms=50)
        w.start()
        try:
            fake.apply(parse_event("0:3:xid=79"))
            assert arrived.wait(5)
        finally:
            w.stop()
    assert got[0].gpu_uuid == c.gpus[3].uuid
    assert got[0].verdict.health == UNHEALTHY


def test_nvlink_data_volume_is_read_with_the_error_counters_and_repeated_in_between() -> None:
    from node_daemon.collector import NVLINK_EVERY

    c, fake = collector("h100-sxm-8")
    asked: list[int] = []
    real = fake.nvmlDeviceGetFieldValues

    def counting(h: Any, ids: list[Any]) -> Any:
        asked.append(len(ids))
        return real(h, ids)

    fake.nvmlDeviceGetFieldValues = counting  # type: ignore[method-assign,assignment]
    reports = [c.sample() for _ in range(NVLINK_EVERY + 1)]
    per_gpu = asked[:: len(c.gpus)]
    # HBM temperature every report; the 18 links' TX and RX with the error counters only.
    assert per_gpu.count(1 + 2 * 18) == 2 and per_gpu.count(1) == NVLINK_EVERY - 1
    due = [i for i, n in enumerate(per_gpu) if n > 1]
    kib = [r.gpus[0].nvlink_data_kib for r in reports]
    assert kib[due[0] : due[1]] == [kib[due[0]]] * (due[1] - due[0]) and kib[due[1]] > kib[due[0]] > 0


PROFILING = [
    "gr_engine_active",
    "tensor_active",
    "dram_active",
    "pcie_tx_bytes_per_second",
    "pcie_rx_bytes_per_second",
]


def test_profiling_comes_from_gpm_from_the_second_report_on_hopper() -> None:
    clock = FakeClock()
    c, _ = collector("h100-sxm-8", clock=clock)
    first = c.sample().gpus[0]
    # One sample: nothing to average yet.
    assert [f for f in PROFILING if first.HasField(f)] == []  # type: ignore[arg-type]
    clock.advance(2.0)
    s = c.sample().gpus[0]
    assert [f for f in PROFILING if not s.HasField(f)] == []  # type: ignore[arg-type]
    assert 0 < s.tensor_active < s.gr_engine_active <= 1 and 0 < s.dram_active <= 1
    assert s.pcie_rx_bytes_per_second > s.pcie_tx_bytes_per_second > 1e8
    assert s.vgpu_license_status == 0 and s.HasField("vgpu_license_status")


def test_profiling_is_absent_not_zero_where_the_gpu_has_no_gpm() -> None:
    for profile in ("a100-80g-8", "l40s-4"):
        c, _ = collector(profile)
        c.sample()
        time.sleep(0.11)
        s = c.sample().gpus[0]
        assert [f for f in PROFILING if s.HasField(f)] == [], profile  # type: ignore[arg-type]


def test_mig_instances_get_their_own_profiling_and_a_lost_gpu_stops_it() -> None:
    clock = FakeClock()
    c, fake = collector("h100-mig", clock=clock)
    c.sample()
    clock.advance(1.0)
    s = c.sample().gpus[0]
    assert len(s.mig_devices) == 7
    assert all(0 < m.gr_engine_active <= 1 and m.HasField("dram_active") for m in s.mig_devices)
    fake.apply(parse_event("0:0:lost"))
    clock.advance(1.0)
    lost = c.sample().gpus[0]
    assert lost.lost and not lost.HasField("gr_engine_active")


def test_gpm_samples_are_freed_at_shutdown() -> None:
    c, fake = collector("h100-mig")
    assert len(fake._gpm_samples) == 2 * (8 + 14)
    c.shutdown()
    assert fake._gpm_samples == {}


def test_a_burst_of_pcie_replays_degrades_the_gpu_for_a_minute_then_it_is_healthy_again() -> None:
    clock = FakeClock()
    c, fake = collector("h100-sxm-8", clock=clock)
    c.sample()
    fake.apply(parse_event("0:2:pcie_replays=20"))
    clock.advance(2.0)
    s = c.sample().gpus[2]
    assert s.health == DEGRADED and [r.code for r in s.health_reasons] == ["PCIE_REPLAY_RATE"]
    assert " GB/s" in s.health_reasons[0].message  # the link's traffic, from GPM
    for _ in range(31):  # a minute of reports without new replays
        clock.advance(2.0)
        s = c.sample().gpus[2]
    assert s.health == HEALTHY


def test_gpm_runs_unchanged_through_the_real_pynvml_module() -> None:
    clock = FakeClock()
    fake = FakeNvml("h100-sxm-8", clock=clock)
    with real_pynvml_over(fake) as lib:
        c = Collector(pynvml, clock)
        c.start()
        c.sample()
        clock.advance(2.0)
        s = c.sample().gpus[0]
        c.shutdown()
    assert [f for f in PROFILING if not s.HasField(f)] == []  # type: ignore[arg-type]
    assert lib.calls["nvmlGpmMetricsGet"] == 8 and lib.calls["nvmlGpmSampleFree"] == 16
    assert s.vgpu_license_status == 0
