"""A fake NVML that imitates pynvml (nvidia-ml-py) faithfully, for hosts without a GPU.

Same function names and signatures as pynvml, pynvml's own `c_nvml*` structs as return values and
pynvml's own `NVMLError` subclasses as failures (they import without a driver), including the
failure modes real hosts show: NotSupported (utilization on a MIG-enabled GPU, NVLink on PCIe
cards), GpuIsLost after a GPU falls off the bus, XID events from `nvmlEventSetWait` and
`NVMLError_Timeout` when none arrives. So the collector runs unchanged on either.

Values move plausibly over time from a seeded RNG (reproducible), driven by an injected
gpufed.clock.Clock (its monotonic reading).
Scenarios inject faults at given times: XIDs, double-bit ECC, thermal or power slowdown, row
remap trouble, a lost GPU, utilization patterns.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import random
import re
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
from pynvml import NVMLError

from gpufed.clock import SYSTEM, Clock

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True, slots=True)
class MigSlice:
    """A MIG instance's shape as NVML's device attributes give it."""

    gpu_slices: int
    compute_slices: int
    memory_mb: int
    multiprocessors: int


# Real A100-SXM4-80GB and H100 80GB HBM3 instance shapes (nvidia-smi mig -lgip).
A100_80_MIG = {
    "1g.10gb": MigSlice(1, 1, 9728, 14),
    "2g.20gb": MigSlice(2, 2, 19968, 28),
    "3g.40gb": MigSlice(3, 3, 40192, 42),
    "4g.40gb": MigSlice(4, 4, 40192, 56),
    "7g.80gb": MigSlice(7, 7, 80896, 98),
}
H100_80_MIG = {
    "1g.10gb": MigSlice(1, 1, 9856, 16),
    "1g.20gb": MigSlice(1, 1, 19968, 26),
    "2g.20gb": MigSlice(2, 2, 19968, 32),
    "3g.40gb": MigSlice(3, 3, 40448, 60),
    "4g.40gb": MigSlice(4, 4, 40448, 64),
    "7g.80gb": MigSlice(7, 7, 80640, 132),
}
MAX_MIG_DEVICES = 7


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    memory_bytes: int
    max_power_w: float
    idle_power_w: float
    max_sm_clock_mhz: int
    nvlinks: int = 0
    mig: bool = False
    # With MIG on: the instances created, by profile name (keys of `mig_shapes`).
    mig_layout: tuple[str, ...] = ()
    mig_shapes: tuple[tuple[str, MigSlice], ...] = ()
    mem_clock_mhz: int = 1593
    hbm: bool = True  # HBM reports its own temperature; GDDR does not
    gpm: bool = False  # NVML's GPU Performance Monitoring: Hopper and newer
    vgpu_licensable: bool = True  # data-center boards answer the vGPU licence query

    def shape(self, profile: str) -> MigSlice:
        return dict(self.mig_shapes)[profile]


H100_SXM = GpuSpec(
    "NVIDIA H100 80GB HBM3", 81559 * MIB, 700.0, 70.0, 1980, nvlinks=18, mem_clock_mhz=2619, gpm=True
)
A100_SXM = GpuSpec("NVIDIA A100-SXM4-80GB", 81920 * MIB, 400.0, 55.0, 1410, nvlinks=12)
L40S = GpuSpec("NVIDIA L40S", 46068 * MIB, 350.0, 35.0, 2520, mem_clock_mhz=9001, hbm=False)
H200 = GpuSpec("NVIDIA H200", 143771 * MIB, 700.0, 75.0, 1980, nvlinks=18, mem_clock_mhz=3201, gpm=True)
A100_MIG = GpuSpec(
    "NVIDIA A100-SXM4-80GB",
    81920 * MIB,
    400.0,
    55.0,
    1410,
    nvlinks=12,
    mig=True,
    mig_layout=("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"),
    mig_shapes=tuple(A100_80_MIG.items()),
)
H100_MIG = GpuSpec(
    "NVIDIA H100 80GB HBM3",
    81559 * MIB,
    700.0,
    70.0,
    1980,
    nvlinks=18,
    mem_clock_mhz=2619,
    gpm=True,
    mig=True,
    mig_layout=("1g.10gb",) * 7,
    mig_shapes=tuple(H100_80_MIG.items()),
)

PROFILES: dict[str, tuple[GpuSpec, ...]] = {
    "h100-sxm-8": (H100_SXM,) * 8,
    "a100-80g-8": (A100_SXM,) * 8,
    "l40s-4": (L40S,) * 4,
    "h200-8": (H200,) * 8,
    # One A100 split 3g.40gb + 2g.20gb + 2 x 1g.10gb.
    "a100-mig": (A100_MIG,),
    # Eight H100s: two split into seven 1g.10gb each, six whole.
    "h100-mig": (H100_MIG,) * 2 + (H100_SXM,) * 6,
}

DRIVER_VERSION = "550.90.07"
CUDA_DRIVER_VERSION = 12040


@dataclass(frozen=True, slots=True)
class ScenarioEvent:
    """At `at` seconds after start, do `kind` to GPU `gpu`. Kinds: xid (value = XID code),
    dbe (value = count), pcie_replays (value = count), thermal, power, remap_pending,
    remap_failure, page_pending, lost,
    utilization (pattern = idle | steady | busy | sine), clear_slowdown."""

    at: float
    gpu: int
    kind: str
    value: int = 0
    pattern: str = ""


KINDS = {
    "xid",
    "dbe",
    "pcie_replays",
    "thermal",
    "power",
    "remap_pending",
    "remap_failure",
    "page_pending",
    "lost",
    "utilization",
    "clear_slowdown",
}
PATTERNS = {"idle", "steady", "busy", "sine"}


def parse_event(text: str) -> ScenarioEvent:
    """`30s:gpu3:xid=79`, `10:0:thermal`, `0:2:utilization=busy`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s?:(?:gpu)?(\d+):([a-z_]+)(?:=([A-Za-z0-9]+))?\s*", text)
    if not m:
        raise ValueError(f"scenario event {text!r} must look like 30s:gpu3:xid=79")
    at, gpu, kind, arg = float(m[1]), int(m[2]), m[3], m[4] or ""
    return _event(at, gpu, kind, arg)


def _event(at: float, gpu: int, kind: str, arg: Any) -> ScenarioEvent:
    if kind not in KINDS:
        raise ValueError(f"unknown scenario kind {kind!r}; one of {sorted(KINDS)}")
    if kind == "utilization":
        if arg not in PATTERNS:
            raise ValueError(f"utilization pattern must be one of {sorted(PATTERNS)}")
        return ScenarioEvent(at, gpu, kind, pattern=str(arg))
    if kind == "xid" and not arg:
        raise ValueError("xid events need a code: xid=79")
    return ScenarioEvent(at, gpu, kind, int(arg or 1))


def load_scenario(path: str | Path) -> list[ScenarioEvent]:
    """A TOML file of [[event]] tables: at = 30, gpu = 3, kind = "xid", value = 79."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    out = []
    for e in doc.get("event", []):
        arg = e.get("pattern", e.get("value", e.get("xid", "")))
        out.append(_event(float(e["at"]), int(e["gpu"]), str(e["kind"]), arg))
    return out


# Handles are real `c_nvmlDevice_t` pointers, as pynvml returns; their address encodes the index
# (a MIG device's: its parent's index and its slot).
_HANDLE_BASE = 0x6F00
_MIG_HANDLE_BASE = 0x7F000


def _handle(index: int) -> Any:
    return ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + index), pynvml.c_nvmlDevice_t)


def _mig_handle(parent: int, slot: int) -> Any:
    return ctypes.cast(ctypes.c_void_p(_MIG_HANDLE_BASE + parent * 16 + slot), pynvml.c_nvmlDevice_t)


def handle_key(handle: Any) -> int:
    """A hashable identity for an NVML device handle (real or fake): the pointer's address."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


FakeHandle = Any


@dataclass(slots=True)
class FakeEventSet:
    registered: dict[int, int] = field(default_factory=dict)  # gpu index -> event type mask
    freed: bool = False


# GPM activity of a fully loaded fake GPU: tensor pipes and HBM busy a share of the time the
# engine is; PCIe traffic in bytes/s (an H100's Gen5 x16 link moves ~64 GB/s each way).
GPM_TENSOR_SHARE = 0.8
GPM_DRAM_SHARE = 0.55
GPM_PCIE_TX_FULL = 3.0e9
GPM_PCIE_RX_FULL = 6.0e9
_GPM_METRIC_INFO = {
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: (b"gr_util", b"graphics engine utilization", b"%"),
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: (b"any_tensor_util", b"any tensor pipe utilization", b"%"),
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: (b"dram_bw_util", b"DRAM bandwidth utilization", b"%"),
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: (b"pcie_tx", b"PCIe transmit bandwidth", b"MiB/sec"),
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: (b"pcie_rx", b"PCIe receive bandwidth", b"MiB/sec"),
}
_GPM_PERCENT = frozenset(list(_GPM_METRIC_INFO)[:3])
_GPM_BASE = 0x9A000
_GPM_METRICS_OFFSET = pynvml.c_nvmlGpmMetricsGet_t.metrics.offset


class _RawGpmMetric(ctypes.Structure):
    """pynvml's c_nvmlGpmMetric_t layout with plain ctypes accessors (the fake's cost is
    counted in the daemon's report benchmark; pynvml's accessors are ~0.6 us a field)."""

    _fields_ = pynvml.c_nvmlGpmMetric_t._fields_


@dataclass
class _GpmCounters:
    """What a GPM sample snapshots: engine activity integrated over time (ns) and bytes moved."""

    at: float = 0.0  # elapsed seconds at the last integration
    gr_ns: float = 0.0
    tensor_ns: float = 0.0
    dram_ns: float = 0.0
    pcie_tx: float = 0.0
    pcie_rx: float = 0.0

    def advance(self, now: float, load: float) -> tuple[float, ...]:
        dt = max(0.0, now - self.at)
        self.gr_ns += dt * 1e9 * load
        self.tensor_ns += dt * 1e9 * load * GPM_TENSOR_SHARE
        self.dram_ns += dt * 1e9 * load * GPM_DRAM_SHARE
        self.pcie_tx += dt * GPM_PCIE_TX_FULL * (0.05 + load)
        self.pcie_rx += dt * GPM_PCIE_RX_FULL * (0.05 + load)
        self.at = now
        return (self.gr_ns, self.tensor_ns, self.dram_ns, self.pcie_tx, self.pcie_rx)


@dataclass(frozen=True, slots=True)
class _GpmSnapshot:
    gpu: int
    instance: int | None  # the GPU instance id of a MIG sample
    time_ns: int
    counters: tuple[float, ...]


@dataclass
class _Gpu:
    index: int
    spec: GpuSpec
    uuid: str
    rng: random.Random
    pattern: str = "steady"
    phase: float = 0.0
    lost: bool = False
    ecc_sbe_volatile: int = 0
    ecc_dbe_volatile: int = 0
    ecc_sbe_aggregate: int = 0
    ecc_dbe_aggregate: int = 0
    retired_sbe: int = 0
    retired_dbe: int = 0
    page_pending: bool = False
    remap_correctable: int = 0
    remap_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    clock_reasons: int = 0
    pcie_replay: int = 0
    nvlink_replay: int = 0
    energy_mj: float = 0.0
    energy_at: float = 0.0
    nvlink_kib: float = 0.0
    migs: list[_Mig] = field(default_factory=list)
    gpm: _GpmCounters = field(default_factory=_GpmCounters)


@dataclass
class _Mig:
    slot: int
    profile: str
    shape: MigSlice
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int = 0
    gpm: _GpmCounters = field(default_factory=_GpmCounters)


class FakeNvml:
    """One simulated host. Use it where pynvml would go: `Collector(FakeNvml("h100-sxm-8"))`."""

    # pynvml's constants and error classes, so callers may use `nvml.NVML_...` on either.
    NVMLError = NVMLError

    def __init__(
        self,
        profile: str | tuple[GpuSpec, ...] = "h100-sxm-8",
        *,
        seed: int = 0,
        host: str = "fake-host",
        scenario: list[ScenarioEvent] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        specs = PROFILES[profile] if isinstance(profile, str) else profile
        if isinstance(profile, str) and profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; one of {sorted(PROFILES)}")
        self.clock = clock
        self.start = clock.monotonic()
        self.scenario = sorted(scenario or [], key=lambda e: e.at)
        self._next_event = 0
        self.initialized = 0
        self.gpus: list[_Gpu] = []
        for i, spec in enumerate(specs):
            digest = hashlib.sha256(f"{host}/{seed}/{i}".encode()).hexdigest()
            uuid = f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
            rng = random.Random(f"{seed}/{host}/{i}")
            gpu = _Gpu(i, spec, uuid, rng, phase=rng.uniform(0, 2 * math.pi))
            for slot, profile in enumerate(spec.mig_layout if spec.mig else ()):
                d = hashlib.sha256(f"{host}/{seed}/{i}/mig{slot}".encode()).hexdigest()
                mig_uuid = f"MIG-{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:32]}"
                # NVML numbers GPU instances by placement; any distinct ids do here.
                gpu.migs.append(_Mig(slot, profile, spec.shape(profile), mig_uuid, slot + 1))
            self.gpus.append(gpu)
        self._gpm_samples: dict[int, _GpmSnapshot | None] = {}  # by address; None until taken
        self._events: deque[tuple[int, int, int]] = deque()  # (gpu index, event type, data)
        self._cond = threading.Condition()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        # NVML_* constants and NVMLError_* classes come straight from pynvml.
        if name.startswith(
            ("NVML_", "NVMLError", "nvmlClocksEventReason", "nvmlClocksThrottleReason", "nvmlEventType")
        ):
            return getattr(pynvml, name)
        raise AttributeError(name)

    # -- scenario ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.start

    def _advance(self) -> None:
        now = self.elapsed()
        with self._lock:
            while self._next_event < len(self.scenario) and self.scenario[self._next_event].at <= now:
                self.apply(self.scenario[self._next_event])
                self._next_event += 1

    def apply(self, ev: ScenarioEvent) -> None:
        """Apply one fault now (scenarios call this at their time; tests may call it directly)."""
        g = self.gpus[ev.gpu]
        if ev.kind == "xid":
            self._post(g.index, pynvml.nvmlEventTypeXidCriticalError, ev.value)
            if ev.value == 79:
                g.lost = True
        elif ev.kind == "dbe":
            g.ecc_dbe_volatile += ev.value
            g.ecc_dbe_aggregate += ev.value
            g.retired_dbe += ev.value
            self._post(g.index, pynvml.nvmlEventTypeDoubleBitEccError, 0)
        elif ev.kind == "pcie_replays":
            g.pcie_replay += ev.value
        elif ev.kind == "thermal":
            g.clock_reasons |= pynvml.nvmlClocksEventReasonHwThermalSlowdown
        elif ev.kind == "power":
            g.clock_reasons |= pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown
        elif ev.kind == "clear_slowdown":
            g.clock_reasons = 0
        elif ev.kind == "remap_pending":
            g.remap_pending = True
        elif ev.kind == "remap_failure":
            g.remap_failure = True
            g.remap_uncorrectable += 1
        elif ev.kind == "page_pending":
            g.page_pending = True
        elif ev.kind == "lost":
            g.lost = True
        elif ev.kind == "utilization":
            g.pattern = ev.pattern

    def _post(self, index: int, event_type: int, data: int) -> None:
        with self._cond:
            self._events.append((index, event_type, data))
            self._cond.notify_all()

    # -- helpers -------------------------------------------------------------------------------

    def _check_init(self) -> None:
        if self.initialized <= 0:
            raise NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: FakeHandle) -> _Gpu:
        if self.initialized <= 0:
            raise NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if self._next_event < len(self.scenario):
            self._advance()
        try:
            key = handle_key(handle)
        except (TypeError, ctypes.ArgumentError) as e:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT) from e
        if key >= _MIG_HANDLE_BASE and self._find_mig(key) is not None:
            # Device-level queries on a MIG device handle: NVML answers NotSupported.
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        index = key - _HANDLE_BASE
        if not 0 <= index < len(self.gpus):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g = self.gpus[index]
        if g.lost:
            raise NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

    def _find_mig(self, key: int) -> tuple[_Gpu, _Mig] | None:
        parent, slot = divmod(key - _MIG_HANDLE_BASE, 16)
        if 0 <= parent < len(self.gpus):
            for m in self.gpus[parent].migs:
                if m.slot == slot:
                    return self.gpus[parent], m
        return None

    def _mig(self, handle: FakeHandle) -> tuple[_Gpu, _Mig]:
        self._check_init()
        found = self._find_mig(handle_key(handle))
        if found is None:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if found[0].lost:
            raise NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return found

    def _is_mig(self, handle: FakeHandle) -> bool:
        return self._find_mig(handle_key(handle)) is not None

    def _load(self, g: _Gpu) -> float:
        """Utilization in [0, 1] by the GPU's pattern at this time."""
        t = self.elapsed()
        if g.pattern == "idle":
            base = 0.0
        elif g.pattern == "busy":
            base = 0.97
        elif g.pattern == "sine":
            base = 0.5 + 0.45 * math.sin(t / 30.0 + g.phase)
        else:
            base = 0.6 + 0.1 * math.sin(t / 60.0 + g.phase)
        return min(1.0, max(0.0, base + g.rng.uniform(-0.03, 0.03)))

    # -- pynvml API ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.initialized += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return DRIVER_VERSION

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        return CUDA_DRIVER_VERSION

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.nvmlSystemGetCudaDriverVersion()

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _handle(index)

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        return self._gpu(handle).index

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        if self._is_mig(handle):
            return self._mig(handle)[1].uuid
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        if self._is_mig(handle):
            return self._mig(handle)[0].spec.name
        return self._gpu(handle).spec.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        if self._is_mig(handle):
            g, m = self._mig(handle)
            total = m.shape.memory_mb * MIB
            reserved = 0
        else:
            g = self._gpu(handle)
            total = g.spec.memory_bytes
            # The driver keeps some memory for itself (nvidia-smi's "Reserved").
            reserved = 0 if g.spec.mig else 512 * MIB
        mem = pynvml.c_nvmlMemory_v2_t() if version else pynvml.c_nvmlMemory_t()
        if version:
            mem.version = version
            mem.reserved = reserved
        used = int((total - reserved) * (0.02 + 0.9 * self._load(g)))
        mem.total = total
        mem.used = used + (0 if version else reserved)
        mem.free = total - reserved - used
        return mem

    # -- MIG -----------------------------------------------------------------------------------

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        self.nvmlDeviceGetMigMode(handle)  # NotSupported on GPUs without MIG
        return MAX_MIG_DEVICES

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        g = self._gpu(handle)
        if not g.spec.mig:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < MAX_MIG_DEVICES:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(g.migs):
            raise NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return _mig_handle(g.index, g.migs[index].slot)

    def nvmlDeviceIsMigDeviceHandle(self, handle: FakeHandle) -> int:
        self._check_init()
        return int(self._is_mig(handle))

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: FakeHandle) -> FakeHandle:
        return _handle(self._mig(handle)[0].index)

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        if not self._is_mig(handle):
            self._gpu(handle)
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._mig(handle)[1].gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeHandle) -> int:
        if not self._is_mig(handle):
            self._gpu(handle)
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._mig(handle)[1].compute_instance_id

    def nvmlDeviceGetAttributes(self, handle: FakeHandle) -> Any:
        a = pynvml.c_nvmlDeviceAttributes()
        if self._is_mig(handle):
            shape = self._mig(handle)[1].shape
        else:
            g = self._gpu(handle)
            full = dict(g.spec.mig_shapes).get("7g.80gb")
            shape = full or MigSlice(0, 0, g.spec.memory_bytes // MIB, 132)
        a.multiprocessorCount = shape.multiprocessors
        a.gpuInstanceSliceCount = shape.gpu_slices
        a.computeInstanceSliceCount = shape.compute_slices
        a.memorySizeMB = shape.memory_mb
        return a

    def nvmlDeviceGetAttributes_v2(self, handle: FakeHandle) -> Any:
        return self.nvmlDeviceGetAttributes(handle)

    # -- counters dcgm-exporter shows ------------------------------------------------------------

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        g = self._gpu(handle)
        now = self.elapsed()
        g.energy_mj += self.nvmlDeviceGetPowerUsage(handle) * max(0.0, now - g.energy_at)
        g.energy_at = now
        return int(g.energy_mj)

    def nvmlDeviceGetEncoderUtilization(self, handle: FakeHandle) -> list[int]:
        g = self._gpu(handle)
        if g.spec.mig:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [0, 167000]

    def nvmlDeviceGetDecoderUtilization(self, handle: FakeHandle) -> list[int]:
        g = self._gpu(handle)
        if g.spec.mig:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [round(5 * self._load(g)), 167000]

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[Any]) -> Any:
        g = self._gpu(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for i, fid in enumerate(field_ids):
            field_id, scope = fid if isinstance(fid, tuple) else (fid, 0)
            v = values[i]
            v.fieldId, v.scopeId = field_id, scope
            v.timestamp = self.clock.time_ns() // 1000
            v.nvmlReturn = pynvml.NVML_SUCCESS
            if field_id == pynvml.NVML_FI_DEV_MEMORY_TEMP and g.spec.hbm:
                v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                v.value.uiVal = round(30 + 40 * self._load(g))
            elif (
                field_id
                in (
                    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
                )
                and 0 <= scope < g.spec.nvlinks
            ):
                # KiB moved over the link since the driver loaded: ~25 GB/s per link at full load.
                v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                v.value.ullVal = int(self.elapsed() * 25e6 * (0.1 + self._load(g)))
            else:
                v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetGridLicensableFeatures_v4(self, handle: FakeHandle) -> Any:
        """A bare-metal data-center board: licensing supported, its compute feature unlicensed
        (nvidia-smi -q shows "vGPU Software Licensed Product"); NotSupported elsewhere."""
        g = self._gpu(handle)
        if not g.spec.vgpu_licensable:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        out = pynvml.c_nvmlGridLicensableFeatures_v4_t()
        out.isGridLicenseSupported = 1
        out.licensableFeaturesCount = 1
        feature = out.gridLicensableFeatures[0]
        feature.featureCode = pynvml.NVML_GRID_LICENSE_FEATURE_CODE_COMPUTE
        feature.featureState = 0
        feature.productName = b"NVIDIA Virtual Compute Server"
        return out

    def nvmlDeviceGetGridLicensableFeatures(self, handle: FakeHandle) -> Any:
        return self.nvmlDeviceGetGridLicensableFeatures_v4(handle)

    # -- GPM (GPU Performance Monitoring, Hopper and newer) ----------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: FakeHandle) -> Any:
        g = self._gpu(handle)
        out = pynvml.c_nvmlGpmSupport_t()
        out.version = pynvml.NVML_GPM_SUPPORT_VERSION
        out.isSupportedDevice = int(g.spec.gpm)
        return out

    def nvmlGpmSampleAlloc(self) -> Any:
        self._check_init()
        with self._lock:
            address = _GPM_BASE + len(self._gpm_samples) + 1
            while address in self._gpm_samples:
                address += 1
            self._gpm_samples[address] = None
        return ctypes.cast(ctypes.c_void_p(address), pynvml.c_nvmlGpmSample_t)

    def _gpm_key(self, sample: Any) -> int:
        try:
            key = handle_key(sample)
        except (TypeError, ctypes.ArgumentError) as e:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT) from e
        if key not in self._gpm_samples:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return key

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self._check_init()
        with self._lock:
            del self._gpm_samples[self._gpm_key(sample)]

    def nvmlGpmSampleGet(self, handle: FakeHandle, sample: Any) -> Any:
        g = self._gpu(handle)
        if not g.spec.gpm:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        key = self._gpm_key(sample)
        now = self.elapsed()
        counters = g.gpm.advance(now, self._load(g))
        self._gpm_samples[key] = _GpmSnapshot(g.index, None, int(now * 1e9), counters)
        return sample

    def nvmlGpmMigSampleGet(self, handle: FakeHandle, gpu_instance_id: int, sample: Any) -> Any:
        g = self._gpu(handle)
        if not g.spec.gpm:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not g.spec.mig:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        mig = next((m for m in g.migs if m.gpu_instance_id == gpu_instance_id), None)
        if mig is None:
            raise NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        key = self._gpm_key(sample)
        now = self.elapsed()
        counters = mig.gpm.advance(now, self._load(g))
        self._gpm_samples[key] = _GpmSnapshot(g.index, gpu_instance_id, int(now * 1e9), counters)
        return sample

    def nvmlGpmMetricsGet(self, metrics_get: Any) -> Any:
        """Each asked metric over the time between sample1 and sample2 (same GPU or instance,
        sample2 later); a metric the fake does not model answers NotSupported in its own
        nvmlReturn, as NVML does for metrics a GPU lacks."""
        self._check_init()
        if metrics_get.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if not 0 < metrics_get.numMetrics <= pynvml.NVML_GPM_METRIC_MAX:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        first = self._gpm_samples.get(self._gpm_key(metrics_get.sample1))
        second = self._gpm_samples.get(self._gpm_key(metrics_get.sample2))
        if first is None or second is None or (first.gpu, first.instance) != (second.gpu, second.instance):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        seconds = (second.time_ns - first.time_ns) / 1e9
        if seconds <= 0:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        d = [b - a for a, b in zip(first.counters, second.counters, strict=True)]
        values = {
            pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: 100 * d[0] / (seconds * 1e9),
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 100 * d[1] / (seconds * 1e9),
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 100 * d[2] / (seconds * 1e9),
        }
        if first.instance is None:  # PCIe is the board's: not per MIG instance
            values[pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC] = d[3] / seconds / MIB
            values[pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC] = d[4] / seconds / MIB
        view = (_RawGpmMetric * metrics_get.numMetrics).from_buffer(metrics_get, _GPM_METRICS_OFFSET)
        for m in view:
            if m.metricId in values:
                m.nvmlReturn = pynvml.NVML_SUCCESS
                v = values[m.metricId]
                m.value = min(100.0, v) if m.metricId in _GPM_PERCENT else v
                m.metricInfo.shortName, m.metricInfo.longName, m.metricInfo.unit = _GPM_METRIC_INFO[
                    m.metricId
                ]
            elif 0 < m.metricId < pynvml.NVML_GPM_METRIC_MAX:
                m.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            else:
                m.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
        return metrics_get

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        g = self._gpu(handle)
        if g.spec.mig:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        u = pynvml.c_nvmlUtilization_t()
        load = self._load(g)
        u.gpu = round(100 * load)
        u.memory = round(60 * load)
        return u

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        g = self._gpu(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        hot = 40 if g.clock_reasons & pynvml.nvmlClocksEventReasonHwThermalSlowdown else 0
        return round(32 + 45 * self._load(g) + hot + g.rng.uniform(-1, 1))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        g = self._gpu(handle)
        watts = g.spec.idle_power_w + (g.spec.max_power_w - g.spec.idle_power_w) * self._load(g)
        return int(watts * 1000)

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        g = self._gpu(handle)
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return g.spec.mem_clock_mhz
        if clock_type != pynvml.NVML_CLOCK_SM:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        factor = 0.6 if g.clock_reasons else 1.0
        return int(g.spec.max_sm_clock_mhz * factor * (0.5 + 0.5 * self._load(g)))

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        g = self._gpu(handle)
        if g.rng.random() < 0.01:
            g.pcie_replay += 1
        return g.pcie_replay

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        g = self._gpu(handle)
        volatile = counter_type == pynvml.NVML_VOLATILE_ECC
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return g.ecc_sbe_volatile if volatile else g.ecc_sbe_aggregate
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return g.ecc_dbe_volatile if volatile else g.ecc_dbe_aggregate
        raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetRetiredPages(self, handle: FakeHandle, cause: int) -> list[int]:
        g = self._gpu(handle)
        if g.spec.name.endswith(("HBM3", "H200")):
            # Hopper replaced page retirement with row remapping.
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        count = (
            g.retired_sbe
            if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
            else g.retired_dbe
        )
        return [0x1000 * (i + 1) for i in range(count)]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeHandle) -> int:
        g = self._gpu(handle)
        if g.spec.name.endswith(("HBM3", "H200")):
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(pynvml.NVML_FEATURE_ENABLED if g.page_pending else pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        g = self._gpu(handle)
        return (g.remap_correctable, g.remap_uncorrectable, int(g.remap_pending), int(g.remap_failure))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        g = self._gpu(handle)
        idle = pynvml.nvmlClocksEventReasonGpuIdle if g.pattern == "idle" else 0
        return g.clock_reasons | idle

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle)

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        g = self._gpu(handle)
        if "A100" not in g.spec.name and "H100" not in g.spec.name and "H200" not in g.spec.name:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if g.spec.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetNvLinkState(self, handle: FakeHandle, link: int) -> int:
        g = self._gpu(handle)
        if not 0 <= link < g.spec.nvlinks:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: FakeHandle, link: int, counter: int) -> int:
        g = self._gpu(handle)
        if not 0 <= link < g.spec.nvlinks:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return g.nvlink_replay if counter == pynvml.NVML_NVLINK_ERROR_DL_REPLAY else 0

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        self._gpu(handle)
        return int(
            pynvml.nvmlEventTypeXidCriticalError
            | pynvml.nvmlEventTypeDoubleBitEccError
            | pynvml.nvmlEventTypeSingleBitEccError
        )

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._check_init()
        return FakeEventSet()

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        g = self._gpu(handle)
        if g.spec.mig and event_types & pynvml.nvmlEventTypeXidCriticalError == 0:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        event_set.registered[g.index] = event_set.registered.get(g.index, 0) | event_types

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        self._check_init()
        deadline = time.monotonic() + timeout_ms / 1000.0
        with self._cond:
            while True:
                self._cond.release()
                try:
                    self._advance()
                finally:
                    self._cond.acquire()
                while self._events:
                    index, event_type, data = self._events.popleft()
                    if event_set.registered.get(index, 0) & event_type:
                        out = pynvml.c_nvmlEventData_t()
                        out.device = _handle(index)
                        out.eventType = event_type
                        out.eventData = data
                        out.gpuInstanceId = 0xFFFFFFFF
                        out.computeInstanceId = 0xFFFFFFFF
                        return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NVMLError(pynvml.NVML_ERROR_TIMEOUT)
                self._cond.wait(min(remaining, 0.1))

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True
