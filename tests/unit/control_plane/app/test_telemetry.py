"""Telemetry rings: recent reports per node, bounded by count and by bytes."""

from __future__ import annotations

from control_plane.app.telemetry import TelemetryRings
from gpufed.v1 import common_pb2


def _report(seq: int, pad: int = 0) -> common_pb2.NodeReport:
    r = common_pb2.NodeReport(sequence=seq)
    r.gpus.add(uuid="GPU-" + "x" * pad)
    return r


def test_a_ring_keeps_the_newest_reports_up_to_its_count() -> None:
    rings = TelemetryRings(size=3, max_bytes=1 << 20)
    for i in range(5):
        rings.add("n", _report(i))
    assert [r.sequence for r in rings.recent("n", 10) or []] == [2, 3, 4]


def test_a_ring_drops_the_oldest_past_its_bytes_but_keeps_the_newest() -> None:
    rings = TelemetryRings(size=300, max_bytes=3000)
    for i in range(10):
        rings.add("n", _report(i, pad=900))
    kept = rings.recent("n", 300) or []
    assert [r.sequence for r in kept] == [7, 8, 9]
    assert rings.bytes["n"] == sum(r.ByteSize() for r in kept) <= 3000
    rings.add("n", _report(10, pad=5000))  # one report over the bound still is the latest
    assert [r.sequence for r in rings.recent("n", 300) or []] == [10]
    rings.drop("n")
    assert rings.recent("n", 1) is None and "n" not in rings.bytes
