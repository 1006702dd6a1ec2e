"""CPU per node report: sampling every GPU of an 8-GPU host through the fake NVML and encoding
the report, as the daemon does every interval. Target: under 2 ms of CPU per report."""

from __future__ import annotations

import time
from typing import Any

from gpufed.v1 import node_pb2
from node_daemon.collector import Collector
from node_daemon.fake_nvml import FakeNvml


def run(reports: int = 3000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for profile in ("h100-sxm-8", "a100-80g-8", "l40s-4"):
        c = Collector(FakeNvml(profile))
        c.start()
        for _ in range(50):
            c.sample()
        t0 = time.process_time()
        for _ in range(reports):
            node_pb2.NodeMessage(report=c.sample()).SerializeToString()
        per = (time.process_time() - t0) / reports
        out[profile] = {
            "cpu_ms_per_report": round(per * 1000, 3),
            "core_share_at_2s_interval_pct": round(per / 2.0 * 100, 4),
        }
    return out
