"""Profiling metrics through NVML's GPM (GPU Performance Monitoring, Hopper and newer): what
dcgm-exporter's DCGM_FI_PROF_* fields show, without DCGM.

GPM works on pairs of samples: `nvmlGpmSampleGet` snapshots the GPU's counters into a buffer,
and `nvmlGpmMetricsGet` turns two snapshots into averages over the time between them. Each
GPU (and each MIG instance, through `nvmlGpmMigSampleGet`) keeps two buffers and takes them in
turn, so every report carries the averages since the previous one: one sample and one
metrics call per GPU and report. The metrics struct (NVML_GPM_METRIC_MAX entries, ~19 KB) is
built once per sampler.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import pynvml

from gpufed.clock import Clock
from gpufed.logs import get_logger

log = get_logger(__name__)

MIB = 1024 * 1024
# NVML computes nothing useful from snapshots taken closer together than this.
MIN_INTERVAL_S = 0.1
METRICS = (
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL,
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC,
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC,
)
# Sample field each metric fills and the factor from GPM's unit to dcgm-exporter's:
# percent -> ratio, MiB/s -> bytes/s.
FIELDS = (
    ("gr_engine_active", 0.01),
    ("tensor_active", 0.01),
    ("dram_active", 0.01),
    ("pcie_tx_bytes_per_second", float(MIB)),
    ("pcie_rx_bytes_per_second", float(MIB)),
)
_LOST = (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_Unknown)


class GpmLost(Exception):
    pass


class RawMetric(ctypes.Structure):
    """pynvml's c_nvmlGpmMetric_t, same layout, without _PrintableStructure's accessors (about
    0.6 us a field read, which made reading five metrics of 22 samplers half a millisecond)."""

    _fields_ = pynvml.c_nvmlGpmMetric_t._fields_


def metrics_view(request: Any, count: int) -> Any:
    """The first `count` entries of a c_nvmlGpmMetricsGet_t's metrics, as RawMetric, in place."""
    offset = pynvml.c_nvmlGpmMetricsGet_t.metrics.offset
    return (RawMetric * count).from_buffer(request, offset)


def supported(nvml: Any, handle: Any) -> bool:
    """Whether the GPU has GPM (False on older GPUs and drivers without the call)."""
    try:
        return bool(nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
    except pynvml.NVMLError:
        return False


class Sampler:
    """The GPM samples of one GPU (`gpu_instance_id` None) or one MIG instance."""

    def __init__(self, nvml: Any, handle: Any, clock: Clock, gpu_instance_id: int | None = None) -> None:
        self.nvml = nvml
        self.handle = handle
        self.clock = clock
        self.gpu_instance_id = gpu_instance_id
        self.buffers = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
        self.request = pynvml.c_nvmlGpmMetricsGet_t()
        self.request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        self.request.numMetrics = len(METRICS)
        self.view = metrics_view(self.request, len(METRICS))
        for i, metric in enumerate(METRICS):
            self.view[i].metricId = metric
        self.taken_at: float | None = None  # monotonic time of the buffer holding the last snapshot
        self.last = 0  # index of that buffer

    def _take(self, buffer: Any) -> None:
        if self.gpu_instance_id is None:
            self.nvml.nvmlGpmSampleGet(self.handle, buffer)
        else:
            self.nvml.nvmlGpmMigSampleGet(self.handle, self.gpu_instance_id, buffer)

    def read(self) -> dict[str, float] | None:
        """Sample field name -> the average since the previous read, in dcgm-exporter's unit
        (a metric NVML does not give is left out); None on the first read, one too soon
        after the last, or when NVML refuses. GpmLost when the GPU is gone."""
        now = self.clock.monotonic()
        if self.taken_at is not None and now - self.taken_at < MIN_INTERVAL_S:
            return None
        nxt = 1 - self.last
        try:
            self._take(self.buffers[nxt])
            if self.taken_at is None:
                self.taken_at, self.last = now, nxt
                return None
            self.request.sample1, self.request.sample2 = self.buffers[self.last], self.buffers[nxt]
            self.nvml.nvmlGpmMetricsGet(self.request)
        except _LOST as e:
            raise GpmLost() from e
        except pynvml.NVMLError as e:
            log.debug("GPM sample failed", error=str(e), gpu_instance_id=self.gpu_instance_id)
            return None
        self.taken_at, self.last = now, nxt
        values = {}
        for (name, factor), m in zip(FIELDS, self.view, strict=True):
            if m.nvmlReturn == pynvml.NVML_SUCCESS and math.isfinite(m.value) and m.value >= 0:
                values[name] = float(m.value) * factor
        return values

    def close(self) -> None:
        for b in self.buffers:
            try:
                self.nvml.nvmlGpmSampleFree(b)
            except pynvml.NVMLError as e:
                log.debug("nvmlGpmSampleFree failed", error=str(e))
        self.buffers = []
