"""The queue of requests waiting for capacity: its order, its backfill rule and the positions
it reports. Pure: the waiters, what each tenant holds and how to place a request in, the
grants to make out (docs/api.md, "Waiting for capacity").

Order: start-time fair queuing between tenants. A waiter's rank is the time it was queued plus
SHARE_S for every GPU its tenant holds (counting the grants made earlier in the same pass), so
a tenant holding fewer GPUs goes first among requests queued at about the same time, while
every request still moves to the front as later ones arrive behind it: nobody starves. Within a
tenant, first come first served (its held count is the same for each of its requests).

Backfill: a waiter that cannot be placed claims the free GPUs it is waiting on (SPREAD: up to
its gpu_count of them; SINGLE_NODE: those of the one node closest to holding it), and no waiter
behind it may take them. A small request passes a large one only on capacity the large one
does not claim, so it never delays the large one's start; the claimed GPUs stay claimed until
the large one is granted or ends. Immediate requests (max_wait 0) respect the claims too.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from control_plane.domain.lease_rules import CreateSpec
from control_plane.domain.placement import Pick

# Each GPU a tenant holds moves its waiting requests this much later in the order.
SHARE_S = 30.0
# Waiting requests in the whole federation (a replica's --max-queued); each tenant's own bound
# is its quota's max_queued.
MAX_QUEUED = 20_000
_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Waiter:
    lease_id: str
    tenant: str
    spec: CreateSpec
    queued_ns: int
    deadline_ns: int
    revision: int = 0  # the queue record's mod revision: the grant compares it unchanged
    # What it competes for: requests of one shape want the same GPUs (hashed once, here).
    shape: tuple[object, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        s = self.spec
        object.__setattr__(self, "shape", (s.filter, s.placement, s.pool, s.allow_mixed))


@dataclass(frozen=True, slots=True)
class Plan:
    grants: list[tuple[Waiter, list[Pick]]] = field(default_factory=list)
    # GPUs claimed by waiters that could not be placed: no one behind them may take these.
    claimed: frozenset[str] = frozenset()


def rank(w: Waiter, held: Mapping[str, int], share_s: float = SHARE_S) -> tuple[float, int, str]:
    return (w.queued_ns + held.get(w.tenant, 0) * share_s * _NS, w.queued_ns, w.lease_id)


def ordered(waiters: Iterable[Waiter], held: Mapping[str, int], share_s: float = SHARE_S) -> list[Waiter]:
    """The queue's order at this moment (the planner re-ranks as its grants change `held`)."""
    return sorted(waiters, key=lambda w: rank(w, held, share_s))


def positions(waiters: Iterable[Waiter], held: Mapping[str, int], share_s: float = SHARE_S) -> dict[str, int]:
    """Each waiter's 1-based place among the waiters of its shape, in the queue's order."""
    seen: dict[tuple[object, ...], int] = {}
    out = {}
    for w in ordered(waiters, held, share_s):
        n = seen[w.shape] = seen.get(w.shape, 0) + 1
        out[w.lease_id] = n
    return out


def plan(
    waiters: Iterable[Waiter],
    held: Mapping[str, int],
    now_ns: int,
    place: Callable[[Waiter, AbstractSet[str]], list[Pick] | None],
    claim: Callable[[Waiter, AbstractSet[str]], set[str]],
    share_s: float = SHARE_S,
    can_hold: Callable[[Waiter, int], bool] = lambda w, n: True,
    limit: int = 64,
) -> Plan:
    """The grants of one pass, head of the queue first: each waiter placed on GPUs that no
    grant of this pass took and no waiter ahead of it claims, else it claims what it waits on.
    Each waiter is looked at once a pass (a grant only takes GPUs and raises its tenant's
    rank, so one that failed cannot fit later in the same pass); a waiter of a shape for which
    a request no larger already failed is not placed again. Past its deadline a waiter is
    skipped (the expiry ends it). `can_hold(w, gpus)` is the tenant's quota with this pass's
    grants (`gpus` of them) counted; at most `limit` grants a pass."""
    held_now = dict(held)
    heap = [(rank(w, held_now, share_s), w) for w in waiters if w.deadline_ns > now_ns]
    heapq.heapify(heap)
    taken: set[str] = set()
    claimed: set[str] = set()
    granted_gpus: dict[str, int] = {}
    failed: dict[tuple[object, ...], int] = {}  # shape -> the smallest gpu_count that failed
    dry: set[tuple[object, ...]] = set()  # shapes with nothing left to claim
    grants: list[tuple[Waiter, list[Pick]]] = []
    while heap and len(grants) < limit:
        key, w = heapq.heappop(heap)
        now_key = rank(w, held_now, share_s)
        if now_key != key:  # its tenant was granted meanwhile: its place moved back
            heapq.heappush(heap, (now_key, w))
            continue
        shape, count = w.shape, w.spec.gpu_count
        hopeless = count >= failed.get(shape, count + 1)
        if hopeless and shape in dry:
            continue  # no room for it and nothing left to claim: a deep queue costs this much
        if not can_hold(w, granted_gpus.get(w.tenant, 0)):
            continue  # over its tenant's quota: it waits, claiming nothing it could not use
        avoid = taken | claimed
        picks = None if hopeless else place(w, avoid)
        if picks is None:
            failed[shape] = min(failed.get(shape, count), count)
            if shape not in dry:
                got = claim(w, avoid)
                if not got:  # nothing of this shape is left unclaimed: nor for those behind
                    dry.add(shape)
                claimed |= got
            continue
        grants.append((w, picks))
        uuids = {u for p in picks for u in p.gpu_uuids}
        taken |= uuids
        held_now[w.tenant] = held_now.get(w.tenant, 0) + len(uuids)
        granted_gpus[w.tenant] = granted_gpus.get(w.tenant, 0) + len(uuids)
    return Plan(grants, frozenset(claimed))
