"""dcgm-exporter-compatible Prometheus metrics of this host's GPUs (`--metrics-listen`).

A provider's dashboards and alerts written for NVIDIA's dcgm-exporter work unchanged: the same
metric names, types, units and labels (gpu, UUID, device, modelName, hostname -- or the older
Hostname, --metrics-hostname-label --, DCGM_FI_DRIVER_VERSION; GPU_I_PROFILE and GPU_I_ID on MIG
instances), plus gpufed's own (provider, node, and lease on a leased GPU). Every field of
dcgm-exporter's default list is here where NVML gives it, the profiling ones (DCGM_FI_PROF_*)
from NVML's GPM (node_daemon/gpm.py); what NVML cannot give is absent, never zero.

The page is rendered from the collector's last report (no NVML call per scrape), by hand: the
text format is a few lines, and prometheus_client would add `_total` to every counter, which
dcgm-exporter's names do not have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpufed.logs import get_logger
from gpufed.v1 import common_pb2

log = get_logger(__name__)

MIB = 1024 * 1024
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = common_pb2.GpuSample


def _opt(name: str, scale: float = 1.0) -> Callable[[Sample, int], float | None]:
    """The sample's field (a flag as 0 or 1), scaled; None when NVML did not give it."""

    def read(s: Sample, last_xid: int) -> float | None:
        return float(getattr(s, name)) * scale if s.HasField(name) else None  # type: ignore[arg-type]

    return read


def _xid(s: Sample, last_xid: int) -> float | None:
    return float(last_xid)  # NVML's XID events are always there: 0 means none since start


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: str  # "gauge" or "counter", as dcgm-exporter's default-counters.csv says
    help: str
    read: Callable[[Sample, int], float | None]


# dcgm-exporter's default counters (etc/default-counters.csv), in its order. Its
# DCGM_FI_DRIVER_VERSION is a label on every series.
FIELDS: tuple[Field, ...] = (
    Field("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", _opt("sm_clock_mhz")),
    Field("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", _opt("mem_clock_mhz")),
    Field(
        "DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", _opt("memory_temperature_celsius")
    ),
    Field("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", _opt("temperature_celsius")),
    Field("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", _opt("power_watts")),
    Field(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        _opt("total_energy_millijoules"),
    ),
    Field(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "counter",
        "Total number of PCIe retries.",
        _opt("pcie_replay_count"),
    ),
    Field("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", _opt("utilization_gpu_percent")),
    Field(
        "DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", _opt("utilization_memory_percent")
    ),
    Field(
        "DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", _opt("encoder_utilization_percent")
    ),
    Field(
        "DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", _opt("decoder_utilization_percent")
    ),
    Field("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", _xid),
    Field(
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        _opt("memory_free_bytes", 1 / MIB),
    ),
    Field(
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        _opt("memory_used_bytes", 1 / MIB),
    ),
    Field(
        "DCGM_FI_DEV_FB_RESERVED",
        "gauge",
        "Framebuffer memory reserved (in MiB).",
        _opt("memory_reserved_bytes", 1 / MIB),
    ),
    Field(
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "counter",
        "Total number of NVLink bandwidth counters for all lanes (KiB sent and received).",
        _opt("nvlink_data_kib"),
    ),
    Field("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status", _opt("vgpu_license_status")),
    Field(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors.",
        _opt("remapped_rows_uncorrectable"),
    ),
    Field(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for correctable errors.",
        _opt("remapped_rows_correctable"),
    ),
    Field(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "gauge",
        "Whether remapping of rows has failed.",
        _opt("remapped_rows_failure"),
    ),
    Field(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "gauge",
        "Ratio of time the graphics engine is active.",
        _opt("gr_engine_active"),
    ),
    Field(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        _opt("tensor_active"),
    ),
    Field(
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        _opt("dram_active"),
    ),
    Field(
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data "
        "payloads - in bytes per second.",
        _opt("pcie_tx_bytes_per_second"),
    ),
    Field(
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and data "
        "payloads - in bytes per second.",
        _opt("pcie_rx_bytes_per_second"),
    ),
)
# Per MIG instance, as dcgm-exporter does: the instance's own framebuffer and profiling
# (the MigSample field, and its scale).
MIG_FIELDS: dict[str, tuple[str, float]] = {
    "DCGM_FI_DEV_FB_FREE": ("memory_free_bytes", 1 / MIB),
    "DCGM_FI_DEV_FB_USED": ("memory_used_bytes", 1 / MIB),
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": ("gr_engine_active", 1.0),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("tensor_active", 1.0),
    "DCGM_FI_PROF_DRAM_ACTIVE": ("dram_active", 1.0),
}


@dataclass(frozen=True, slots=True)
class Host:
    hostname: str
    driver_version: str
    provider: str
    node: str
    hostname_label: str = "hostname"


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU as the page shows it: its last sample, model, last XID and holders."""

    sample: Sample
    model: str
    last_xid: int
    lease: str  # of the whole GPU, "" when free
    mig_leases: dict[str, str]  # MIG uuid -> lease


def escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs if v != "")


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(host: Host, gpus: list[GpuView]) -> str:
    """The /metrics page: for each field with at least one value, HELP and TYPE, then one
    line per GPU (and per MIG instance for the framebuffer) that has it."""
    out: list[str] = []
    for f in FIELDS:
        lines = []
        for g in gpus:
            s = g.sample
            base = [
                ("gpu", str(s.index)),
                ("UUID", s.uuid),
                ("device", f"nvidia{s.index}"),
                ("modelName", g.model),
            ]
            tail = [
                (host.hostname_label, host.hostname),
                ("DCGM_FI_DRIVER_VERSION", host.driver_version),
                ("provider", host.provider),
                ("node", host.node),
            ]
            value = f.read(s, g.last_xid)
            if value is not None:
                lines.append(f"{f.name}{{{_labels([*base, *tail, ('lease', g.lease)])}}} {_number(value)}")
            if f.name not in MIG_FIELDS:
                continue
            for m in s.mig_devices:
                mv = _mig_value(MIG_FIELDS[f.name], m)
                if mv is None:
                    continue
                mig = [("GPU_I_PROFILE", m.mig_profile), ("GPU_I_ID", str(m.gpu_instance_id))]
                lease = g.mig_leases.get(m.uuid, "")
                lines.append(f"{f.name}{{{_labels([*base, *mig, *tail, ('lease', lease)])}}} {_number(mv)}")
        if lines:
            out.append(f"# HELP {f.name} {f.help}")
            out.append(f"# TYPE {f.name} {f.kind}")
            out.extend(lines)
    return "\n".join(out) + "\n"


def _mig_value(how: tuple[str, float], m: common_pb2.MigSample) -> float | None:
    field, scale = how
    return float(getattr(m, field)) * scale if m.HasField(field) else None  # type: ignore[arg-type]


class MetricsServer:
    """GET /metrics on its own thread; `page()` renders the current page."""

    def __init__(self, listen: str, page: Callable[[], str]) -> None:
        host, _, port = listen.rpartition(":")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = outer.page().encode()
                except Exception:  # a broken page must not kill the server thread
                    log.exception("rendering /metrics failed")
                    self.send_error(500, "rendering failed; see the daemon's log")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds would flood the daemon's log

        self.page = page
        self.httpd = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        host = self.httpd.server_address[0]
        log.info("dcgm-exporter-compatible metrics", listen=f"{host!s}:{self.port}")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
