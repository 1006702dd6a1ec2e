"""Reads every GPU of the host through NVML: `pynvml` on a GPU host, FakeNvml elsewhere.

The NVML module is injected. Every optional counter copes with NotSupported (reported absent,
never zero); a GPU that answers GpuIsLost or Unknown is reported lost and UNHEALTHY while the
others keep being read. XID events come from their own thread (XidWatcher) and reach the
control plane at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml
from google.protobuf import timestamp_pb2

from gpufed.clock import SYSTEM, Clock, now_ts
from gpufed.logs import get_logger
from gpufed.v1 import common_pb2
from node_daemon import health

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
    lost: bool = False
    xids: set[int] = field(default_factory=set)
    last_verdict: health.Verdict = field(default_factory=lambda: health.Verdict(health.HEALTHY))


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
            self.gpus.append(info)
            self.by_handle[handle_key(h)] = info
            self.by_uuid[info.uuid] = info

    def shutdown(self) -> None:
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
        return out

    # -- sampling --------------------------------------------------------------------------------

    def note_xid(self, gpu: GpuInfo, xid: int) -> health.Verdict:
        with self._lock:
            gpu.xids.add(xid)
        return self._verdict(gpu, None)

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
        )
        if s is None:
            prev = gpu.last_verdict
            # An event alone: keep what the last sample saw and add the event's verdict.
            ev = health.evaluate(reading)
            merged = dict(prev.reasons)
            merged.update(ev.reasons)
            verdict = health.Verdict(max(prev.health, ev.health), tuple(merged.items()))
        else:
            verdict = health.evaluate(reading)
        gpu.last_verdict = verdict
        return verdict

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
            mem = n.nvmlDeviceGetMemoryInfo(h)
            s.memory_total_bytes, s.memory_used_bytes, s.memory_free_bytes = mem.total, mem.used, mem.free
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
        if g.nvlinks:
            # NVLink counters move slowly and cost 4 NVML calls per link: read them every
            # NVLINK_EVERY reports and repeat the last reading in between.
            if g.nvlink_cache is None or self.sequence % NVLINK_EVERY == 0:
                g.nvlink_cache = self._read_nvlink(n, h, g)
            s.nvlink_active_links, s.nvlink_errors = g.nvlink_cache

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


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v
