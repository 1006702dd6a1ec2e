"""The calendar on each GPU: which windows reservations hold, what a lease on a reserved GPU may
be renewed to, and which GPUs are free for a future window. Pure functions of the calendars,
the inventory and the time (nanoseconds since the epoch, injected).

A node's calendar is one etcd record (gpufed.v1.NodeCalendar): its entries name a reservation,
its GPUs (whole GPUs, by uuid) and the window [start, end). A MIG instance is on the calendar
of its parent GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from control_plane.domain.filters import Filter, model_matches
from control_plane.domain.inventory import Candidate, InventoryView, gpu_counts
from control_plane.domain.offers import DEGRADED, HEALTHY, OfferOrder, impossible, price_order, sort_key
from control_plane.domain.times import at_ns, ns_of
from gpufed.v1 import common_pb2, reservation_pb2


class Slot(NamedTuple):
    """One reservation's window on one GPU."""

    start_ns: int
    end_ns: int
    reservation: str  # "reservations/{id}"


def slots_by_gpu(calendar: reservation_pb2.NodeCalendar) -> dict[str, list[Slot]]:
    """Each GPU's windows, by start."""
    out: dict[str, list[Slot]] = {}
    for e in calendar.entries:
        slot = Slot(ns_of(e.start_time), ns_of(e.end_time), e.reservation)
        for u in e.gpu_uuids:
            bisect.insort(out.setdefault(u, []), slot)
    return out


def overlaps(slots: Sequence[Slot], start_ns: int, end_ns: int, ignore: str = "") -> bool:
    """Whether a window of these slots (other than reservation `ignore`'s) meets [start, end)."""
    return any(s.start_ns < end_ns and start_ns < s.end_ns and s.reservation != ignore for s in slots)


def limit(
    slots_of: Callable[[str], Sequence[Slot]], gpus: Iterable[str], now_ns: int, own: str = ""
) -> int | None:
    """The latest a lease on these GPUs may run to: the start of the first window on any of them
    that has not ended (a reservation's own lease, `own`, is not limited by its own window).
    None while no reservation limits it."""
    starts = [s.start_ns for u in gpus for s in slots_of(u) if s.end_ns > now_ns and s.reservation != own]
    return min(starts) if starts else None


def reserved_within(
    slots: Mapping[str, Sequence[Slot]], start_ns: int, end_ns: int, own: str = ""
) -> set[str]:
    """GPUs with a window meeting [start, end): what a grant that must run at least that long
    avoids."""
    return {u for u, ss in slots.items() if overlaps(ss, start_ns, end_ns, own)}


def with_entry(
    calendar: reservation_pb2.NodeCalendar | None,
    reservation: str,
    gpu_uuids: Sequence[str],
    start_ns: int,
    end_ns: int,
) -> reservation_pb2.NodeCalendar:
    """The calendar with this reservation's window on these GPUs (replacing an entry it had)."""
    out = without(calendar, reservation)
    entry = reservation_pb2.NodeCalendar.Entry(
        reservation=reservation,
        gpu_uuids=sorted(gpu_uuids),
        start_time=at_ns(start_ns),
        end_time=at_ns(end_ns),
    )
    entries = [*out.entries, entry]
    entries.sort(key=lambda e: (ns_of(e.start_time), e.reservation))
    del out.entries[:]
    out.entries.extend(entries)
    return out


def without(calendar: reservation_pb2.NodeCalendar | None, reservation: str) -> reservation_pb2.NodeCalendar:
    out = reservation_pb2.NodeCalendar()
    if calendar is not None:
        out.entries.extend(e for e in calendar.entries if e.reservation != reservation)
    return out


def window_candidates(
    inv: InventoryView,
    flt: Filter,
    start_ns: int,
    end_ns: int,
    slots_of: Callable[[str], Sequence[Slot]],
    held_until: Callable[[str, str], int],
    min_free: int = 1,
    ignore: str = "",
) -> Iterator[Candidate]:
    """Whole GPUs free for all of [start, end), in price order, per node and model: healthy (or
    degraded, if the filter allows) on a READY node that matches, no window of another
    reservation meeting it, and no lease on it (or on one of its MIG instances) that may run
    past `start` (`held_until(node, uuid)`: the latest expiry of the leases that must not be
    cut short, 0 for none; interruptible leases do not count, they are preempted). `ignore`: a
    reservation whose own windows do not count (one being moved)."""
    if impossible(inv, flt) or flt.mig_profile:
        return
    for name in price_order(inv, flt):
        entry = inv.nodes.get(name)
        if entry is None or not inv.is_schedulable(name):
            continue
        ok, distance = flt.node_matches(entry.node)
        if not ok:
            continue
        room = reservable_room(entry.node, slots_of, start_ns, end_ns, ignore)
        if room <= 0:
            continue
        by_model: dict[str, list[common_pb2.Gpu]] = {}
        for model, health, memory, gpu in entry.gpus:
            if gpu.parent_uuid:
                continue  # instances: the parent's calendar is theirs
            if health != HEALTHY and not (flt.include_degraded and health == DEGRADED):
                continue
            if memory < flt.min_gpu_memory_bytes or not model_matches(flt.gpu_model, model):
                continue
            if (
                overlaps(slots_of(gpu.uuid), start_ns, end_ns, ignore)
                or held_until(name, gpu.uuid) > start_ns
            ):
                continue
            by_model.setdefault(model, []).append(gpu)
        for gpus in by_model.values():
            gpus = gpus[:room]
            if len(gpus) >= max(min_free, 1):
                yield Candidate(name, entry.node, gpus, distance, entry.mod_revision)


def reservable_room(
    node: common_pb2.Node,
    slots_of: Callable[[str], Sequence[Slot]],
    start_ns: int,
    end_ns: int,
    ignore: str = "",
) -> int:
    """How many more of the node's GPUs a booking of [start, end) may take under the
    provider's reservable_fraction: its share of the whole GPUs, less every GPU with a window
    meeting this one (counted as if all at once: never more than the share, at the price of
    refusing some bookings whose windows would not in fact coincide)."""
    whole = [g for g in node.gpus if not g.parent_uuid]
    if not node.HasField("reservable_fraction"):
        return len(whole)
    share = int(node.reservable_fraction * len(whole) + 1e-9)
    taken = sum(1 for g in whole if overlaps(slots_of(g.uuid), start_ns, end_ns, ignore))
    return max(0, share - taken)


def window_totals(
    inv: InventoryView,
    flt: Filter,
    start_ns: int,
    end_ns: int,
    slots_of: Callable[[str], Sequence[Slot]],
    held_until: Callable[[str, str], int],
    quiet: Callable[[str], bool] = lambda _: False,
) -> dict[tuple[str, str, int], list[int]]:
    """(model, country, health) -> [total, free for all of the window] whole GPUs of READY
    nodes that match (SummarizeCapacity with a window: one walk over the matching nodes; health
    is a dimension, not a filter, as without a window). Free counts stop at the node's
    reservable share, as bookings do. `quiet(node)`: the node has no calendar and no lease, so
    its GPUs are counted per kind without looking at each (most nodes, most of the time)."""
    out: dict[tuple[str, str, int], list[int]] = {}
    if impossible(inv, flt) or flt.mig_profile:
        return out
    for name in price_order(inv, flt):
        entry = inv.nodes.get(name)
        if entry is None or not inv.is_schedulable(name) or not flt.node_matches(entry.node)[0]:
            continue
        country = entry.node.location.country_code
        room = reservable_room(entry.node, slots_of, start_ns, end_ns)
        if quiet(name):
            for (model, health, profile, memory), n in gpu_counts(entry):
                if profile or memory < flt.min_gpu_memory_bytes or not model_matches(flt.gpu_model, model):
                    continue
                tally = out.setdefault((model, country, health), [0, 0])
                tally[0] += n
                free = min(n, room)
                tally[1] += free
                room -= free
            continue
        for model, health, memory, gpu in entry.gpus:
            # Health is a dimension here, as in offers.summarize; instances are their parent's.
            if (
                gpu.parent_uuid
                or memory < flt.min_gpu_memory_bytes
                or not model_matches(flt.gpu_model, model)
            ):
                continue
            tally = out.setdefault((model, country, health), [0, 0])
            tally[0] += 1
            if (
                room > 0
                and not overlaps(slots_of(gpu.uuid), start_ns, end_ns)
                and held_until(name, gpu.uuid) <= start_ns
            ):
                tally[1] += 1
                room -= 1
    return out


def window_search(
    inv: InventoryView,
    flt: Filter,
    start_ns: int,
    end_ns: int,
    slots_of: Callable[[str], Sequence[Slot]],
    held_until: Callable[[str, str], int],
    min_free: int,
    order: int,
    stop_after: int,
) -> tuple[list[Candidate], bool]:
    """offers.search for a window: the first `stop_after` candidates free for all of it."""
    found = window_candidates(inv, flt, start_ns, end_ns, slots_of, held_until, min_free)
    if order in (OfferOrder.OFFER_ORDER_UNSPECIFIED, OfferOrder.OFFER_ORDER_PRICE):
        out: list[Candidate] = []
        for c in found:
            if len(out) == stop_after:
                return out, True
            out.append(c)
        return out, False
    every = sorted(found, key=sort_key(order))
    return every[:stop_after], len(every) > stop_after
