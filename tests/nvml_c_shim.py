"""NVML's C entry points, answered by a FakeNvml: installed under the real `pynvml` module so the
collector runs through pynvml's own wrappers (argument marshalling, byref outputs, return-code
checks, NVMLError mapping) exactly as on a GPU host."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from typing import Any

import pynvml

from node_daemon.fake_nvml import FakeNvml, handle_key

SUCCESS: int = pynvml.NVML_SUCCESS


def _val(x: Any) -> Any:
    return x.value if hasattr(x, "value") else x


def _out(ref: Any) -> Any:
    """The object behind a byref() argument."""
    return ref._obj


def _set_pointer(ref: Any, address: int) -> None:
    obj = _out(ref)
    ctypes.cast(ctypes.pointer(obj), ctypes.POINTER(ctypes.c_void_p))[0] = address


class CLibrary:
    """Stands in for `CDLL("libnvidia-ml.so.1")`: attributes are C functions returning nvmlReturn_t."""

    def __init__(self, fake: FakeNvml) -> None:
        self.fake = fake
        self.calls: dict[str, int] = {}
        self._event_sets: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Callable[..., int]:
        impl = getattr(type(self), "c_" + name, None)
        if impl is None:
            raise AttributeError(name)  # pynvml turns this into NVMLError_FunctionNotFound

        def call(*args: Any) -> int:
            self.calls[name] = self.calls.get(name, 0) + 1
            try:
                impl(self, *args)
            except pynvml.NVMLError as e:
                return int(e.value)
            return SUCCESS

        return call

    # Each c_* method mirrors the C signature pynvml calls with.
    def c_nvmlInitWithFlags(self, flags: Any) -> None:
        self.fake.nvmlInit()

    def c_nvmlShutdown(self) -> None:
        self.fake.nvmlShutdown()

    def c_nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> None:
        buf.value = self.fake.nvmlSystemGetDriverVersion().encode()

    def c_nvmlSystemGetCudaDriverVersion(self, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlSystemGetCudaDriverVersion()

    def c_nvmlDeviceGetCount_v2(self, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetCount()

    def c_nvmlDeviceGetHandleByIndex_v2(self, index: Any, ref: Any) -> None:
        h = self.fake.nvmlDeviceGetHandleByIndex(_val(index))
        _set_pointer(ref, handle_key(h))

    def c_nvmlDeviceGetUUID(self, h: Any, buf: Any, size: Any) -> None:
        buf.value = self.fake.nvmlDeviceGetUUID(h).encode()

    def c_nvmlDeviceGetName(self, h: Any, buf: Any, size: Any) -> None:
        buf.value = self.fake.nvmlDeviceGetName(h).encode()

    def c_nvmlDeviceGetIndex(self, h: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetIndex(h)

    def c_nvmlDeviceGetMemoryInfo(self, h: Any, ref: Any) -> None:
        m = self.fake.nvmlDeviceGetMemoryInfo(h)
        o = _out(ref)
        o.total, o.free, o.used = m.total, m.free, m.used

    def c_nvmlDeviceGetUtilizationRates(self, h: Any, ref: Any) -> None:
        u = self.fake.nvmlDeviceGetUtilizationRates(h)
        o = _out(ref)
        o.gpu, o.memory = u.gpu, u.memory

    def c_nvmlDeviceGetTemperature(self, h: Any, sensor: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetTemperature(h, _val(sensor))

    def c_nvmlDeviceGetPowerUsage(self, h: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetPowerUsage(h)

    def c_nvmlDeviceGetClockInfo(self, h: Any, kind: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetClockInfo(h, _val(kind))

    def c_nvmlDeviceGetPcieReplayCounter(self, h: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetPcieReplayCounter(h)

    def c_nvmlDeviceGetTotalEccErrors(self, h: Any, error_type: Any, counter_type: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetTotalEccErrors(h, _val(error_type), _val(counter_type))

    def c_nvmlDeviceGetRetiredPages(self, h: Any, cause: Any, count_ref: Any, pages: Any) -> None:
        found = self.fake.nvmlDeviceGetRetiredPages(h, _val(cause))
        count = _out(count_ref)
        if pages is None:
            count.value = len(found)
            if found:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
            return
        for i, address in enumerate(found[: count.value]):
            pages[i] = address
        count.value = len(found)

    def c_nvmlDeviceGetRetiredPagesPendingStatus(self, h: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetRetiredPagesPendingStatus(h)

    def c_nvmlDeviceGetRemappedRows(self, h: Any, corr: Any, unc: Any, pending: Any, failure: Any) -> None:
        values = self.fake.nvmlDeviceGetRemappedRows(h)
        for ref, v in zip((corr, unc, pending, failure), values, strict=True):
            _out(ref).value = v

    def c_nvmlDeviceGetCurrentClocksEventReasons(self, h: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetCurrentClocksEventReasons(h)

    def c_nvmlDeviceGetMigMode(self, h: Any, current: Any, pending: Any) -> None:
        cur, pend = self.fake.nvmlDeviceGetMigMode(h)
        _out(current).value, _out(pending).value = cur, pend

    def c_nvmlDeviceGetNvLinkState(self, h: Any, link: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetNvLinkState(h, _val(link))

    def c_nvmlDeviceGetNvLinkErrorCounter(self, h: Any, link: Any, counter: Any, ref: Any) -> None:
        _out(ref).value = self.fake.nvmlDeviceGetNvLinkErrorCounter(h, _val(link), _val(counter))

    def c_nvmlDeviceGetGridLicensableFeatures_v4(self, h: Any, ref: Any) -> None:
        o, found = _out(ref), self.fake.nvmlDeviceGetGridLicensableFeatures_v4(h)
        ctypes.memmove(ctypes.addressof(o), ctypes.addressof(found), ctypes.sizeof(o))

    def c_nvmlGpmQueryDeviceSupport(self, h: Any, ref: Any) -> None:
        o = _out(ref)
        if o.version != pynvml.NVML_GPM_SUPPORT_VERSION:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        o.isSupportedDevice = self.fake.nvmlGpmQueryDeviceSupport(h).isSupportedDevice

    def c_nvmlGpmSampleAlloc(self, ref: Any) -> None:
        _set_pointer(ref, handle_key(self.fake.nvmlGpmSampleAlloc()))

    def c_nvmlGpmSampleFree(self, sample: Any) -> None:
        self.fake.nvmlGpmSampleFree(sample)

    def c_nvmlGpmSampleGet(self, h: Any, sample: Any) -> None:
        self.fake.nvmlGpmSampleGet(h, sample)

    def c_nvmlGpmMigSampleGet(self, h: Any, gpu_instance_id: Any, sample: Any) -> None:
        self.fake.nvmlGpmMigSampleGet(h, _val(gpu_instance_id), sample)

    def c_nvmlGpmMetricsGet(self, ref: Any) -> None:
        self.fake.nvmlGpmMetricsGet(_out(ref))

    def c_nvmlEventSetCreate(self, ref: Any) -> None:
        event_set = self.fake.nvmlEventSetCreate()
        key = 0x5E70 + len(self._event_sets)
        self._event_sets[key] = event_set
        _set_pointer(ref, key)

    def _event_set(self, es: Any) -> Any:
        return self._event_sets[int(ctypes.cast(es, ctypes.c_void_p).value or 0)]

    def c_nvmlDeviceRegisterEvents(self, h: Any, types: Any, es: Any) -> None:
        self.fake.nvmlDeviceRegisterEvents(h, _val(types), self._event_set(es))

    def c_nvmlEventSetWait_v2(self, es: Any, ref: Any, timeout_ms: Any) -> None:
        data = self.fake.nvmlEventSetWait_v2(self._event_set(es), _val(timeout_ms))
        o = _out(ref)
        o.device = data.device
        o.eventType, o.eventData = data.eventType, data.eventData
        o.gpuInstanceId, o.computeInstanceId = data.gpuInstanceId, data.computeInstanceId

    def c_nvmlEventSetFree(self, es: Any) -> None:
        self.fake.nvmlEventSetFree(self._event_set(es))


@contextlib.contextmanager
def real_pynvml_over(fake: FakeNvml) -> Iterator[CLibrary]:
    """Point the real pynvml module at a fake C library for the duration of the block."""
    lib = CLibrary(fake)
    saved = pynvml.nvmlLib
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml.nvmlLib = lib
    try:
        yield lib
    finally:
        pynvml.nvmlLib = saved
        pynvml._nvmlGetFunctionPointer_cache.clear()
