"""Offers and capacity from the inventory: which free GPUs match a filter, and how to order them.

An offer is the free, matching GPUs of one model on one schedulable node at the node's price.
Searches ordered by price walk the price-ordered node list and stop once the page is full.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from control_plane.domain import mig
from control_plane.domain.filters import Filter, model_matches
from control_plane.domain.geo import EARTH_RADIUS_KM, unit_vector
from control_plane.domain.inventory import Candidate, InventoryView, NodeSummary, gpu_counts
from gpufed.v1 import common_pb2, discovery_pb2

OfferOrder = discovery_pb2.OfferOrder
HEALTHY = common_pb2.GPU_HEALTH_HEALTHY
DEGRADED = common_pb2.GPU_HEALTH_DEGRADED


def _candidates_of(s: NodeSummary, flt: Filter, min_free: int) -> Iterator[Candidate]:
    if not s.schedulable or not s.groups:
        return  # (under load the cheapest nodes are full: skip them before the filter)
    ok, distance = flt.node_matches(s.node)
    if not ok:
        return
    by_model: dict[str, list[common_pb2.Gpu]] = {}
    merged = False
    for g in s.groups:
        if g.mig_profile != flt.mig_profile:
            continue  # whole GPUs, or instances of the one profile asked for
        if g.health != HEALTHY and not (flt.include_degraded and g.health == DEGRADED):
            continue
        if g.memory_bytes < flt.min_gpu_memory_bytes or not model_matches(flt.gpu_model, g.model):
            continue
        if g.model in by_model:
            by_model[g.model].extend(g.gpus)
            merged = True
        else:
            by_model[g.model] = list(g.gpus)
    for gpus in by_model.values():
        if len(gpus) >= max(min_free, 1):
            if merged:
                gpus.sort(key=_index)  # healthy and degraded groups of one model, back in NVML order
            yield Candidate(s.name, s.node, gpus, distance, s.mod_revision)


def impossible(inv: InventoryView, flt: Filter) -> bool:
    """Whether no node at all can match (a model, provider, region or label nobody has), known
    from the index's counts without walking a node: such searches would walk every one."""
    if flt.gpu_model and not any(model_matches(flt.gpu_model, m) for m in list(inv.models)):
        return True
    facets = inv.facets
    if flt.providers is not None and not any(p in inv.node_counts for p in flt.providers):
        return True
    if flt.regions is not None and not any(f"region:{r}" in facets for r in flt.regions):
        return True
    return any(f"label:{k}={v}" not in facets for k, v in flt.labels)


def could_fit(inv: InventoryView, flt: Filter, gpu_count: int, single_node: bool) -> bool:
    """Whether the nodes the filter takes have `gpu_count` matching GPUs, free or held (on one
    node if `single_node`): what a request may wait for. One walk, stopping at the first fit."""
    if impossible(inv, flt):
        return False
    seen = 0
    for name in price_order(inv, flt):
        entry = inv.nodes.get(name)
        if entry is None or not inv.is_schedulable(name) or not flt.node_matches(entry.node)[0]:
            continue
        n = sum(
            1
            for g in entry.node.gpus
            if g.mig_profile == flt.mig_profile
            and (g.health == HEALTHY or (flt.include_degraded and g.health == DEGRADED))
            and g.memory_total_bytes >= flt.min_gpu_memory_bytes
            and model_matches(flt.gpu_model, g.model)
        )
        seen = max(seen, n) if single_node else seen + n
        if seen >= gpu_count:
            return True
    return False


def _index(g: common_pb2.Gpu) -> int:
    return g.index


def price_order(inv: InventoryView, flt: Filter) -> Iterator[str]:
    """Node names cheapest first; only the allowed countries' lists when the filter has some."""
    if flt.countries is not None:
        lists = [inv.by_country.get(c, ()) for c in sorted(flt.countries)]
        ordered: Iterable[tuple[float, str]] = heapq.merge(*lists) if len(lists) > 1 else lists[0]
    else:
        ordered = inv.by_price
    for price, name in ordered:
        if flt.max_price and price > flt.max_price:
            return  # everything after is dearer
        yield name


def candidates(
    inv: InventoryView, flt: Filter, min_free: int = 1, names: Iterable[str] | None = None
) -> Iterator[Candidate]:
    """Matching candidates in price order (then name), unless `names` gives another order."""
    if impossible(inv, flt):
        return  # no node has such a GPU, provider, region or label: nothing to walk
    summaries = inv.summaries
    for name in names if names is not None else price_order(inv, flt):
        s = summaries.get(name)
        if s is not None:
            yield from _candidates_of(s, flt, min_free)


def sort_key(order: int) -> Callable[[Candidate], tuple[Any, ...]]:
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
    inv: InventoryView, flt: Filter, min_free: int, order: int, stop_after: int
) -> tuple[list[Candidate], bool]:
    """The first `stop_after` candidates in the requested order, and whether more exist."""
    if order in (OfferOrder.OFFER_ORDER_UNSPECIFIED, OfferOrder.OFFER_ORDER_PRICE):
        out: list[Candidate] = []
        for c in candidates(inv, flt, min_free):
            if len(out) == stop_after:
                return out, True
            out.append(c)
        return out, False
    if order == OfferOrder.OFFER_ORDER_DISTANCE and flt.near is not None:
        return _nearest(inv, flt, min_free, stop_after)
    every = sorted(candidates(inv, flt, min_free), key=sort_key(order))
    return every[:stop_after], len(every) > stop_after


def _nearest(inv: InventoryView, flt: Filter, min_free: int, stop_after: int) -> tuple[list[Candidate], bool]:
    """Nearest first without evaluating every node: rank nodes by a cheap great-circle distance
    (unit vectors, one dot product each), then look at them in that order until the page fills."""
    assert flt.near is not None
    if impossible(inv, flt):
        return [], False
    origin = unit_vector(flt.near.latitude, flt.near.longitude)
    limit = math.cos(min(flt.near.radius_km / EARTH_RADIUS_KM, math.pi))
    ranked = []
    summaries = inv.summaries
    for name in price_order(inv, flt):
        s = summaries.get(name)
        if s is None or not s.schedulable:
            continue
        x, y, z = s.xyz
        dot = x * origin[0] + y * origin[1] + z * origin[2]
        if dot >= limit - 1e-12:
            ranked.append((-dot, s.price, name))
    heapq.heapify(ranked)
    out: list[Candidate] = []
    while ranked:
        _, _, name = heapq.heappop(ranked)
        for c in _candidates_of(summaries[name], flt, min_free):
            if len(out) == stop_after:
                return out, True
            out.append(c)
    return out, False


def to_offer(c: Candidate) -> discovery_pb2.Offer:
    """The offer for a candidate. It depends only on the node record (its mod revision), the
    GPUs and the distance, so callers may memoize it by (name, mod_revision, uuids)."""
    offer = base_offer(c)
    if c.distance_km is not None:
        offer.distance_km = round(c.distance_km, 3)
    return offer


def interruptible_price(node: common_pb2.Node) -> float:
    """Per GPU-hour for interruptible capacity (records before 0.3.0 have none: on-demand's)."""
    return node.interruptible_price_per_gpu_hour or node.price_per_gpu_hour


def base_offer(c: Candidate) -> discovery_pb2.Offer:
    node = c.node
    worst = max(g.health for g in c.gpus)
    first = c.gpus[0]
    offer = discovery_pb2.Offer(
        node=c.name,
        provider=node.provider,
        node_id=node.node_id,
        location=node.location,
        gpu_model=c.gpus[0].model,
        gpu_memory_bytes=min(g.memory_total_bytes for g in c.gpus),
        free_gpus=len(c.gpus),
        gpu_uuids=[g.uuid for g in c.gpus],
        price_per_gpu_hour=mig.unit_price(node.price_per_gpu_hour, first),
        interruptible_price_per_gpu_hour=mig.unit_price(interruptible_price(node), first),
        currency_code=node.currency_code,
        health=worst,
        mig_profile=first.mig_profile,
        labels=dict(node.labels),
        # Only the pool's tenant (and operators) ever get an offer of a pool node.
        pool=common_pb2.POOL_KIND_OWN if node.pool_tenant else common_pb2.POOL_KIND_FEDERATION,
    )
    return offer


def _from_tallies(inv: InventoryView, flt: Filter) -> dict[tuple[str, str, int], list[int]] | None:
    """The summary from the index's capacity tallies, when the filter constrains only what
    they are keyed by (model, memory, MIG profile, country) and which pools count; else None."""
    if flt.regions is not None or flt.providers is not None or flt.near is not None:
        return None
    if flt.max_price or flt.labels:
        return None
    pools = [p for p in inv.capacity if _pool_seen(p, flt)]
    buckets: dict[tuple[str, str, int], list[int]] = {}
    for pool in pools:
        for (model, country, health, profile, memory), (total, free) in inv.capacity[pool].items():
            if profile != flt.mig_profile or memory < flt.min_gpu_memory_bytes:
                continue
            if flt.countries is not None and country not in flt.countries:
                continue
            if country in flt.exclude_countries or not model_matches(flt.gpu_model, model):
                continue
            b = buckets.setdefault((model, country, health), [0, 0])
            b[0] += total
            b[1] += free
    return buckets


def _pool_seen(pool: str, flt: Filter) -> bool:
    """Whether the viewer sees the pool's nodes and the filter's `pool` takes them (as
    Filter.node_matches decides per node)."""
    if pool == "":
        return flt.pool != "own"
    if flt.pool == "federation":
        return False
    return flt.viewer is None or flt.viewer == pool


def summarize(inv: InventoryView, flt: Filter) -> list[discovery_pb2.CapacityBucket]:
    """Totals and free GPUs by model x country x health over READY nodes that pass the node filter.
    The GPU filter's model and memory apply; health is a dimension here, not a filter. From the
    index's tallies where the filter allows, else by walking the nodes."""
    tallied = _from_tallies(inv, flt)
    if tallied is not None:
        return to_buckets(tallied)
    buckets: dict[tuple[str, str, int], list[int]] = {}
    for name, entry in inv.nodes.items():
        if not inv.is_schedulable(name):
            continue
        ok, _ = flt.node_matches(entry.node)
        if not ok:
            continue
        held = inv.allocs.get(name, {})
        country = entry.node.location.country_code
        if not held:  # nothing held: every GPU is free, counted once per record
            for (model, health, profile, memory), n in gpu_counts(entry):
                if profile != flt.mig_profile or memory < flt.min_gpu_memory_bytes:
                    continue
                if model_matches(flt.gpu_model, model):
                    b = buckets.setdefault((model, country, health), [0, 0])
                    b[0] += n
                    b[1] += n
            continue
        parents_held = mig.held_parents(entry.node.gpus, held)
        for gpu in entry.node.gpus:
            if (
                gpu.mig_profile != flt.mig_profile
                or not model_matches(flt.gpu_model, gpu.model)
                or gpu.memory_total_bytes < flt.min_gpu_memory_bytes
            ):
                continue
            b = buckets.setdefault((gpu.model, entry.node.location.country_code, gpu.health), [0, 0])
            b[0] += 1
            if mig.is_free(gpu, held, parents_held):
                b[1] += 1
    return to_buckets(buckets)


def to_buckets(buckets: dict[tuple[str, str, int], list[int]]) -> list[discovery_pb2.CapacityBucket]:
    return [
        discovery_pb2.CapacityBucket(gpu_model=m, country_code=c, health=h, total_gpus=t, free_gpus=f)  # type: ignore[arg-type]
        for (m, c, h), (t, f) in sorted(buckets.items())
    ]
