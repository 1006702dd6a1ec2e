"""The one clock of the control plane and the daemon, injected wherever time matters.

`Clock` has the two readings the code needs: wall time (timestamps other processes read: lease
expiry, usage records, reports) and monotonic time (intervals within one process: liveness,
timeouts). `SystemClock` reads the OS; `FakeClock` is moved by tests, as trio's MockClock is.
Wall time is nanoseconds, so a Timestamp is built without float rounding.
"""

from __future__ import annotations

import time
from typing import Protocol

from google.protobuf import timestamp_pb2

NS = 1_000_000_000


class Clock(Protocol):
    def time_ns(self) -> int:
        """Wall time, nanoseconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals only)."""
        ...


class SystemClock:
    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to (`advance`); wall and monotonic move together."""

    def __init__(self, start_ns: int = 1_700_000_000 * NS) -> None:
        self._wall_ns = start_ns
        self._mono = 1000.0

    def time_ns(self) -> int:
        return self._wall_ns

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall_ns += int(seconds * NS)
        self._mono += seconds


SYSTEM = SystemClock()


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    # Set directly: Timestamp's FromNanoseconds and GetCurrentTime are Python code in protobuf.
    seconds, nanos = divmod(ns, NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def now_ts(clock: Clock) -> timestamp_pb2.Timestamp:
    return timestamp(clock.time_ns())


def ts_ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * NS + ts.nanos
