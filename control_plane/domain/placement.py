"""Choosing GPUs for a lease from the candidates that match its filter.

SINGLE_NODE: one node that has enough matching free GPUs: cheapest first, then the tightest fit
(keeps large free blocks for large gangs). SPREAD: fewest nodes first (most free GPUs first),
cheaper first on ties. Among equally good nodes the choice is random, so concurrent grants on
several replicas rarely race for the same GPUs. GPUs the caller knows to be contended are skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from control_plane.domain.inventory import Candidate
from gpufed.v1 import lease_pb2

# One grant Txn compares every allocation key plus, per node, the node record, its alive key and
# its calendar, and etcd caps each branch at 128 operations; four go to the request and lease
# keys and the two ranges of the tenant's holds.
TXN_OP_LIMIT = 128
PER_NODE_COMPARES = 3
FIXED_COMPARES = 4
MAX_GANG = 64
# Equally cheap nodes to choose among at random (spreads concurrent grants apart).
MAX_TIES = 16
# Seeding a Random costs more than a placement: one per process.
_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class Pick:
    candidate: Candidate
    gpu_uuids: tuple[str, ...]


def max_nodes_for(gpu_count: int) -> int:
    return max(1, (TXN_OP_LIMIT - FIXED_COMPARES - gpu_count) // PER_NODE_COMPARES)


def _fits_txn(nodes: int, gpu_count: int, mig_units: int) -> bool:
    """Whether a grant of `gpu_count` GPUs on `nodes` nodes fits one Txn; a MIG instance or a
    MIG-enabled GPU costs one more compare (its parent's or its instances' allocations)."""
    return nodes * PER_NODE_COMPARES + mig_units <= max(
        PER_NODE_COMPARES, TXN_OP_LIMIT - FIXED_COMPARES - gpu_count
    )


def _mig_units(c: Candidate, uuids: Iterable[str]) -> int:
    wanted = set(uuids)
    return sum(1 for g in c.gpus if g.uuid in wanted and (g.parent_uuid or g.mig_enabled))


def place(
    cands: Iterable[Candidate],
    gpu_count: int,
    placement: int,
    avoid: AbstractSet[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[Pick] | None:
    """GPUs for the lease, or None if the candidates cannot hold it."""
    rng = rng or _RNG
    if placement != lease_pb2.PLACEMENT_SPREAD:
        return _place_single(cands, gpu_count, avoid, rng)
    usable: list[tuple[Candidate, list[str]]] = []
    for c in cands:
        free = [g.uuid for g in c.gpus if g.uuid not in avoid]  # candidates list GPUs in index order
        if free:
            usable.append((c, free))
    if not usable:
        return None
    rng.shuffle(usable)
    usable.sort(key=lambda cf: (-len(cf[1]), cf[0].node.price_per_gpu_hour))
    picks: list[Pick] = []
    need = gpu_count
    mig_units = 0
    for c, free in usable:
        take = free[:need]
        mig_units += _mig_units(c, take)
        if not _fits_txn(len(picks) + 1, gpu_count, mig_units):
            return None
        picks.append(Pick(c, tuple(take)))
        need -= len(take)
        if need == 0:
            return picks
    return None


def _place_single(
    cands: Iterable[Candidate], gpu_count: int, avoid: AbstractSet[str], rng: random.Random
) -> list[Pick] | None:
    """Candidates come cheapest first: stop once the cheapest price level has enough fits, so a
    grant looks at a handful of nodes, not the whole federation."""
    fits: list[tuple[Candidate, list[str]]] = []
    for c in cands:
        if fits and (c.node.price_per_gpu_hour > fits[0][0].node.price_per_gpu_hour or len(fits) >= MAX_TIES):
            break
        free = [g.uuid for g in c.gpus if g.uuid not in avoid]  # candidates list GPUs in index order
        if len(free) >= gpu_count:
            fits.append((c, free))
    if not fits:
        return None
    rng.shuffle(fits)
    fits.sort(key=lambda cf: (cf[0].node.price_per_gpu_hour, len(cf[1])))
    best_price, best_fit = fits[0][0].node.price_per_gpu_hour, len(fits[0][1])
    ties = [cf for cf in fits if cf[0].node.price_per_gpu_hour == best_price and len(cf[1]) == best_fit]
    c, free = ties[rng.randrange(len(ties))]
    # A random window of the free GPUs, so two grants on one node rarely want the same ones.
    start = rng.randrange(len(free) - gpu_count + 1)
    take = tuple(free[start : start + gpu_count])
    if not _fits_txn(1, gpu_count, _mig_units(c, take)):
        return None
    return [Pick(c, take)]
