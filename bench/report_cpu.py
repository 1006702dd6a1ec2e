"""CPU per node report: sampling every GPU of an 8-GPU host through the fake NVML and encoding
the report, as the daemon does every interval. Target: under 2 ms of CPU per report.

The clock is injected and moved by the daemon's default interval (2 s) between reports, so
GPM takes and averages its samples on every report as on a host. The H100 profile is measured
twice in the same run, with and without its GPM samplers: the difference is what the
profiling fields cost. The fake NVML is Python where the real one is C, so these figures
bound the daemon's own cost from above."""

from __future__ import annotations

import time
from typing import Any

from gpufed.clock import FakeClock
from gpufed.v1 import node_pb2
from node_daemon.collector import Collector
from node_daemon.fake_nvml import FakeNvml

INTERVAL_S = 2.0


def _per_report(profile: str, reports: int, gpm: bool = True) -> float:
    clock = FakeClock()
    c = Collector(FakeNvml(profile, clock=clock), clock)
    c.start()
    if not gpm:
        for g in c.gpus:
            g.gpm = None
            g.mig_gpm.clear()
    for _ in range(50):
        clock.advance(INTERVAL_S)
        c.sample()
    t0 = time.process_time()
    for _ in range(reports):
        clock.advance(INTERVAL_S)
        node_pb2.NodeMessage(report=c.sample()).SerializeToString()
    per = (time.process_time() - t0) / reports
    c.shutdown()
    return per


def run(reports: int = 3000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # h100-mig: 8 GPUs, two split in seven instances, each with its own GPM samples (22 pairs).
    for profile in ("h100-sxm-8", "h100-mig", "a100-80g-8", "l40s-4"):
        per = _per_report(profile, reports)
        out[profile] = {
            "cpu_ms_per_report": round(per * 1000, 3),
            "core_share_at_2s_interval_pct": round(per / INTERVAL_S * 100, 4),
        }
    without = _per_report("h100-sxm-8", reports, gpm=False)
    out["h100-sxm-8"]["cpu_ms_per_report_without_gpm"] = round(without * 1000, 3)
    return out
