"""The calendar on each GPU: overlaps, the renewal limit, and GPUs free for a window, on an index
fed by hand with an injected time (nanoseconds)."""

from __future__ import annotations

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.domain import calendar
from control_plane.domain.calendar import Slot
from control_plane.domain.filters import compile_filter
from gpufed.v1 import common_pb2, lease_pb2
from tests.unit.control_plane.inventory import P, add_node

S = 1_000_000_000
T0 = 1_900_000_000 * S


def _book(
    inv: Inventory, node: str, reservation: str, uuids: list[str], start: int, end: int, rev: int
) -> None:
    name = f"providers/p/nodes/{node}"
    current = inv.calendars.get(name, (None, 0))[0]
    cal = calendar.with_entry(current, reservation, uuids, start, end)
    inv.apply(f"{P}/calendar/p/{node}".encode(), cal.SerializeToString(), rev)


def _free(inv: Inventory, start: int, end: int, **kw: object) -> list[str]:
    flt = compile_filter(common_pb2.GpuFilter(**kw))  # type: ignore[arg-type]
    found = calendar.window_candidates(inv, flt, start, end, inv.slots, inv.held_until)
    return [g.uuid for c in found for g in c.gpus]


def test_windows_overlap_only_when_they_share_time_and_touching_ends_do_not() -> None:
    slots = [Slot(10, 20, "reservations/a")]
    assert calendar.overlaps(slots, 15, 25)
    assert calendar.overlaps(slots, 5, 11)
    assert not calendar.overlaps(slots, 20, 30)  # [10, 20) and [20, 30) touch
    assert not calendar.overlaps(slots, 0, 10)
    assert not calendar.overlaps(slots, 15, 25, ignore="reservations/a")


def test_a_node_calendar_keeps_each_reservations_window_by_start_and_drops_it_whole() -> None:
    cal = calendar.with_entry(None, "reservations/b", ["g1"], 50, 60)
    cal = calendar.with_entry(cal, "reservations/a", ["g0", "g1"], 10, 20)
    assert [e.reservation for e in cal.entries] == ["reservations/a", "reservations/b"]
    assert calendar.slots_by_gpu(cal) == {
        "g0": [Slot(10, 20, "reservations/a")],
        "g1": [Slot(10, 20, "reservations/a"), Slot(50, 60, "reservations/b")],
    }
    moved = calendar.with_entry(cal, "reservations/a", ["g0"], 30, 40)  # replaces its own entry
    assert calendar.slots_by_gpu(moved)["g1"] == [Slot(50, 60, "reservations/b")]
    assert [e.reservation for e in calendar.without(moved, "reservations/b").entries] == ["reservations/a"]


def test_the_renewal_limit_is_the_first_window_that_has_not_ended_on_any_of_the_gpus() -> None:
    slots = {"g0": [Slot(100, 200, "reservations/a")], "g1": [Slot(50, 60, "reservations/b")]}

    def of(u: str) -> list[Slot]:
        return slots.get(u, [])

    assert calendar.limit(of, ["g0", "g1"], now_ns=10) == 50
    assert calendar.limit(of, ["g0", "g1"], now_ns=70) == 100  # b's window is over
    assert calendar.limit(of, ["g0"], now_ns=10, own="reservations/a") is None  # its own lease
    assert calendar.limit(of, ["g2"], now_ns=10) is None
    assert calendar.reserved_within(slots, 40, 55) == {"g1"}


def test_gpus_free_for_a_window_exclude_overlapping_windows_and_leases_running_past_its_start() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "n1", "DE", 2.0, gpus=4, rev=1)
    _book(inv, "n1", "reservations/a", ["n1-g0"], T0 + 100 * S, T0 + 200 * S, rev=5)
    assert _free(inv, T0 + 150 * S, T0 + 300 * S) == ["n1-g1", "n1-g2", "n1-g3"]
    assert _free(inv, T0 + 200 * S, T0 + 300 * S) == ["n1-g0", "n1-g1", "n1-g2", "n1-g3"]
    # A lease on g1 until T0+120 s: free for a window from T0+120 s, not from T0+110 s.
    lease = lease_pb2.Lease(name="leases/00000000000000a1", tenant="t")
    lease.expire_time.FromNanoseconds(T0 + 120 * S)
    lease.gpus.add(node="providers/p/nodes/n1", uuid="n1-g1")
    inv.apply(f"{P}/leases/00000000000000a1".encode(), lease.SerializeToString(), 7)
    inv.apply(f"{P}/alloc/p/n1/n1-g1".encode(), b"00000000000000a1", 7)
    assert "n1-g1" not in _free(inv, T0 + 110 * S, T0 + 130 * S)
    assert "n1-g1" in _free(inv, T0 + 120 * S, T0 + 130 * S)
    # An interruptible lease never stands in a booking's way: it is preempted.
    lease.interruptible = True
    lease.expire_time.FromNanoseconds(T0 + 10_000 * S)
    inv.apply(f"{P}/leases/00000000000000a1".encode(), lease.SerializeToString(), 8)
    assert "n1-g1" in _free(inv, T0 + 110 * S, T0 + 130 * S)
    # Whole GPUs only; an offline node has nothing free.
    assert _free(inv, T0, T0 + S, mig_profile="1g.10gb") == []
    inv.apply(f"{P}/alive/p/n1".encode(), None, 9)
    assert _free(inv, T0 + 300 * S, T0 + 400 * S) == []


def test_window_totals_count_every_matching_gpu_and_free_only_those_free_for_all_of_it() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "n1", "DE", 2.0, gpus=4, rev=1)
    add_node(inv, "p", "n2", "FR", 3.0, gpus=2, rev=3)
    _book(inv, "n1", "reservations/a", ["n1-g0", "n1-g1"], T0, T0 + 100 * S, rev=5)
    flt = compile_filter(common_pb2.GpuFilter())
    totals = calendar.window_totals(inv, flt, T0 + 50 * S, T0 + 150 * S, inv.slots, inv.held_until)
    model = "NVIDIA H100 80GB HBM3"
    healthy = common_pb2.GPU_HEALTH_HEALTHY
    assert totals == {(model, "DE", healthy): [4, 2], (model, "FR", healthy): [2, 2]}
    later = calendar.window_totals(inv, flt, T0 + 100 * S, T0 + 150 * S, inv.slots, inv.held_until)
    assert later[(model, "DE", healthy)] == [4, 4]

    # Nodes without a calendar or a lease are counted by kind: the same answer, faster.
    def quiet(n: str) -> bool:
        return n not in inv.calendars and n not in inv.allocs

    fast = calendar.window_totals(inv, flt, T0 + 50 * S, T0 + 150 * S, inv.slots, inv.held_until, quiet)
    assert fast == totals


def test_the_index_forgets_a_calendars_windows_when_it_is_rewritten_or_deleted() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "n1", "DE", 2.0, gpus=2, rev=1)
    _book(inv, "n1", "reservations/a", ["n1-g0", "n1-g1"], T0, T0 + S, rev=5)
    assert inv.calendar_revision("providers/p/nodes/n1") == 5 and len(inv.slots("n1-g1")) == 1
    cal = calendar.with_entry(None, "reservations/b", ["n1-g0"], T0, T0 + S)
    inv.apply(f"{P}/calendar/p/n1".encode(), cal.SerializeToString(), 6)
    assert inv.slots("n1-g1") == () and [s.reservation for s in inv.slots("n1-g0")] == ["reservations/b"]
    inv.apply(f"{P}/calendar/p/n1".encode(), None, 7)
    assert inv.calendar_revision("providers/p/nodes/n1") == 0 and inv.slots("n1-g0") == ()


def test_a_providers_reservable_fraction_caps_what_bookings_may_hold_of_a_node() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "n1", "DE", 2.0, gpus=4, rev=1)
    node = inv.nodes["providers/p/nodes/n1"].node
    node.reservable_fraction = 0.5  # 2 of 4 GPUs at most
    inv.apply(f"{P}/nodes/p/n1".encode(), node.SerializeToString(), 3)
    assert len(_free(inv, T0, T0 + 100 * S)) == 2
    _book(inv, "n1", "reservations/a", ["n1-g0"], T0, T0 + 100 * S, rev=5)
    assert len(_free(inv, T0 + 50 * S, T0 + 150 * S)) == 1  # one more while a's window lasts
    assert len(_free(inv, T0 + 100 * S, T0 + 150 * S)) == 2  # after it, the share again
    node.reservable_fraction = 0.0
    inv.apply(f"{P}/nodes/p/n1".encode(), node.SerializeToString(), 7)
    assert _free(inv, T0 + 200 * S, T0 + 300 * S) == []
