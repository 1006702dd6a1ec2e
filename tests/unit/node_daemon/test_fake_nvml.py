"""The fake NVML behaves like pynvml: its types, its errors, its failure modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pynvml
import pytest

from gpufed.clock import FakeClock
from node_daemon.fake_nvml import PROFILES, FakeNvml, load_scenario, parse_event


def started(profile: str, **kw: object) -> FakeNvml:
    f = FakeNvml(profile, **kw)  # type: ignore[arg-type]
    f.nvmlInit()
    return f


def test_calls_before_init_raise_uninitialized() -> None:
    f = FakeNvml("l40s-4")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        f.nvmlDeviceGetCount()


@pytest.mark.parametrize(
    ("profile", "count", "model"),
    [
        ("h100-sxm-8", 8, "NVIDIA H100 80GB HBM3"),
        ("a100-80g-8", 8, "NVIDIA A100-SXM4-80GB"),
        ("l40s-4", 4, "NVIDIA L40S"),
        ("h200-8", 8, "NVIDIA H200"),
        ("a100-mig", 1, "NVIDIA A100-SXM4-80GB"),
    ],
)
def test_profiles_have_their_machines_gpus(profile: str, count: int, model: str) -> None:
    f = started(profile)
    assert f.nvmlDeviceGetCount() == count
    h = f.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(h, pynvml.c_nvmlDevice_t)
    assert f.nvmlDeviceGetName(h) == model
    assert isinstance(f.nvmlDeviceGetMemoryInfo(h), pynvml.c_nvmlMemory_t)
    assert set(PROFILES) >= {profile}


def test_same_seed_gives_same_uuids_and_values() -> None:
    # One injected clock for both: values move with time, so two real clocks read a moment
    # apart may differ by a milliwatt (CI saw 472103 against 472102).
    clock = FakeClock()
    a = started("h100-sxm-8", seed=7, host="x", clock=clock)
    b = started("h100-sxm-8", seed=7, host="x", clock=clock)
    ha, hb = a.nvmlDeviceGetHandleByIndex(2), b.nvmlDeviceGetHandleByIndex(2)
    assert a.nvmlDeviceGetUUID(ha) == b.nvmlDeviceGetUUID(hb)
    assert a.nvmlDeviceGetPowerUsage(ha) == b.nvmlDeviceGetPowerUsage(hb)
    assert started("h100-sxm-8", seed=8, host="x").nvmlDeviceGetUUID(ha) != a.nvmlDeviceGetUUID(ha)


def test_mig_gpu_utilization_is_not_supported() -> None:
    f = started("a100-mig")
    h = f.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        f.nvmlDeviceGetUtilizationRates(h)
    assert f.nvmlDeviceGetMigMode(h)[0] == pynvml.NVML_DEVICE_MIG_ENABLE


def test_pcie_card_has_no_nvlink() -> None:
    f = started("l40s-4")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        f.nvmlDeviceGetNvLinkState(f.nvmlDeviceGetHandleByIndex(0), 0)


def test_scenario_events_apply_at_their_time_on_the_injected_clock() -> None:
    clock = FakeClock()
    f = started(
        "h100-sxm-8", clock=clock, scenario=[parse_event("30s:gpu3:thermal"), parse_event("60:1:lost")]
    )
    h3, h1 = f.nvmlDeviceGetHandleByIndex(3), f.nvmlDeviceGetHandleByIndex(1)
    assert f.nvmlDeviceGetCurrentClocksEventReasons(h3) & pynvml.nvmlClocksEventReasonHwThermalSlowdown == 0
    clock.advance(30)
    assert f.nvmlDeviceGetCurrentClocksEventReasons(h3) & pynvml.nvmlClocksEventReasonHwThermalSlowdown
    f.nvmlDeviceGetName(h1)
    clock.advance(30)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        f.nvmlDeviceGetName(h1)


def test_xid_arrives_through_event_set_wait_and_timeout_when_none() -> None:
    f = started("h100-sxm-8")
    es = f.nvmlEventSetCreate()
    h = f.nvmlDeviceGetHandleByIndex(5)
    f.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
    with pytest.raises(pynvml.NVMLError_Timeout):
        f.nvmlEventSetWait(es, 10)
    f.apply(parse_event("0:5:xid=48"))
    data = f.nvmlEventSetWait(es, 100)
    assert isinstance(data, pynvml.c_nvmlEventData_t)
    assert data.eventType == pynvml.nvmlEventTypeXidCriticalError
    assert data.eventData == 48


def test_double_bit_ecc_counts_show_in_volatile_and_aggregate() -> None:
    f = started("a100-80g-8")
    h = f.nvmlDeviceGetHandleByIndex(0)
    f.apply(parse_event("0:0:dbe=2"))
    ue = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    assert f.nvmlDeviceGetTotalEccErrors(h, ue, pynvml.NVML_VOLATILE_ECC) == 2
    assert f.nvmlDeviceGetTotalEccErrors(h, ue, pynvml.NVML_AGGREGATE_ECC) == 2


def test_scenario_file_and_malformed_events(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(
        '[[event]]\nat = 30\ngpu = 3\nkind = "xid"\nvalue = 79\n'
        '[[event]]\nat = 5\ngpu = 0\nkind = "utilization"\npattern = "busy"\n'
    )
    events = load_scenario(p)
    assert next((e.at, e.gpu, e.kind, e.value) for e in events) == (30.0, 3, "xid", 79)
    assert events[1].pattern == "busy"
    for bad in ("nonsense", "10:1:explode", "10:1:xid", "1:0:utilization=wild"):
        with pytest.raises(ValueError):
            parse_event(bad)


def gpm_request(*metrics: int) -> Any:
    req = pynvml.c_nvmlGpmMetricsGet_t()
    req.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    req.numMetrics = len(metrics)
    for i, m in enumerate(metrics):
        req.metrics[i].metricId = m
    return req


def test_gpm_is_supported_on_hopper_and_not_on_ampere_or_ada() -> None:
    for profile, supported in (("h100-sxm-8", 1), ("h200-8", 1), ("a100-80g-8", 0), ("l40s-4", 0)):
        f = started(profile)
        h = f.nvmlDeviceGetHandleByIndex(0)
        support = f.nvmlGpmQueryDeviceSupport(h)
        assert isinstance(support, pynvml.c_nvmlGpmSupport_t) and support.isSupportedDevice == supported
        if not supported:
            with pytest.raises(pynvml.NVMLError_NotSupported):
                f.nvmlGpmSampleGet(h, f.nvmlGpmSampleAlloc())


def test_gpm_metrics_average_two_samples_on_the_injected_clock() -> None:
    clock = FakeClock()
    f = started("h100-sxm-8", clock=clock)
    f.apply(parse_event("0:0:utilization=busy"))
    h = f.nvmlDeviceGetHandleByIndex(0)
    a, b = f.nvmlGpmSampleAlloc(), f.nvmlGpmSampleAlloc()
    assert isinstance(a, pynvml.c_nvmlGpmSample_t)
    f.nvmlGpmSampleGet(h, a)
    clock.advance(2.0)
    f.nvmlGpmSampleGet(h, b)
    ids = (
        pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL,
        pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
        pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
        pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC,
        pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC,
        pynvml.NVML_GPM_METRIC_FP64_UTIL,  # not modelled: NotSupported in its own return
    )
    req = gpm_request(*ids)
    req.sample1, req.sample2 = a, b
    f.nvmlGpmMetricsGet(req)
    m = [req.metrics[i] for i in range(len(ids))]
    assert [x.nvmlReturn for x in m[:5]] == [pynvml.NVML_SUCCESS] * 5
    assert m[5].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert 90 < m[0].value <= 100 and m[1].value < m[0].value and m[2].value < m[1].value
    assert m[4].value > m[3].value > 1000  # MiB/s
    assert m[0].metricInfo.unit == b"%" and m[3].metricInfo.unit == b"MiB/sec"


def test_gpm_refuses_freed_mismatched_or_unordered_samples_and_wrong_versions() -> None:
    clock = FakeClock()
    f = started("h100-sxm-8", clock=clock)
    h0, h1 = f.nvmlDeviceGetHandleByIndex(0), f.nvmlDeviceGetHandleByIndex(1)
    a, b = f.nvmlGpmSampleAlloc(), f.nvmlGpmSampleAlloc()
    f.nvmlGpmSampleGet(h0, a)
    clock.advance(1.0)
    f.nvmlGpmSampleGet(h1, b)
    req = gpm_request(pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL)
    req.sample1, req.sample2 = a, b
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # two GPUs
        f.nvmlGpmMetricsGet(req)
    f.nvmlGpmSampleGet(h0, b)
    req.sample1, req.sample2 = b, a
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # sample2 older
        f.nvmlGpmMetricsGet(req)
    req.version = 2
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        f.nvmlGpmMetricsGet(req)
    f.nvmlGpmSampleFree(a)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        f.nvmlGpmSampleGet(h0, a)


def test_gpm_mig_samples_are_per_gpu_instance_without_pcie() -> None:
    clock = FakeClock()
    f = started("h100-mig", clock=clock)
    h = f.nvmlDeviceGetHandleByIndex(0)
    a, b = f.nvmlGpmSampleAlloc(), f.nvmlGpmSampleAlloc()
    f.nvmlGpmMigSampleGet(h, 3, a)
    clock.advance(1.0)
    f.nvmlGpmMigSampleGet(h, 3, b)
    req = gpm_request(pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC)
    req.sample1, req.sample2 = a, b
    f.nvmlGpmMetricsGet(req)
    assert req.metrics[0].nvmlReturn == pynvml.NVML_SUCCESS and 0 < req.metrics[0].value <= 100
    assert req.metrics[1].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError_NotFound):
        f.nvmlGpmMigSampleGet(h, 99, a)
    whole = f.nvmlDeviceGetHandleByIndex(2)  # not split
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        f.nvmlGpmMigSampleGet(whole, 1, a)


def test_vgpu_licensing_is_answered_as_pynvml_declares_it() -> None:
    f = started("h100-sxm-8")
    found = f.nvmlDeviceGetGridLicensableFeatures(f.nvmlDeviceGetHandleByIndex(0))
    assert isinstance(found, pynvml.c_nvmlGridLicensableFeatures_v4_t)
    assert found.isGridLicenseSupported == 1 and found.licensableFeaturesCount == 1
    assert found.gridLicensableFeatures[0].featureState == 0  # bare metal: not licensed
