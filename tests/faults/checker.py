"""The fault suite's checker: a pure function over what the clients recorded, what an observer
saw in etcd, and the usage records etcd holds afterwards. It proves the four promises:

1. no GPU in two active leases (server truth: usage intervals; client truth: the intervals
   each client knew it held);
2. no acknowledged lease ended before its expiry or release (a renewal answered "ended" before
   the expiry it had been given; a lease key gone before it; a usage end before both);
3. every abandoned lease (its client SIGKILLed) freed within ttl + 2 s. etcd gives every lease a
   fresh ttl when a new etcd leader takes over (its lessor's Promote) and cannot expire anything
   while it has no quorum, so the clock starts at the kill or at the end of an etcd outage that
   began before the lease ran out, whichever is later;
4. exactly one usage record per (ended lease, provider), written once (etcd version 1), covering
   the lease's GPUs, its GPU-seconds within 1 s of the truth: start in [first CreateLease sent,
   its answer], end in [the first ReleaseLease sent (or the last expiry acknowledged, if
   earlier), its answer] for a release, [last expiry acknowledged, last renewal answered + ttl]
   for an expiry (+ ttl after the kill, if the client died: a renewal may have been on its way).

All times are wall-clock seconds of the one machine the suite runs on (clients, replicas and
etcd share its clock).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# Below this two intervals on one GPU count as touching, not overlapping: a release's end and
# the next grant's start are read from the clock by two processes.
TOUCH_S = 0.01
FREED_SLACK_S = 2.0
GPU_SECONDS_SLACK_S = 1.0


@dataclass(frozen=True)
class Usage:
    """One usage record as etcd holds it."""

    lease: str  # lease id
    provider: str
    gpus: tuple[str, ...]  # GPU uuids
    start: float
    end: float
    gpu_seconds: float
    end_reason: str
    version: int  # etcd's modification count of the key: 1 = written once


@dataclass
class LeaseStory:
    """What the clients know of one lease, folded from their records."""

    lease: str
    worker: str
    gpus: tuple[str, ...] = ()
    ttl: float = 0.0
    create_sent: float = 0.0  # first CreateLease of its request id
    create_acked: float = 0.0
    last_expire: float = 0.0  # newest expire_time acknowledged (grant or renewal)
    last_renew_answered: float = 0.0  # newest renewal answered, whatever the answer
    release_sent: float | None = None
    release_acked: float | None = None
    ended_early_at: float | None = None  # a renewal answered "ended" before last_expire


@dataclass
class Report:
    operations: int = 0
    granted: int = 0
    released: int = 0
    abandoned: int = 0
    usage_records: int = 0
    violations: list[str] = field(default_factory=list)
    freed_after_kill_s: list[float] = field(default_factory=list)
    # Seconds from the kill (or the end of the etcd outage that restarted its ttl) to freed.
    freed_after_base_s: list[float] = field(default_factory=list)
    gpu_seconds_uncertainty_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def stories(records: list[dict[str, Any]]) -> dict[str, LeaseStory]:
    """Fold the clients' records (one dict per answered call, see tests/faults/worker.py)."""
    out: dict[str, LeaseStory] = {}
    first_sent: dict[str, float] = {}
    for r in sorted(records, key=lambda r: float(r["t0"])):
        op = r["op"]
        if op == "create":
            first_sent.setdefault(r["req"], float(r["t0"]))
            if not r["ok"]:
                continue
            s = out.setdefault(r["lease"], LeaseStory(r["lease"], r["w"]))
            s.gpus = tuple(r["gpus"])
            s.ttl = float(r["ttl"])
            s.create_sent = first_sent[r["req"]]
            s.create_acked = s.create_acked or float(r["t1"])
            s.last_expire = max(s.last_expire, float(r["expire"]))
            continue
        known = out.get(r["lease"])
        if known is None:
            continue
        s = known
        if op == "renew":
            s.last_renew_answered = max(s.last_renew_answered, float(r["t1"]))
            if r["ok"]:
                s.last_expire = max(s.last_expire, float(r["expire"]))
            elif r["code"] in ("NOT_FOUND", "FAILED_PRECONDITION"):
                before_release = s.release_sent is None or float(r["t1"]) < s.release_sent
                if float(r["t1"]) < s.last_expire and before_release and s.ended_early_at is None:
                    s.ended_early_at = float(r["t1"])
        elif op == "release":
            if s.release_sent is None:
                s.release_sent = float(r["t0"])
            if r["ok"]:
                s.release_acked = float(r["t1"])
    return out


def _freed_deadline(kill: float, ttl: float, outages: list[tuple[float, float]]) -> float:
    base = kill
    for start, end in sorted(outages):
        if start < base + ttl:  # the outage began before the lease would have run out
            base = max(base, end)
    return base + ttl + FREED_SLACK_S


def check(
    records: list[dict[str, Any]],
    usage: list[Usage],
    gone: dict[str, float],
    kills: dict[str, float],
    outages: list[tuple[float, float]],
    leftovers: list[str],
) -> Report:
    """records: the clients'; usage: every usage record in etcd after the run settled; gone: the
    first time the observer saw each lease's key missing (after it had seen it); kills: worker
    -> time it was SIGKILLed; outages: (start, end) of the etcd faults, end when it took writes
    again; leftovers: lease or journal keys still in etcd after the run settled."""
    report = Report(operations=len(records), usage_records=len(usage))
    by_lease = stories(records)
    report.granted = len(by_lease)
    v = report.violations
    v.extend(f"left in etcd after the run settled: {k}" for k in leftovers)
    for r in records:
        if not r["ok"] and r["code"] in ("INTERNAL", "UNKNOWN"):
            v.append(f"{r['op']} answered {r['code']} at {float(r['t1']):.3f}: a bug, not a fault")

    # 1. Exclusivity, from the usage records (server truth) ...
    per_gpu: dict[str, list[Usage]] = defaultdict(list)
    for u in usage:
        for g in u.gpus:
            per_gpu[g].append(u)
    for g, us in per_gpu.items():
        us.sort(key=lambda u: u.start)
        for a, b in itertools.pairwise(us):
            if b.start < a.end - TOUCH_S:
                v.append(
                    f"GPU {g} in two leases: {a.lease} [{a.start:.3f}, {a.end:.3f}) "
                    f"and {b.lease} from {b.start:.3f}"
                )
    # ... and from what the clients knew they held: from the grant's answer to the first of
    # their release and their last acknowledged expiry.
    held: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for s in by_lease.values():
        until = min(s.last_expire, s.release_sent if s.release_sent is not None else s.last_expire)
        for g in s.gpus:
            held[g].append((s.create_acked, until, s.lease))
    for g, spans in held.items():
        spans.sort()
        for (_a0, a1, la), (b0, _, lb) in itertools.pairwise(spans):
            if b0 < a1 - TOUCH_S:
                v.append(f"GPU {g} acknowledged to two holders: {la} until {a1:.3f}, {lb} from {b0:.3f}")

    # 2. No acknowledged lease ended early.
    records_of: dict[str, list[Usage]] = defaultdict(list)
    for u in usage:
        records_of[u.lease].append(u)
    for s in by_lease.values():
        if s.ended_early_at is not None:
            v.append(
                f"{s.lease}: a renewal answered 'ended' at {s.ended_early_at:.3f}, "
                f"before its expiry {s.last_expire:.3f}"
            )
        due = min(s.last_expire, s.release_sent if s.release_sent is not None else s.last_expire)
        if s.lease in gone and gone[s.lease] < due - TOUCH_S:
            v.append(
                f"{s.lease}: its key was gone at {gone[s.lease]:.3f}, before its expiry or release {due:.3f}"
            )
        for u in records_of.get(s.lease, []):
            if u.end < due - TOUCH_S:
                v.append(f"{s.lease}: billed to {u.end:.3f}, before its expiry or release {due:.3f}")

    # 3. Abandoned leases come back by themselves.
    for s in by_lease.values():
        if s.worker not in kills or (s.release_acked is not None and s.release_acked < kills[s.worker]):
            continue
        report.abandoned += 1
        kill = kills[s.worker]
        deadline = _freed_deadline(kill, s.ttl, outages)
        if s.lease not in gone:
            v.append(f"{s.lease}: abandoned at {kill:.3f}, never seen freed")
        elif gone[s.lease] > deadline:
            v.append(
                f"{s.lease}: abandoned at {kill:.3f}, freed at {gone[s.lease]:.3f}, after {deadline:.3f}"
            )
        else:
            report.freed_after_kill_s.append(gone[s.lease] - kill)
            report.freed_after_base_s.append(gone[s.lease] - (deadline - FREED_SLACK_S - s.ttl))

    # 4. Usage exactly once, and right.
    for lease, us in records_of.items():
        for u in us:
            if u.version != 1:
                v.append(f"{lease}/{u.provider}: usage record written {u.version} times")
            if abs(u.gpu_seconds - len(u.gpus) * (u.end - u.start)) > 0.01 * max(1, len(u.gpus)):
                v.append(f"{lease}/{u.provider}: gpu_seconds {u.gpu_seconds:.3f} is not GPUs x (end - start)")
    for s in by_lease.values():
        us = records_of.get(s.lease, [])
        if not us:
            v.append(f"{s.lease}: ended without a usage record")
            continue
        billed = sorted(g for u in us for g in u.gpus)
        if billed != sorted(s.gpus):
            v.append(f"{s.lease}: usage records cover GPUs {billed}, the lease held {sorted(s.gpus)}")
        # The end: a release, or the expiry the last renewal set (the definition billed from).
        end_lo = min(s.last_expire, s.release_sent if s.release_sent is not None else s.last_expire)
        if s.release_acked is not None:
            report.released += 1
            end_hi = s.release_acked
        else:
            end_hi = max(s.last_expire, s.last_renew_answered + s.ttl)
            if s.worker in kills:  # a renewal may have been on its way when the client died
                end_hi = max(end_hi, kills[s.worker] + s.ttl)
        lo, hi = end_lo - s.create_acked, end_hi - s.create_sent
        report.gpu_seconds_uncertainty_s.append(hi - lo)
        for u in us:
            took = u.end - u.start
            if not lo - GPU_SECONDS_SLACK_S <= took <= hi + GPU_SECONDS_SLACK_S:
                v.append(
                    f"{s.lease}/{u.provider}: billed {took:.3f} s, the truth is in [{lo:.3f}, {hi:.3f}] s"
                )
    return report
