"""The queue's order, backfill rule and positions (control_plane.domain.queue), on a toy
federation: one node's free GPUs, placed first-free-first."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from control_plane.domain import queue
from control_plane.domain.filters import Filter
from control_plane.domain.inventory import Candidate
from control_plane.domain.lease_rules import CreateSpec
from control_plane.domain.placement import Pick
from gpufed.v1 import common_pb2, lease_pb2

S = 1_000_000_000
NODE = Candidate("providers/p/nodes/n", common_pb2.Node(), [], None, 1)


def _waiter(lease_id: str, tenant: str, gpus: int, queued_s: float, deadline_s: float = 3600) -> queue.Waiter:
    spec = CreateSpec(lease_id, gpus, Filter(), lease_pb2.PLACEMENT_SPREAD, 60, max_wait_s=3600)
    return queue.Waiter(lease_id, tenant, spec, int(queued_s * S), int(deadline_s * S))


def _federation(free: list[str]) -> tuple[object, object]:
    def place(w: queue.Waiter, avoid: AbstractSet[str]) -> list[Pick] | None:
        room = [u for u in free if u not in avoid]
        if len(room) < w.spec.gpu_count:
            return None
        return [Pick(NODE, tuple(room[: w.spec.gpu_count]))]

    def claim(w: queue.Waiter, avoid: AbstractSet[str]) -> set[str]:
        return set([u for u in free if u not in avoid][: w.spec.gpu_count])

    return place, claim


def _plan(waiters: list[queue.Waiter], free: list[str], **kw: object) -> queue.Plan:
    place, claim = _federation(free)
    return queue.plan(waiters, kw.pop("held", {}), 10 * S, place, claim, **kw)  # type: ignore[arg-type]


def _granted(p: queue.Plan) -> list[str]:
    return [w.lease_id for w, _ in p.grants]


def test_within_a_tenant_the_first_queued_is_granted_first() -> None:
    p = _plan([_waiter("b", "t", 1, 2), _waiter("a", "t", 1, 1)], ["g0"])
    assert _granted(p) == ["a"]


def test_a_tenant_holding_fewer_gpus_goes_first_among_requests_queued_together() -> None:
    ws = [_waiter("big", "heavy", 1, 1), _waiter("small", "light", 1, 2)]
    p = _plan(ws, ["g0"], held={"heavy": 4, "light": 0})
    assert _granted(p) == ["small"]


def test_an_old_enough_request_passes_a_tenant_holding_less_so_nobody_starves() -> None:
    # heavy holds 4 GPUs: 4 x SHARE_S behind; queued 200 s before light, it goes first.
    ws = [_waiter("old", "heavy", 1, 0), _waiter("new", "light", 1, 4 * queue.SHARE_S + 1)]
    p = _plan(ws, ["g0"], held={"heavy": 4})
    assert _granted(p) == ["old"]


def test_grants_in_one_pass_move_their_tenant_back() -> None:
    ws = [_waiter("a1", "a", 1, 0), _waiter("a2", "a", 1, 1), _waiter("b1", "b", 1, 5)]
    p = _plan(ws, ["g0", "g1"])
    assert _granted(p) == ["a1", "b1"]  # a1 raised a's rank by SHARE_S: b1 is next


def test_a_blocked_gang_claims_what_it_waits_on_and_small_ones_pass_only_on_the_rest() -> None:
    ws = [_waiter("gang", "a", 4, 0), _waiter("s1", "b", 1, 1), _waiter("s2", "b", 1, 2)]
    p = _plan(ws, ["g0", "g1", "g2"])
    # The gang cannot start on 3 free GPUs; it claims all 3, so neither small one takes them.
    assert _granted(p) == []
    assert p.claimed == {"g0", "g1", "g2"}
    p = _plan([_waiter("gang", "a", 2, 0), _waiter("s1", "b", 1, 1)], ["g0", "g1", "g2"])
    assert _granted(p) == ["gang", "s1"]


def test_backfill_uses_gpus_the_blocked_head_does_not_claim() -> None:
    # The gang waits for 4 A100s with 2 free: it claims those 2. A small request for any GPU
    # behind it runs now on an H100, and one for an A100 waits.
    free = ["A100-0", "A100-1", "H100-0"]

    def fits(w: queue.Waiter, avoid: AbstractSet[str]) -> list[str]:
        return [u for u in free if u not in avoid and u.startswith(w.spec.filter.gpu_model)]

    def place(w: queue.Waiter, avoid: AbstractSet[str]) -> list[Pick] | None:
        room = fits(w, avoid)
        return [Pick(NODE, tuple(room[: w.spec.gpu_count]))] if len(room) >= w.spec.gpu_count else None

    def claim(w: queue.Waiter, avoid: AbstractSet[str]) -> set[str]:
        return set(fits(w, avoid)[: w.spec.gpu_count])

    def want(lease_id: str, model: str, gpus: int, queued_s: float) -> queue.Waiter:
        spec = CreateSpec(
            lease_id, gpus, Filter(gpu_model=model), lease_pb2.PLACEMENT_SPREAD, 60, max_wait_s=60
        )
        return queue.Waiter(lease_id, lease_id, spec, int(queued_s * S), 3600 * S)

    ws = [want("gang", "A100", 4, 0), want("a100", "A100", 1, 1), want("any", "", 1, 2)]
    p = queue.plan(ws, {}, 10 * S, place, claim)
    assert _granted(p) == ["any"]
    assert [u for _, picks in p.grants for pick in picks for u in pick.gpu_uuids] == ["H100-0"]
    assert p.claimed == {"A100-0", "A100-1"}


def test_a_waiter_past_its_deadline_is_never_granted() -> None:
    p = _plan([_waiter("late", "t", 1, 0, deadline_s=5), _waiter("ok", "t", 1, 1)], ["g0"])
    assert _granted(p) == ["ok"]


def test_a_tenant_over_its_quota_waits_and_claims_nothing() -> None:
    ws = [_waiter("a1", "a", 1, 0), _waiter("b1", "b", 1, 1)]
    place, claim = _federation(["g0"])
    p = queue.plan(ws, {}, 10 * S, place, claim, can_hold=lambda w, n: w.tenant != "a")  # type: ignore[arg-type]
    assert _granted(p) == ["b1"] and p.claimed == frozenset()


def test_no_gpu_is_granted_twice_in_one_pass() -> None:
    ws = [_waiter(f"w{i}", f"t{i % 4}", 1 + i % 3, i) for i in range(50)]
    p = _plan(ws, [f"g{i}" for i in range(20)])
    uuids = [u for _, picks in p.grants for pick in picks for u in pick.gpu_uuids]
    assert len(uuids) == len(set(uuids)) and 0 < len(uuids) <= 20


def test_a_pass_makes_at_most_limit_grants() -> None:
    ws = [_waiter(f"w{i}", "t", 1, i) for i in range(10)]
    assert len(_plan(ws, [f"g{i}" for i in range(10)], limit=3).grants) == 3


def test_positions_count_within_a_shape_in_the_queues_order() -> None:
    ws = [_waiter("a", "t", 1, 0), _waiter("b", "t", 1, 1), _waiter("c", "u", 1, 2)]
    other = CreateSpec("d", 1, Filter(gpu_model="A100"), lease_pb2.PLACEMENT_SPREAD, 60, max_wait_s=60)
    ws.append(queue.Waiter("d", "t", other, 3 * S, 3600 * S))
    assert queue.positions(ws, {}) == {"a": 1, "b": 2, "c": 3, "d": 1}
    assert queue.positions(ws, {"t": 1}) == {"c": 1, "a": 2, "b": 3, "d": 1}
