"""The one clock: wall time in nanoseconds for timestamps, monotonic time for intervals."""

from __future__ import annotations

from gpufed.clock import NS, FakeClock, SystemClock, now_ts, timestamp, ts_ns


def test_a_fake_clock_moves_only_when_told_and_both_readings_together() -> None:
    clock = FakeClock(start_ns=5 * NS)
    assert (clock.time_ns(), clock.monotonic()) == (5 * NS, 1000.0)
    clock.advance(1.5)
    assert (clock.time_ns(), clock.monotonic()) == (6 * NS + NS // 2, 1001.5)


def test_timestamps_are_exact_nanoseconds_both_ways() -> None:
    ts = timestamp(1_700_000_000 * NS + 123)
    assert (ts.seconds, ts.nanos) == (1_700_000_000, 123) and ts_ns(ts) == 1_700_000_000 * NS + 123
    assert ts_ns(now_ts(FakeClock(start_ns=42))) == 42


def test_the_system_clock_reads_the_os() -> None:
    import time

    before = time.time_ns()
    assert before <= SystemClock().time_ns() <= time.time_ns()
    assert SystemClock().monotonic() <= time.monotonic()
