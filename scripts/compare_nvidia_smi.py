"""The daemon's report of each GPU against `nvidia-smi -q -x`, field by field, on a GPU host.

    make compare-nvidia-smi        # on a fresh GPU host: sets up .venv, then runs this
    python scripts/compare_nvidia_smi.py [--out docs/nvidia-smi-comparison.md]

Reads every GPU through the collector (real NVML, as the daemon does) and through nvidia-smi's
XML, prints one Markdown table per GPU (field, nvidia-smi, daemon, agree?) and exits 1 if a
field disagrees beyond its tolerance. Moving values (utilization, temperature, power, clocks,
memory in use) are read a moment apart, so they get a tolerance; identities and counters none.
The daemon's report is its second reading, `--interval` seconds after the first, as on a host
(GPM's profiling fields average the time between two). nvidia-smi's XML has no GPM figures:
their rows check that they are there exactly where nvidia-smi names a Hopper or newer
architecture, that the ratios are ratios, and that the engine's active share agrees with
nvidia-smi's utilization within a tolerance.
`--xml FILE` compares against a saved `nvidia-smi -q -x` output instead of running it; `--fake
PROFILE` reads the fake NVML instead of the real one (the tests use both).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# nvidia-smi's <product_architecture> of GPUs with NVML GPM (nvmlGpmQueryDeviceSupport).
GPM_ARCHITECTURES = ("hopper", "blackwell", "rubin")
PROFILING = ("gr_engine_active", "tensor_active", "dram_active")


@dataclass(frozen=True)
class Row:
    field: str
    smi: str
    daemon: str
    ok: bool


def _text(gpu: ET.Element, *paths: str) -> str | None:
    """The first of `paths` nvidia-smi has (its element names moved between driver versions)."""
    for p in paths:
        el = gpu.find(p)
        if el is not None and el.text and el.text.strip() not in ("N/A", "[N/A]", "Not Supported"):
            return el.text.strip()
    return None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.match(r"^-?[0-9.]+", text)
    return float(m[0]) if m else None


def _yes(text: str | None) -> bool | None:
    return None if text is None else text.strip().lower() in ("yes", "enabled", "true")


def _close(a: float | None, b: float | None, abs_tol: float, rel_tol: float = 0.0) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= max(abs_tol, rel_tol * max(abs(a), abs(b)))


def compare_gpu(gpu: ET.Element, sample: Any, model: str, migs: int) -> list[Row]:
    """Rows for one GPU: nvidia-smi's element against the daemon's GpuSample."""

    def opt(name: str, scale: float = 1.0) -> float | None:
        return getattr(sample, name) * scale if sample.HasField(name) else None

    rows: list[Row] = []

    def num(field: str, smi: float | None, mine: float | None, abs_tol: float, rel_tol: float = 0.0) -> None:
        rows.append(Row(field, _fmt(smi), _fmt(mine), _close(smi, mine, abs_tol, rel_tol)))

    def same(field: str, smi: object, mine: object) -> None:
        rows.append(Row(field, _fmt(smi), _fmt(mine), smi == mine))

    same("uuid", _text(gpu, "uuid"), sample.uuid)
    same("product name", _text(gpu, "product_name"), model)
    total = _number(_text(gpu, "fb_memory_usage/total"))
    num("memory total (MiB)", total, opt("memory_total_bytes", 1 / MIB), 1)
    num(
        "memory reserved (MiB)",
        _number(_text(gpu, "fb_memory_usage/reserved")),
        opt("memory_reserved_bytes", 1 / MIB),
        1,
    )
    moving_mem = 0.05 * (total or 0)
    num(
        "memory used (MiB)",
        _number(_text(gpu, "fb_memory_usage/used")),
        opt("memory_used_bytes", 1 / MIB),
        moving_mem,
    )
    num(
        "memory free (MiB)",
        _number(_text(gpu, "fb_memory_usage/free")),
        opt("memory_free_bytes", 1 / MIB),
        moving_mem,
    )
    num(
        "utilization gpu (%)", _number(_text(gpu, "utilization/gpu_util")), opt("utilization_gpu_percent"), 20
    )
    num(
        "utilization memory (%)",
        _number(_text(gpu, "utilization/memory_util")),
        opt("utilization_memory_percent"),
        20,
    )
    num(
        "encoder (%)", _number(_text(gpu, "utilization/encoder_util")), opt("encoder_utilization_percent"), 20
    )
    num(
        "decoder (%)", _number(_text(gpu, "utilization/decoder_util")), opt("decoder_utilization_percent"), 20
    )
    num("temperature (C)", _number(_text(gpu, "temperature/gpu_temp")), opt("temperature_celsius"), 5)
    num(
        "memory temperature (C)",
        _number(_text(gpu, "temperature/memory_temp")),
        opt("memory_temperature_celsius"),
        5,
    )
    power = _number(_text(gpu, "gpu_power_readings/power_draw", "power_readings/power_draw"))
    num("power draw (W)", power, opt("power_watts"), 30, 0.2)
    num("SM clock (MHz)", _number(_text(gpu, "clocks/sm_clock")), opt("sm_clock_mhz"), 100, 0.25)
    num("memory clock (MHz)", _number(_text(gpu, "clocks/mem_clock")), opt("mem_clock_mhz"), 1, 0.01)
    num(
        "PCIe replays",
        _number(_text(gpu, "pci/replays_since_reset", "pci/replay_counter")),
        opt("pcie_replay_count"),
        0,
    )
    for field, where in (
        ("volatile", "ecc_volatile_uncorrected"),
        ("aggregate", "ecc_aggregate_uncorrected"),
    ):
        parts = [
            _number(_text(gpu, f"ecc_errors/{field}/{name}"))
            for name in (
                "dram_uncorrectable",
                "sram_uncorrectable",
                "double_bit/total",
                "total_uncorrectable",
            )
        ]
        known = [p for p in parts if p is not None]
        num(f"ECC uncorrectable, {field}", sum(known) if known else None, opt(where), 0)
    num(
        "remapped rows, correctable",
        _number(_text(gpu, "remapped_rows/remapped_row_corr")),
        opt("remapped_rows_correctable"),
        0,
    )
    num(
        "remapped rows, uncorrectable",
        _number(_text(gpu, "remapped_rows/remapped_row_unc")),
        opt("remapped_rows_uncorrectable"),
        0,
    )
    same(
        "row remap pending",
        _yes(_text(gpu, "remapped_rows/remapped_row_pending")),
        opt("remapped_rows_pending"),
    )
    same(
        "row remap failure",
        _yes(_text(gpu, "remapped_rows/remapped_row_failure")),
        opt("remapped_rows_failure"),
    )
    same("MIG mode", _yes(_text(gpu, "mig_mode/current_mig")) or False, bool(sample.mig_enabled))
    same("MIG devices", len(gpu.findall("mig_devices/mig_device")), migs)
    rows.extend(_licence_rows(gpu, sample))
    rows.extend(_profiling_rows(gpu, sample))
    return rows


def _licence_rows(gpu: ET.Element, sample: Any) -> list[Row]:
    """nvidia-smi shows a "vGPU Software Licensed Product" where NVML has vGPU licensing."""
    status = _text(gpu, "vgpu_software_licensed_product/license_status")
    smi = None if status is None else int(status.lower().startswith("licensed"))
    mine = sample.vgpu_license_status if sample.HasField("vgpu_license_status") else None
    return [Row("vGPU licence (1 licensed)", _fmt(smi), _fmt(mine), smi == mine)]


def _profiling_rows(gpu: ET.Element, sample: Any) -> list[Row]:
    arch = (_text(gpu, "product_architecture") or "").lower()
    expected = arch.startswith(GPM_ARCHITECTURES)
    present = [f for f in PROFILING if sample.HasField(f)]
    rows = [
        Row(
            "GPM profiling fields",
            f"{arch or 'unknown'}: {'expected' if expected else 'none'}",
            ", ".join(present) or "absent",
            bool(present) == expected and (not present or len(present) == len(PROFILING)),
        )
    ]
    if not present:
        return rows
    ratios = [float(getattr(sample, f)) for f in present]
    rows.append(
        Row(
            "GPM ratios in [0, 1]",
            "",
            ", ".join(f"{r:.3f}" for r in ratios),
            all(0 <= r <= 1 for r in ratios),
        )
    )
    util = _number(_text(gpu, "utilization/gpu_util"))
    if util is not None:
        active = 100 * float(sample.gr_engine_active)
        # Both say how much of the time work ran, sampled over slightly different windows.
        rows.append(
            Row(
                "engine active vs utilization (%)",
                _fmt(util),
                _fmt(round(active, 1)),
                _close(util, active, 25),
            )
        )
    return rows


def _fmt(v: object) -> str:
    if v is None:
        return "absent"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def compare(xml: str, report: Any, models: dict[str, str], migs: dict[str, int]) -> dict[str, list[Row]]:
    """Per GPU uuid, the rows; a GPU nvidia-smi lists that the daemon does not (or the other way)
    is one row saying so."""
    root = ET.fromstring(xml)
    samples = {s.uuid: s for s in report.gpus}
    out: dict[str, list[Row]] = {}
    for gpu in root.findall("gpu"):
        uuid = _text(gpu, "uuid") or "?"
        s = samples.pop(uuid, None)
        if s is None:
            out[uuid] = [Row("present", "yes", "absent", False)]
            continue
        out[uuid] = compare_gpu(gpu, s, models.get(uuid, ""), migs.get(uuid, 0))
    for uuid in samples:
        out[uuid] = [Row("present", "absent", "yes", False)]
    return out


def markdown(result: dict[str, list[Row]], driver: str) -> str:
    lines = [f"Driver {driver}.", ""]
    for uuid, rows in result.items():
        lines += [f"### {uuid}", "", "| field | nvidia-smi | daemon | agree |", "|---|---|---|---|"]
        lines += [f"| {r.field} | {r.smi} | {r.daemon} | {'yes' if r.ok else '**no**'} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare_nvidia_smi", description=__doc__.split("\n\n")[0])
    p.add_argument("--xml", help="a saved `nvidia-smi -q -x` output (default: run nvidia-smi)")
    p.add_argument("--fake", help="read this fake NVML profile instead of the real NVML")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two readings (1)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pynvml

    from node_daemon.collector import Collector
    from node_daemon.fake_nvml import FakeNvml

    if not a.xml and not shutil.which("nvidia-smi"):
        print(
            "nvidia-smi not found: run this on a GPU host with NVIDIA's driver, or pass --xml",
            file=sys.stderr,
        )
        return 2
    collector = Collector(FakeNvml(a.fake) if a.fake else pynvml)
    try:
        collector.start()
    except pynvml.NVMLError as e:
        print(
            f"NVML is not usable here ({e}); on a machine without a GPU use --fake PROFILE", file=sys.stderr
        )
        return 2
    collector.sample()  # GPM averages between two readings: the report is the second
    time.sleep(a.interval)
    xml = (
        Path(a.xml).read_text()
        if a.xml
        else subprocess.run(["nvidia-smi", "-q", "-x"], capture_output=True, text=True, check=True).stdout
    )
    report = collector.sample()
    collector.shutdown()
    models = {g.uuid: g.model for g in collector.gpus}
    migs = {g.uuid: len(g.migs) for g in collector.gpus}
    result = compare(xml, report, models, migs)
    text = markdown(result, collector.driver_version)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0 if all(r.ok for rows in result.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
