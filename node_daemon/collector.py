"""Reads every GPU of the host through NVML: `pynvml` on a GPU host, FakeNvml elsewhere.

The NVML module is injected. Every optional counter copes with NotSupported (reported absent,
never zero); a GPU that answers GpuIsLost or Unknown is reported lost and UNHEALTHY while the
others keep being read. XID events come from their own thread (XidWatcher) and reach the
control plane at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml
from google.protobuf import timestamp_pb2

from gpufed.clock import SYSTEM, Clock, now_ts
from gpufed.logs import get_logger
from gpufed.v1 import common_pb2
from node_daemon import gpm, health
from node_daemon.gpm import Sampler as GpmSampler

log = get_logger(__name__)

_NOT_SUPPORTED = pynvml.NVMLError_NotSupported
_LOST = (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_Unknown)
NVLINK_EVERY = 15
_NVLINK_COUNTERS = (
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
)


class GpuLost(Exception):
    pass


@dataclass(frozen=True, slots=True)
class MigInfo:
    handle: Any
    uuid: str
    profile: str
    memory_total: int
    gpu_instance_id: int
    compute_instance_id: int


def mig_profile_name(gpu_slices: int, compute_slices: int, memory_mb: int, gpu_memory_bytes: int) -> str:
    """A MIG instance's profile as NVIDIA names it ("1g.10gb", "1c.2g.20gb"): the instance's
    share of the GPU's memory rounded up to eighths, times the GPU's memory in whole GiB."""
    gib = 1024**3
    share = math.ceil(memory_mb * 1024**2 / gpu_memory_bytes * 8) / 8
    gb = round(share * ((gpu_memory_bytes + gib - 1) // gib))
    prefix = f"{compute_slices}c." if compute_slices != gpu_slices else ""
    return f"{prefix}{gpu_slices}g.{gb}gb"


def handle_key(handle: Any) -> int:
    """Identity of a device handle (a c_nvmlDevice_t pointer) without asking NVML."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


@dataclass
class GpuInfo:
    index: int
    handle: Any
    uuid: str
    model: str
    memory_total: int
    mig_enabled: bool
    nvlinks: int = 0
    nvlink_cache: tuple[int, int] | None = None  # (active links, error count)
    nvlink_kib: int | None = None  # data over all links, read with the error counters
    lost: bool = False
    xids: set[int] = field(default_factory=set)
    migs: list[MigInfo] = field(default_factory=list)
    last_xid: int = 0  # any XID, the application's too (dcgm-exporter's DCGM_FI_DEV_XID_ERRORS)
    last_verdict: health.Verdict = field(default_factory=lambda: health.Verdict(health.HEALTHY))
    gpm: GpmSampler | None = None  # None where the GPU has no GPM
    mig_gpm: dict[str, GpmSampler] = field(default_factory=dict)  # MIG uuid -> its sampler
    vgpu_license: int | None = None  # it changes rarely: read every NVLINK_EVERY reports
    vgpu_license_read: bool = False
    # (monotonic time, PCIe replay count) of the last minute's reports, oldest first.
    replays: deque[tuple[float, int]] = field(default_factory=deque)


class Collector:
    def __init__(self, nvml: Any = pynvml, clock: Clock = SYSTEM) -> None:
        self.nvml = nvml
        self.clock = clock
        self.gpus: list[GpuInfo] = []
        self.by_handle: dict[int, GpuInfo] = {}
        self.by_uuid: dict[str, GpuInfo] = {}
        self.driver_version = ""
        self.cuda_driver_version = ""
        self.sequence = 0
        self.last_report: common_pb2.NodeReport | None = None  # what /metrics shows
        self._lock = threading.Lock()

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        n = self.nvml
        n.nvmlInit()
        self.driver_version = _text(n.nvmlSystemGetDriverVersion())
        cuda = int(n.nvmlSystemGetCudaDriverVersion())
        self.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            try:
                info = GpuInfo(
                    index=i,
                    handle=h,
                    uuid=_text(n.nvmlDeviceGetUUID(h)),
                    model=_text(n.nvmlDeviceGetName(h)),
                    memory_total=int(n.nvmlDeviceGetMemoryInfo(h).total),
                    mig_enabled=self._mig(h),
                )
            except _LOST:
                log.error("GPU lost at start; leaving it out of the inventory", index=i)
                continue
            info.nvlinks = self._count_nvlinks(h)
            if info.mig_enabled:
                info.migs = self._migs(h, info.memory_total)
            self._start_gpm(info)
            self.gpus.append(info)
            self.by_handle[handle_key(h)] = info
            self.by_uuid[info.uuid] = info

    def _start_gpm(self, info: GpuInfo) -> None:
        if not gpm.supported(self.nvml, info.handle):
            return
        try:
            info.gpm = GpmSampler(self.nvml, info.handle, self.clock)
            for m in info.migs:
                info.mig_gpm[m.uuid] = GpmSampler(self.nvml, info.handle, self.clock, m.gpu_instance_id)
        except pynvml.NVMLError as e:
            log.warning("GPM is supported but its samples cannot be allocated", error=str(e))

    def shutdown(self) -> None:
        for g in self.gpus:
            for sampler in (g.gpm, *g.mig_gpm.values()):
                if sampler is not None:
                    sampler.close()
        try:
            self.nvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            log.warning("nvmlShutdown failed", error=str(e))

    def _mig(self, h: Any) -> bool:
        try:
            current, _ = self.nvml.nvmlDeviceGetMigMode(h)
            return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)
        except _NOT_SUPPORTED:
            return False

    def _migs(self, h: Any, gpu_memory: int) -> list[MigInfo]:
        """The GPU's MIG instances, by NVML's MIG device handles (empty slots are NotFound)."""
        n = self.nvml
        out = []
        try:
            slots = int(n.nvmlDeviceGetMaxMigDeviceCount(h))
        except pynvml.NVMLError as e:
            log.warning("MIG is on but its devices cannot be listed", error=str(e))
            return []
        for i in range(slots):
            try:
                m = n.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
                attrs = n.nvmlDeviceGetAttributes(m)
                out.append(
                    MigInfo(
                        handle=m,
                        uuid=_text(n.nvmlDeviceGetUUID(m)),
                        profile=mig_profile_name(
                            attrs.gpuInstanceSliceCount,
                            attrs.computeInstanceSliceCount,
                            attrs.memorySizeMB,
                            gpu_memory,
                        ),
                        memory_total=int(n.nvmlDeviceGetMemoryInfo(m).total),
                        gpu_instance_id=int(n.nvmlDeviceGetGpuInstanceId(m)),
                        compute_instance_id=int(n.nvmlDeviceGetComputeInstanceId(m)),
                    )
                )
            except pynvml.NVMLError_NotFound:
                continue
            except pynvml.NVMLError as e:
                log.warning("cannot read a MIG device", slot=i, error=str(e))
        return out

    def _count_nvlinks(self, h: Any) -> int:
        links = 0
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                self.nvml.nvmlDeviceGetNvLinkState(h, link)
            except pynvml.NVMLError:
                break
            links += 1
        return links

    # -- inventory -------------------------------------------------------------------------------

    def inventory(self) -> list[common_pb2.Gpu]:
        """The hello's inventory, with each GPU's health from a first reading."""
        report = self.sample()
        by_uuid = {s.uuid: s for s in report.gpus}
        out = []
        for g in self.gpus:
            s = by_uuid.get(g.uuid)
            gpu = common_pb2.Gpu(
                uuid=g.uuid,
                index=g.index,
                model=g.model,
                memory_total_bytes=g.memory_total,
                mig_enabled=g.mig_enabled,
            )
            if s is not None:
                gpu.health = s.health
                gpu.health_reasons.extend(s.health_reasons)
            out.append(gpu)
            for m in g.migs:
                out.append(
                    common_pb2.Gpu(
                        uuid=m.uuid,
                        index=g.index,
                        model=g.model,
                        memory_total_bytes=m.memory_total,
                        health=gpu.health,
                        parent_uuid=g.uuid,
                        mig_profile=m.profile,
                        gpu_instance_id=m.gpu_instance_id,
                        compute_instance_id=m.compute_instance_id,
                    )
                )
        return out

    # -- sampling --------------------------------------------------------------------------------

    def note_xid(self, gpu: GpuInfo, xid: int) -> health.Verdict:
        """The GPU's verdict with this XID: one that points at the GPU stays with it; one
        that points at the application is only in this verdict (the event's)."""
        gpu.last_xid = xid
        if health.is_sticky(xid):
            with self._lock:
                gpu.xids.add(xid)
            return self._verdict(gpu, None)
        prev = gpu.last_verdict
        return health.verdict_of([(prev.health, r) for r in prev.reasons] + [health.xid_reason(xid)])

    def clear_faults(self, uuids: list[str]) -> None:
        """An operator cleared these GPUs: forget their XIDs; the next reading judges them."""
        for uuid in uuids:
            gpu = self.by_uuid.get(uuid)
            if gpu is not None:
                with self._lock:
                    gpu.xids.clear()
                gpu.last_verdict = health.Verdict(health.HEALTHY)
                log.info("GPU faults cleared by an operator", uuid=uuid)

    def _verdict(self, gpu: GpuInfo, s: common_pb2.GpuSample | None) -> health.Verdict:
        def opt(name: str) -> Any:
            return getattr(s, name) if s is not None and s.HasField(name) else None  # type: ignore[arg-type]

        with self._lock:
            xids = frozenset(gpu.xids)
        reading = health.Reading(
            lost=gpu.lost,
            xids=xids,
            ecc_volatile_uncorrected=opt("ecc_volatile_uncorrected"),
            remapped_rows_failure=opt("remapped_rows_failure"),
            remapped_rows_pending=opt("remapped_rows_pending"),
            retired_pages_pending=opt("retired_pages_pending"),
            clock_event_reasons=opt("clock_event_reasons"),
            pcie_replays_last_minute=self._replays_last_minute(gpu, s),
            pcie_bytes_per_second=_pcie_rate(s),
        )
        if s is None:
            prev = gpu.last_verdict
            # An event alone: keep what the last sample saw and add the event's verdict.
            ev = health.evaluate(reading)
            merged = {r.code: r for r in prev.reasons}
            merged.update((r.code, r) for r in ev.reasons)
            verdict = health.Verdict(max(prev.health, ev.health), tuple(merged.values()))
        else:
            verdict = health.evaluate(reading)
        gpu.last_verdict = verdict
        return verdict

    def _replays_last_minute(self, gpu: GpuInfo, s: common_pb2.GpuSample | None) -> int | None:
        """PCIe replays since the report nearest a minute ago (DCGM's PCIe health watch counts
        replays per minute); None for an event (its verdict keeps the last sample's reasons)
        or without the counter."""
        if s is None or not s.HasField("pcie_replay_count"):
            return None
        now, count = self.clock.monotonic(), int(s.pcie_replay_count)
        window = gpu.replays
        while len(window) > 1 and window[1][0] <= now - health.PCIE_REPLAY_WINDOW_S:
            window.popleft()
        if window and count < window[-1][1]:
            window.clear()  # the counter was reset (a GPU reset): start over
        window.append((now, count))
        return count - window[0][1]

    def _read(self, s: common_pb2.GpuSample, field_name: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except _NOT_SUPPORTED:
            return
        except _LOST as e:
            raise GpuLost() from e
        except pynvml.NVMLError as e:
            log.debug("NVML query failed", field=field_name, error=str(e))
            return
        setattr(s, field_name, value)

    def _sample_gpu(self, g: GpuInfo) -> common_pb2.GpuSample:
        n, h = self.nvml, g.handle
        s = common_pb2.GpuSample(uuid=g.uuid, index=g.index)
        with self._lock:
            s.xids.extend(sorted(g.xids))
        if g.lost:
            s.lost = True
        else:
            try:
                self._read_all(s, n, h, g)
            except GpuLost:
                log.error("GPU lost", uuid=g.uuid, index=g.index)
                g.lost = True
                s.lost = True
        verdict = self._verdict(g, s)
        s.health = verdict.health  # type: ignore[assignment]
        s.health_reasons.extend(verdict.to_proto_reasons())
        return s

    def _read_all(self, s: common_pb2.GpuSample, n: Any, h: Any, g: GpuInfo) -> None:
        r = self._read
        try:
            self._read_memory(s, n, h)
        except _NOT_SUPPORTED:
            pass
        except _LOST as e:
            raise GpuLost() from e
        try:
            u = n.nvmlDeviceGetUtilizationRates(h)
            s.utilization_gpu_percent, s.utilization_memory_percent = u.gpu, u.memory
        except _NOT_SUPPORTED:
            pass  # MIG-enabled GPUs report no device-level utilization
        except _LOST as e:
            raise GpuLost() from e
        r(s, "temperature_celsius", lambda: n.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        r(s, "power_watts", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0)
        r(s, "sm_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        r(s, "mem_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))
        r(s, "total_energy_millijoules", lambda: n.nvmlDeviceGetTotalEnergyConsumption(h))
        r(s, "encoder_utilization_percent", lambda: n.nvmlDeviceGetEncoderUtilization(h)[0])
        r(s, "decoder_utilization_percent", lambda: n.nvmlDeviceGetDecoderUtilization(h)[0])
        r(s, "pcie_replay_count", lambda: n.nvmlDeviceGetPcieReplayCounter(h))
        ce, ue = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        vol, agg = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
        r(s, "ecc_volatile_corrected", lambda: n.nvmlDeviceGetTotalEccErrors(h, ce, vol))
        r(s, "ecc_volatile_uncorrected", lambda: n.nvmlDeviceGetTotalEccErrors(h, ue, vol))
        r(s, "ecc_aggregate_corrected", lambda: n.nvmlDeviceGetTotalEccErrors(h, ce, agg))
        r(s, "ecc_aggregate_uncorrected", lambda: n.nvmlDeviceGetTotalEccErrors(h, ue, agg))
        sbe = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        dbe = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        r(s, "retired_pages_single_bit", lambda: len(n.nvmlDeviceGetRetiredPages(h, sbe)))
        r(s, "retired_pages_double_bit", lambda: len(n.nvmlDeviceGetRetiredPages(h, dbe)))
        r(
            s,
            "retired_pages_pending",
            lambda: n.nvmlDeviceGetRetiredPagesPendingStatus(h) == pynvml.NVML_FEATURE_ENABLED,
        )
        try:
            corr, unc, pending, failure = n.nvmlDeviceGetRemappedRows(h)
            s.remapped_rows_correctable, s.remapped_rows_uncorrectable = corr, unc
            s.remapped_rows_pending, s.remapped_rows_failure = bool(pending), bool(failure)
        except _NOT_SUPPORTED:
            pass
        except _LOST as e:
            raise GpuLost() from e
        r(s, "clock_event_reasons", lambda: n.nvmlDeviceGetCurrentClocksEventReasons(h))
        s.mig_enabled = g.mig_enabled
        # NVLink counters move slowly and cost 4 NVML calls and 2 field values per link: read
        # them every NVLINK_EVERY reports and repeat the last reading in between.
        nvlink_due = g.nvlinks > 0 and (g.nvlink_cache is None or self.sequence % NVLINK_EVERY == 0)
        self._read_fields(s, n, h, g, nvlink_due)
        if not g.vgpu_license_read or self.sequence % NVLINK_EVERY == 0:
            g.vgpu_license, g.vgpu_license_read = self._read_vgpu_license(n, h), True
        if g.vgpu_license is not None:
            s.vgpu_license_status = g.vgpu_license
        if g.gpm is not None:
            _put(s, _gpm_read(g.gpm))
        if g.nvlinks:
            if nvlink_due:
                g.nvlink_cache = self._read_nvlink(n, h, g)
            s.nvlink_active_links, s.nvlink_errors = g.nvlink_cache  # type: ignore[misc]
            if g.nvlink_kib is not None:
                s.nvlink_data_kib = g.nvlink_kib
        for m in g.migs:
            ms = s.mig_devices.add(
                uuid=m.uuid,
                mig_profile=m.profile,
                gpu_instance_id=m.gpu_instance_id,
                compute_instance_id=m.compute_instance_id,
            )
            with contextlib.suppress(_NOT_SUPPORTED):
                mem = n.nvmlDeviceGetMemoryInfo(m.handle)
                ms.memory_total_bytes, ms.memory_used_bytes, ms.memory_free_bytes = (
                    mem.total,
                    mem.used,
                    mem.free,
                )
            sampler = g.mig_gpm.get(m.uuid)
            if sampler is not None:
                _put(ms, _gpm_read(sampler))

    @staticmethod
    def _read_vgpu_license(n: Any, h: Any) -> int | None:
        """1 when a vGPU licence feature is licensed, 0 when none is; None where NVML has no
        vGPU licensing for the GPU (as nvidia-smi -q then shows no licensed product)."""
        try:
            found = n.nvmlDeviceGetGridLicensableFeatures(h)
        except _LOST as e:
            raise GpuLost() from e
        except pynvml.NVMLError:
            return None
        if not found.isGridLicenseSupported:
            return None
        count = min(int(found.licensableFeaturesCount), pynvml.NVML_GRID_LICENSE_FEATURE_MAX_COUNT)
        return int(any(found.gridLicensableFeatures[i].featureState for i in range(count)))

    @staticmethod
    def _read_memory(s: common_pb2.GpuSample, n: Any, h: Any) -> None:
        """Memory with the driver's reservation apart (nvmlMemory_v2); v1 on older drivers."""
        try:
            mem = n.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            s.memory_reserved_bytes = mem.reserved
        except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported):
            mem = n.nvmlDeviceGetMemoryInfo(h)
        s.memory_total_bytes, s.memory_used_bytes, s.memory_free_bytes = mem.total, mem.used, mem.free

    def _read_fields(self, s: common_pb2.GpuSample, n: Any, h: Any, g: GpuInfo, nvlink: bool) -> None:
        """Counters only NVML's field values give, in one call: HBM temperature and (`nvlink`)
        NVLink data volume, each link's TX and RX, into g.nvlink_kib. A field the GPU lacks
        comes back NotSupported in its own nvmlReturn and stays absent."""
        ids: list[Any] = [pynvml.NVML_FI_DEV_MEMORY_TEMP]
        for link in range(g.nvlinks if nvlink else 0):
            ids.append((pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link))
            ids.append((pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link))
        try:
            values = n.nvmlDeviceGetFieldValues(h, ids)
        except _LOST as e:
            raise GpuLost() from e
        except pynvml.NVMLError:
            return
        kib = None
        for v in values:
            if v.nvmlReturn != pynvml.NVML_SUCCESS:
                continue
            if v.fieldId == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                s.memory_temperature_celsius = int(_field_value(v))
            else:
                kib = (kib or 0) + int(_field_value(v))
        if kib is not None:
            g.nvlink_kib = kib

    def _read_nvlink(self, n: Any, h: Any, g: GpuInfo) -> tuple[int, int]:
        active = 0
        errors = 0
        for link in range(g.nvlinks):
            try:
                if n.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED:
                    active += 1
                for counter in _NVLINK_COUNTERS:
                    errors += int(n.nvmlDeviceGetNvLinkErrorCounter(h, link, counter))
            except _NOT_SUPPORTED:
                continue
            except _LOST as e:
                raise GpuLost() from e
        return active, errors

    def sample(self) -> common_pb2.NodeReport:
        """One report: every GPU of the host."""
        report = common_pb2.NodeReport(sequence=self.sequence)
        self.sequence += 1
        report.sample_time.CopyFrom(now_ts(self.clock))
        report.gpus.extend(self._sample_gpu(g) for g in self.gpus)
        self.last_report = report
        return report


@dataclass(frozen=True, slots=True)
class GpuEvent:
    gpu_uuid: str
    xid: int | None
    lost: bool
    verdict: health.Verdict
    time: timestamp_pb2.Timestamp


class XidWatcher:
    """XID and ECC events through nvmlEventSetCreate / nvmlDeviceRegisterEvents /
    nvmlEventSetWait on a thread of their own; each event goes to `on_event` at once."""

    def __init__(
        self, collector: Collector, on_event: Callable[[GpuEvent], None], wait_ms: int = 500
    ) -> None:
        self.collector = collector
        self.on_event = on_event
        self.wait_ms = wait_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        n = self.collector.nvml
        try:
            event_set = n.nvmlEventSetCreate()
        except pynvml.NVMLError as e:
            log.warning("NVML events unavailable; XIDs come with reports only", error=str(e))
            return
        wanted = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
        for g in self.collector.gpus:
            try:
                n.nvmlDeviceRegisterEvents(g.handle, wanted, event_set)
            except pynvml.NVMLError as e:
                log.warning("cannot register NVML events", uuid=g.uuid, error=str(e))
        try:
            while not self._stop.is_set():
                try:
                    data = n.nvmlEventSetWait(event_set, self.wait_ms)
                except pynvml.NVMLError_Timeout:
                    continue
                except pynvml.NVMLError as e:
                    log.warning("nvmlEventSetWait failed", error=str(e))
                    self._stop.wait(1.0)
                    continue
                gpu = self.collector.by_handle.get(handle_key(data.device))
                if gpu is None:
                    continue
                xid = int(data.eventData) if data.eventType == pynvml.nvmlEventTypeXidCriticalError else None
                if xid is not None:
                    verdict = self.collector.note_xid(gpu, xid)
                else:
                    verdict = self.collector._verdict(gpu, None)
                ts = now_ts(self.collector.clock)
                log.warning("GPU event", uuid=gpu.uuid, xid=xid, health=verdict.health)
                self.on_event(GpuEvent(gpu.uuid, xid, gpu.lost, verdict, ts))
        finally:
            with contextlib.suppress(pynvml.NVMLError):
                n.nvmlEventSetFree(event_set)


def _pcie_rate(s: common_pb2.GpuSample | None) -> float | None:
    if s is None or not s.HasField("pcie_tx_bytes_per_second"):
        return None
    return float(s.pcie_tx_bytes_per_second + s.pcie_rx_bytes_per_second)


def _gpm_read(sampler: GpmSampler) -> dict[str, float] | None:
    try:
        return sampler.read()
    except gpm.GpmLost as e:
        raise GpuLost() from e


def _put(sample: Any, values: dict[str, float] | None) -> None:
    for name, value in (values or {}).items():
        if name in sample.DESCRIPTOR.fields_by_name:  # MigSample has no PCIe fields
            setattr(sample, name, value)


def _field_value(v: Any) -> float:
    t = v.valueType
    if t == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return float(v.value.dVal)
    if t == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return float(v.value.uiVal)
    if t == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return float(v.value.ulVal)
    if t == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return float(v.value.sllVal)
    return float(v.value.ullVal)


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v
