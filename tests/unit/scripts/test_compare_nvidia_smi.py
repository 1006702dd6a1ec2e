"""scripts/compare_nvidia_smi.py reads nvidia-smi's XML as its drivers write it and finds a
disagreeing field (run here against the fake NVML; on a GPU host against the real one)."""

from __future__ import annotations

from typing import Any

from gpufed.clock import FakeClock
from node_daemon.collector import Collector
from node_daemon.fake_nvml import FakeNvml
from scripts.compare_nvidia_smi import compare, markdown

MIB = 1024 * 1024
ARCHITECTURES = (("H100", "Hopper"), ("H200", "Hopper"), ("A100", "Ampere"), ("L40S", "Ada Lovelace"))


def smi_xml(report: Any, models: dict[str, str], migs: dict[str, int]) -> str:
    """What `nvidia-smi -q -x` would print for these readings (its units and element names)."""
    gpus = []
    for s in report.gpus:
        mig = "".join("<mig_device><index>0</index></mig_device>" for _ in range(migs[s.uuid]))
        util = (
            f"<gpu_util>{s.utilization_gpu_percent} %</gpu_util>"
            f"<memory_util>{s.utilization_memory_percent} %</memory_util>"
            if s.HasField("utilization_gpu_percent")
            else "<gpu_util>N/A</gpu_util><memory_util>N/A</memory_util>"
        )
        codec = (
            f"<encoder_util>{s.encoder_utilization_percent} %</encoder_util>"
            f"<decoder_util>{s.decoder_utilization_percent} %</decoder_util>"
            if s.HasField("encoder_utilization_percent")
            else "<encoder_util>N/A</encoder_util><decoder_util>N/A</decoder_util>"
        )
        mem_temp = f"{s.memory_temperature_celsius} C" if s.HasField("memory_temperature_celsius") else "N/A"
        arch = next(a for key, a in ARCHITECTURES if key in models[s.uuid])
        licence = (
            "<vgpu_software_licensed_product><licensed_product_name>NVIDIA Virtual Compute Server"
            "</licensed_product_name><license_status>"
            + ("Licensed (Expiry: N/A)" if s.vgpu_license_status else "Unlicensed (Unrestricted)")
            + "</license_status></vgpu_software_licensed_product>"
            if s.HasField("vgpu_license_status")
            else ""
        )
        gpus.append(
            f"""<gpu id="0000:{s.index:02x}:00.0">
  <product_name>{models[s.uuid]}</product_name><uuid>{s.uuid}</uuid>
  <product_architecture>{arch}</product_architecture>{licence}
  <mig_mode><current_mig>{"Enabled" if s.mig_enabled else "Disabled"}</current_mig></mig_mode>
  <mig_devices>{mig}</mig_devices>
  <fb_memory_usage><total>{s.memory_total_bytes // MIB} MiB</total>
    <reserved>{s.memory_reserved_bytes // MIB} MiB</reserved>
    <used>{s.memory_used_bytes // MIB} MiB</used>
    <free>{s.memory_free_bytes // MIB} MiB</free></fb_memory_usage>
  <utilization>{util}{codec}</utilization>
  <ecc_errors><volatile><sram_uncorrectable>0</sram_uncorrectable>
    <dram_uncorrectable>{s.ecc_volatile_uncorrected}</dram_uncorrectable></volatile>
    <aggregate><sram_uncorrectable>0</sram_uncorrectable>
    <dram_uncorrectable>{s.ecc_aggregate_uncorrected}</dram_uncorrectable></aggregate></ecc_errors>
  <remapped_rows><remapped_row_corr>{s.remapped_rows_correctable}</remapped_row_corr>
    <remapped_row_unc>{s.remapped_rows_uncorrectable}</remapped_row_unc>
    <remapped_row_pending>{"Yes" if s.remapped_rows_pending else "No"}</remapped_row_pending>
    <remapped_row_failure>{"Yes" if s.remapped_rows_failure else "No"}</remapped_row_failure></remapped_rows>
  <temperature><gpu_temp>{s.temperature_celsius} C</gpu_temp>
    <memory_temp>{mem_temp}</memory_temp></temperature>
  <gpu_power_readings><power_draw>{s.power_watts:.2f} W</power_draw></gpu_power_readings>
  <clocks><sm_clock>{s.sm_clock_mhz} MHz</sm_clock><mem_clock>{s.mem_clock_mhz} MHz</mem_clock></clocks>
  <pci><replays_since_reset>{s.pcie_replay_count}</replays_since_reset></pci>
</gpu>"""
        )
    return "<nvidia_smi_log><driver_version>550.90.07</driver_version>" + "".join(gpus) + "</nvidia_smi_log>"


def readings(profile: str) -> tuple[Any, dict[str, str], dict[str, int]]:
    """The script's report: the second reading, a second after the first (GPM needs two)."""
    clock = FakeClock()
    c = Collector(FakeNvml(profile, clock=clock), clock)
    c.start()
    c.sample()
    clock.advance(1.0)
    report = c.sample()
    return report, {g.uuid: g.model for g in c.gpus}, {g.uuid: len(g.migs) for g in c.gpus}


def test_every_field_agrees_when_nvidia_smi_says_what_nvml_says() -> None:
    for profile in ("h100-sxm-8", "l40s-4", "a100-mig"):
        report, models, migs = readings(profile)
        result = compare(smi_xml(report, models, migs), report, models, migs)
        bad = [(u, r) for u, rows in result.items() for r in rows if not r.ok]
        assert not bad, bad
        assert len(result) == len(report.gpus)
        assert "| uuid |" in markdown(result, "550.90.07")


def test_a_disagreeing_counter_or_a_missing_gpu_is_found() -> None:
    report, models, migs = readings("h100-sxm-8")
    xml = smi_xml(report, models, migs)
    first = report.gpus[0]
    xml = xml.replace(
        f"<remapped_row_unc>{first.remapped_rows_uncorrectable}</remapped_row_unc>",
        "<remapped_row_unc>3</remapped_row_unc>",
        1,
    )
    report.gpus[7].uuid = "GPU-not-on-this-host"
    result = compare(xml, report, models, migs)
    bad = {(u, r.field) for u, rows in result.items() for r in rows if not r.ok}
    assert (first.uuid, "remapped rows, uncorrectable") in bad
    assert ("GPU-not-on-this-host", "present") in bad


def test_profiling_must_be_there_exactly_on_hopper_and_agree_with_utilization() -> None:
    report, models, migs = readings("h100-sxm-8")
    xml = smi_xml(report, models, migs)
    rows = compare(xml, report, models, migs)[report.gpus[0].uuid]
    assert {r.field for r in rows} >= {
        "GPM profiling fields",
        "GPM ratios in [0, 1]",
        "vGPU licence (1 licensed)",
    }
    report.gpus[0].ClearField("gr_engine_active")  # a Hopper GPU without its GPM figures
    report.gpus[1].gr_engine_active = 0.01  # nvidia-smi says ~60 % busy
    result = compare(xml, report, models, migs)
    bad = {(u, r.field) for u, rows in result.items() for r in rows if not r.ok}
    assert (report.gpus[0].uuid, "GPM profiling fields") in bad
    assert (report.gpus[1].uuid, "engine active vs utilization (%)") in bad
    a100, models, migs = readings("a100-80g-8")
    rows = compare(smi_xml(a100, models, migs), a100, models, migs)[a100.gpus[0].uuid]
    assert next(r for r in rows if r.field == "GPM profiling fields").ok  # Ampere: none, none given
