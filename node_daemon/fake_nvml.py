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
class GpuSpec:
    name: str
    memory_bytes: int
    max_power_w: float
    idle_power_w: float
    max_sm_clock_mhz: int
    nvlinks: int = 0
    mig: bool = False


H100_SXM = GpuSpec("NVIDIA H100 80GB HBM3", 81559 * MIB, 700.0, 70.0, 1980, nvlinks=18)
A100_SXM = GpuSpec("NVIDIA A100-SXM4-80GB", 81920 * MIB, 400.0, 55.0, 1410, nvlinks=12)
L40S = GpuSpec("NVIDIA L40S", 46068 * MIB, 350.0, 35.0, 2520)
H200 = GpuSpec("NVIDIA H200", 143771 * MIB, 700.0, 75.0, 1980, nvlinks=18)
A100_MIG = GpuSpec("NVIDIA A100-SXM4-80GB", 81920 * MIB, 400.0, 55.0, 1410, nvlinks=12, mig=True)

PROFILES: dict[str, tuple[GpuSpec, ...]] = {
    "h100-sxm-8": (H100_SXM,) * 8,
    "a100-80g-8": (A100_SXM,) * 8,
    "l40s-4": (L40S,) * 4,
    "h200-8": (H200,) * 8,
    "a100-mig": (A100_MIG,),
}

DRIVER_VERSION = "550.90.07"
CUDA_DRIVER_VERSION = 12040


@dataclass(frozen=True, slots=True)
class ScenarioEvent:
    """At `at` seconds after start, do `kind` to GPU `gpu`. Kinds: xid (value = XID code),
    dbe (value = count), thermal, power, remap_pending, remap_failure, page_pending, lost,
    utilization (pattern = idle | steady | busy | sine), clear_slowdown."""

    at: float
    gpu: int
    kind: str
    value: int = 0
    pattern: str = ""


KINDS = {
    "xid",
    "dbe",
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


# Handles are real `c_nvmlDevice_t` pointers, as pynvml returns; their address encodes the index.
_HANDLE_BASE = 0x6F00


def _handle(index: int) -> Any:
    return ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + index), pynvml.c_nvmlDevice_t)


def handle_key(handle: Any) -> int:
    """A hashable identity for an NVML device handle (real or fake): the pointer's address."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


FakeHandle = Any


@dataclass(slots=True)
class FakeEventSet:
    registered: dict[int, int] = field(default_factory=dict)  # gpu index -> event type mask
    freed: bool = False


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
            self.gpus.append(_Gpu(i, spec, uuid, rng, phase=rng.uniform(0, 2 * math.pi)))
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
            index = handle_key(handle) - _HANDLE_BASE
        except (TypeError, ctypes.ArgumentError) as e:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT) from e
        if not 0 <= index < len(self.gpus):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g = self.gpus[index]
        if g.lost:
            raise NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

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
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu(handle).spec.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        g = self._gpu(handle)
        mem = pynvml.c_nvmlMemory_t()
        mem.total = g.spec.memory_bytes
        used = int(g.spec.memory_bytes * (0.02 + 0.9 * self._load(g)))
        mem.used = used
        mem.free = g.spec.memory_bytes - used
        return mem

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
