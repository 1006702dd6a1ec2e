"""Capacity totals kept with the index, so SummarizeCapacity over the whole federation reads a
few hundred tallies instead of walking every node: per pool ("" for the federation, else the
tenant whose private pool it is), GPUs by (model, country, health, MIG profile, memory), total
and free, over READY nodes. The index adds and subtracts each node's share on every change of
the node, its liveness or its allocations."""

from __future__ import annotations

from collections.abc import Iterable

from control_plane.domain import mig
from control_plane.domain.inventory import NodeEntry, gpu_counts

# (model, country, health, MIG profile, memory bytes)
Key = tuple[str, str, int, str, int]
Share = dict[Key, tuple[int, int]]  # key -> (total, free)


def node_share(entry: NodeEntry, held: dict[str, str]) -> Share:
    """One node's GPUs by key: how many, how many free (a MIG instance is free when neither it
    nor its whole GPU is held)."""
    country = entry.node.location.country_code
    if not held:  # every GPU free: from the tallies cached with the record
        return {(m, country, h, p, mem): (n, n) for (m, h, p, mem), n in gpu_counts(entry)}
    out: dict[Key, list[int]] = {}
    parents_held = mig.held_parents(entry.node.gpus, held) if held else ()
    for model, health, memory, gpu in entry.gpus:
        counts = out.setdefault((model, country, health, gpu.mig_profile, memory), [0, 0])
        counts[0] += 1
        if not held or mig.is_free(gpu, held, parents_held):
            counts[1] += 1
    return {k: (t, f) for k, (t, f) in out.items()}


def apply(tally: dict[Key, list[int]], share: Share, sign: int) -> None:
    for key, (total, free) in share.items():
        counts = tally.setdefault(key, [0, 0])
        counts[0] += sign * total
        counts[1] += sign * free
        if counts[0] == 0:
            del tally[key]


def merged(tallies: Iterable[dict[Key, list[int]]]) -> dict[Key, list[int]]:
    out: dict[Key, list[int]] = {}
    for t in tallies:
        for key, (total, free) in t.items():
            counts = out.setdefault(key, [0, 0])
            counts[0] += total
            counts[1] += free
    return out
