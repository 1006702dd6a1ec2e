"""Keeping a replica on the CPUs it is given (`--cpus`, like `taskset -c`).

A replica is one event loop plus gRPC's threads, which hand every message to the loop through
the GIL. When those threads run on different cores each hand-over wakes another core and moves
the GIL's cache lines across; on one core it is a plain context switch. Measured on a 2-core
machine (BENCHMARKS.md): a pinned replica spent 10-26 % less CPU per lease cycle at one client,
less under load. So the way to use a many-core host is one replica per core, each pinned; by
default a replica is left free.
"""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> frozenset[int]:
    """'1', '0,2' or '4-7,9' (taskset's list format) as a set of CPU numbers; '' is none."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"CPU list {text!r}: {part!r} is not a CPU number or range like 2-5") from None
        if first < 0 or last < first:
            raise ValueError(f"CPU list {text!r}: {part!r} is not a range of CPU numbers")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def pin_process(cpus: frozenset[int]) -> frozenset[int]:
    """Restrict every thread of this process, and the threads it starts later (they inherit it
    from their creator), to `cpus`. Returns the CPUs now allowed. ValueError, and nothing
    changed, when any of them is not available to this process."""
    allowed = frozenset(os.sched_getaffinity(0))
    missing = sorted(cpus - allowed)
    if missing:
        raise ValueError(f"CPUs {missing} are not available to this process (available: {sorted(allowed)})")
    for tid in (int(t) for t in os.listdir("/proc/self/task")):  # sched_setaffinity is Linux's
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    return frozenset(os.sched_getaffinity(0))
