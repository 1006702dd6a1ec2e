"""Offers and capacity from the inventory: which free GPUs match a filter, and how to order them.

An offer is the free, matching GPUs of one model on one schedulable node at the node's price.
Searches ordered by price walk the price-ordered node list and stop once the page is full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from control_plane.domain.filters import Filter, model_matches
from control_plane.index import Inventory
from gpufed.v1 import common_pb2, discovery_pb2

OfferOrder = discovery_pb2.OfferOrder


@dataclass(slots=True)
class Candidate:
    """Free GPUs of one model on one node that match a filter."""

    name: str
    node: common_pb2.Node
    gpus: list[common_pb2.Gpu]
    distance_km: float | None
    mod_revision: int


def _candidates_of(inv: Inventory, name: str, flt: Filter, min_free: int) -> Iterator[Candidate]:
    entry = inv.nodes.get(name)
    if entry is None or not inv.is_schedulable(name):
        return
    node = entry.node
    ok, distance = flt.node_matches(node)
    if not ok:
        return
    held = inv.allocs.get(name, {})
    groups: dict[str, list[common_pb2.Gpu]] = {}
    for gpu in node.gpus:
        if gpu.uuid not in held and flt.gpu_matches(gpu):
            groups.setdefault(gpu.model, []).append(gpu)
    for gpus in groups.values():
        if len(gpus) >= max(min_free, 1):
            yield Candidate(name, node, gpus, distance, entry.mod_revision)


def candidates(
    inv: Inventory, flt: Filter, min_free: int = 1, names: Iterable[str] | None = None
) -> Iterator[Candidate]:
    """Matching candidates in price order (then name), unless `names` gives another order."""
    order = names if names is not None else (name for _, name in inv.by_price)
    for name in order:
        yield from _candidates_of(inv, name, flt, min_free)


def _sort_key(order: int) -> Callable[[Candidate], tuple[Any, ...]]:
    if order == OfferOrder.OFFER_ORDER_DISTANCE:
        return lambda c: (
            c.distance_km if c.distance_km is not None else 0.0,
            c.node.price_per_gpu_hour,
            c.name,
        )
    if order == OfferOrder.OFFER_ORDER_FREE_GPUS:
        return lambda c: (-len(c.gpus), c.node.price_per_gpu_hour, c.name)
    return lambda c: (c.node.price_per_gpu_hour, c.name)


def search(
    inv: Inventory, flt: Filter, min_free: int, order: int, stop_after: int
) -> tuple[list[Candidate], bool]:
    """The first `stop_after` candidates in the requested order, and whether more exist."""
    if order in (OfferOrder.OFFER_ORDER_UNSPECIFIED, OfferOrder.OFFER_ORDER_PRICE):
        out: list[Candidate] = []
        for c in candidates(inv, flt, min_free):
            if len(out) == stop_after:
                return out, True
            out.append(c)
        return out, False
    every = sorted(candidates(inv, flt, min_free), key=_sort_key(order))
    return every[:stop_after], len(every) > stop_after


def to_offer(c: Candidate) -> discovery_pb2.Offer:
    node = c.node
    worst = max(g.health for g in c.gpus)
    offer = discovery_pb2.Offer(
        node=c.name,
        provider=node.provider,
        node_id=node.node_id,
        location=node.location,
        gpu_model=c.gpus[0].model,
        gpu_memory_bytes=min(g.memory_total_bytes for g in c.gpus),
        free_gpus=len(c.gpus),
        gpu_uuids=[g.uuid for g in c.gpus],
        price_per_gpu_hour=node.price_per_gpu_hour,
        currency_code=node.currency_code,
        health=worst,
        labels=dict(node.labels),
    )
    if c.distance_km is not None:
        offer.distance_km = round(c.distance_km, 3)
    return offer


def summarize(inv: Inventory, flt: Filter) -> list[discovery_pb2.CapacityBucket]:
    """Totals and free GPUs by model x country x health over READY nodes that pass the node filter.
    The GPU filter's model and memory apply; health is a dimension here, not a filter."""
    buckets: dict[tuple[str, str, int], list[int]] = {}
    for name, entry in inv.nodes.items():
        if not inv.is_schedulable(name):
            continue
        ok, _ = flt.node_matches(entry.node)
        if not ok:
            continue
        held = inv.allocs.get(name, {})
        for gpu in entry.node.gpus:
            if (
                not model_matches(flt.gpu_model, gpu.model)
                or gpu.memory_total_bytes < flt.min_gpu_memory_bytes
            ):
                continue
            b = buckets.setdefault((gpu.model, entry.node.location.country_code, gpu.health), [0, 0])
            b[0] += 1
            if gpu.uuid not in held:
                b[1] += 1
    return [
        discovery_pb2.CapacityBucket(gpu_model=m, country_code=c, health=h, total_gpus=t, free_gpus=f)  # type: ignore[arg-type]
        for (m, c, h), (t, f) in sorted(buckets.items())
    ]
