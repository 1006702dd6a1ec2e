"""The checker finds each broken promise in a history made up for it, and passes a sound one."""

from __future__ import annotations

from typing import Any

from tests.faults.checker import Usage, check

T0 = 1_000.0


def create(
    lease: str, t0: float, t1: float, gpus: tuple[str, ...] = ("g0",), w: str = "w", ttl: float = 5
) -> dict[str, Any]:
    return dict(
        w=w,
        op="create",
        t0=t0,
        t1=t1,
        ok=True,
        req=f"r-{lease}",
        lease=lease,
        gpus=list(gpus),
        ttl=ttl,
        expire=t1 + ttl,
    )


def renew(
    lease: str, t0: float, t1: float, ok: bool = True, code: str = "", ttl: float = 5
) -> dict[str, Any]:
    return dict(w="w", op="renew", t0=t0, t1=t1, ok=ok, lease=lease, code=code, expire=t1 + ttl)


def release(lease: str, t0: float, t1: float, ok: bool = True) -> dict[str, Any]:
    return dict(w="w", op="release", t0=t0, t1=t1, ok=ok, lease=lease, code="" if ok else "UNAVAILABLE")


def usage(lease: str, start: float, end: float, gpus: tuple[str, ...] = ("g0",), version: int = 1) -> Usage:
    return Usage(lease, "neo", gpus, start, end, len(gpus) * (end - start), "RELEASED", version)


def sound() -> tuple[list[dict[str, Any]], list[Usage], dict[str, float]]:
    """Lease a on g0 for 2 s, then lease b on g0, renewed once, released."""
    records = [
        create("a", T0, T0 + 0.02),
        release("a", T0 + 2, T0 + 2.02),
        create("b", T0 + 2.1, T0 + 2.12),
        renew("b", T0 + 3, T0 + 3.01),
        release("b", T0 + 4, T0 + 4.01),
    ]
    return records, [usage("a", T0 + 0.01, T0 + 2.01), usage("b", T0 + 2.11, T0 + 4.005)], {}


def test_a_sound_history_passes() -> None:
    records, us, gone = sound()
    report = check(records, us, gone, {}, [], [])
    assert report.violations == []
    assert (report.granted, report.released, report.usage_records) == (2, 2, 2)


def test_one_gpu_in_two_leases_at_once_is_found_in_the_usage_and_in_what_clients_held() -> None:
    records, _, gone = sound()
    records[2] = create("b", T0 + 1.0, T0 + 1.02)
    us = [usage("a", T0 + 0.01, T0 + 2.01), usage("b", T0 + 1.01, T0 + 4.005)]
    v = check(records, us, gone, {}, [], []).violations
    assert any("GPU g0 in two leases" in x for x in v)
    assert any("acknowledged to two holders" in x for x in v)


def test_a_renewal_answered_ended_before_the_expiry_is_an_early_end() -> None:
    records, us, gone = sound()
    records.insert(4, renew("b", T0 + 3.5, T0 + 3.6, ok=False, code="NOT_FOUND"))
    v = check(records, us, gone, {}, [], []).violations
    assert any("before its expiry" in x for x in v)


def test_a_lease_key_gone_before_its_expiry_or_release_is_an_early_end() -> None:
    records, us, _ = sound()
    v = check(records, us, {"b": T0 + 3.5}, {}, [], []).violations
    assert any("its key was gone" in x for x in v)


def test_an_abandoned_lease_must_be_freed_within_ttl_plus_two_seconds() -> None:
    records = [create("h", T0, T0 + 0.02, w="hold")]
    us = [usage("h", T0 + 0.01, T0 + 5.02)]
    kills = {"hold": T0 + 1}
    assert check(records, us, {"h": T0 + 6}, kills, [], []).violations == []
    late = check(records, us, {"h": T0 + 8.5}, kills, [], []).violations
    assert any("freed at" in x for x in late)
    assert any("never seen freed" in x for x in check(records, us, {}, kills, [], []).violations)


def test_an_etcd_outage_before_the_expiry_moves_the_abandoned_deadline() -> None:
    records = [create("h", T0, T0 + 0.02, w="hold")]
    us = [usage("h", T0 + 0.01, T0 + 5.02)]
    outage = [(T0 + 3, T0 + 13)]  # etcd gives every lease a fresh ttl when it is back
    assert check(records, us, {"h": T0 + 18}, {"hold": T0 + 1}, outage, []).violations == []
    # An outage after the lease would have run out moves nothing.
    v = check(records, us, {"h": T0 + 18}, {"hold": T0 + 1}, [(T0 + 9, T0 + 19)], []).violations
    assert any("freed at" in x for x in v)


def test_a_missing_a_rewritten_or_a_wrong_usage_record_is_found() -> None:
    records, us, gone = sound()
    assert any("without a usage record" in x for x in check(records, us[:1], gone, {}, [], []).violations)
    twice = [us[0], usage("b", T0 + 2.11, T0 + 4.005, version=2)]
    assert any("written 2 times" in x for x in check(records, twice, gone, {}, [], []).violations)
    long = [us[0], usage("b", T0 + 2.11, T0 + 6.5)]
    assert any("billed" in x for x in check(records, long, gone, {}, [], []).violations)
    other_gpu = [us[0], usage("b", T0 + 2.11, T0 + 4.005, gpus=("g9",))]
    assert any("cover GPUs" in x for x in check(records, other_gpu, gone, {}, [], []).violations)


def test_leftover_keys_and_internal_errors_are_violations() -> None:
    records, us, gone = sound()
    records.append(dict(w="w", op="renew", t0=T0, t1=T0, ok=False, lease="b", code="INTERNAL"))
    v = check(records, us, gone, {}, [], ["/p.records/journal/b"]).violations
    assert any("left in etcd" in x for x in v)
    assert any("INTERNAL" in x for x in v)
