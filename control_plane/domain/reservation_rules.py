"""Reservation request validation and record building: pure functions of the request, the GPUs
picked and the time (nanoseconds, injected)."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import duration_pb2, timestamp_pb2

from control_plane.domain import access, errors, lease_rules, pools
from control_plane.domain.filters import Filter, compile_filter
from control_plane.domain.names import lease_name, reservation_name, validate_request_id
from control_plane.domain.placement import MAX_GANG, Pick
from control_plane.domain.times import at_ns, ns_of, timestamp_ns
from gpufed.v1 import lease_pb2, reservation_pb2

NS = 1_000_000_000
MIN_DURATION_S = 10
MAX_DURATION_S = 31 * 86_400
MAX_AHEAD_S = 180 * 86_400
# A start this far in the past is a clock a little behind ours, not a request for the past.
START_SKEW_S = 60
SCHEDULED = reservation_pb2.RESERVATION_STATE_SCHEDULED
AT_RISK = reservation_pb2.RESERVATION_STATE_AT_RISK
ACTIVE = reservation_pb2.RESERVATION_STATE_ACTIVE
ENDED = reservation_pb2.RESERVATION_STATE_ENDED
# States whose GPUs are on the calendar.
BOOKED = frozenset((SCHEDULED, AT_RISK, ACTIVE))
_PLACEMENTS = frozenset(lease_pb2.Placement.values())


@dataclass(frozen=True, slots=True)
class ReservationSpec:
    request_id: str
    gpu_count: int
    filter: Filter
    placement: int
    start_ns: int
    end_ns: int
    access: lease_pb2.AccessRequest = field(default_factory=lease_pb2.AccessRequest)
    pool: int = 0
    allow_mixed: bool = False

    def as_lease_spec(self) -> lease_rules.CreateSpec:
        """The same request as CreateLease reads it (pool stages and placement are shared)."""
        return lease_rules.CreateSpec(
            self.request_id,
            self.gpu_count,
            self.filter,
            self.placement,
            lease_rules.DEFAULT_TTL_S,
            self.access,
            self.pool,
            self.allow_mixed,
        )


def validate_create(req: reservation_pb2.CreateReservationRequest, now_ns: int) -> ReservationSpec:
    validate_request_id(req.request_id)
    if req.gpu_count < 1:
        raise errors.invalid("INVALID_GPU_COUNT", "gpu_count must be at least 1", field="gpu_count")
    if req.gpu_count > MAX_GANG:
        raise errors.exhausted(
            "GANG_TOO_LARGE", f"gpu_count {req.gpu_count} exceeds {MAX_GANG}, the most one lease holds"
        )
    if req.placement not in _PLACEMENTS:
        raise errors.invalid("INVALID_PLACEMENT", f"unknown placement {req.placement}", field="placement")
    if req.filter.mig_profile:
        raise errors.invalid(
            "MIG_NOT_RESERVABLE", "a reservation holds whole GPUs: no mig_profile", field="filter.mig_profile"
        )
    if not req.HasField("start_time"):
        raise errors.invalid("INVALID_START_TIME", "start_time is required", field="start_time")
    start_ns = timestamp_ns(req.start_time, "start_time")
    if start_ns < now_ns - START_SKEW_S * NS or start_ns > now_ns + MAX_AHEAD_S * NS:
        raise errors.invalid(
            "INVALID_START_TIME",
            f"start_time must be from now to {MAX_AHEAD_S // 86_400} days ahead",
            field="start_time",
        )
    d = req.duration
    if not req.HasField("duration") or d.nanos or not MIN_DURATION_S <= d.seconds <= MAX_DURATION_S:
        raise errors.invalid(
            "INVALID_DURATION",
            f"duration must be whole seconds in [{MIN_DURATION_S}, {MAX_DURATION_S}]",
            field="duration",
        )
    placement = req.placement or lease_pb2.PLACEMENT_SINGLE_NODE
    access.validate_request(req.access)
    pools.validate_choice(req.pool)
    if req.allow_mixed and placement != lease_pb2.PLACEMENT_SPREAD:
        raise errors.invalid("MIXED_NEEDS_SPREAD", "allow_mixed needs placement SPREAD", field="allow_mixed")
    start_ns = max(start_ns, now_ns)  # a start a little in the past is now
    return ReservationSpec(
        req.request_id,
        req.gpu_count,
        compile_filter(req.filter),
        placement,
        start_ns,
        start_ns + d.seconds * NS,
        req.access,
        req.pool,
        req.allow_mixed,
    )


def build(
    reservation_id: str,
    tenant: str,
    spec: ReservationSpec,
    req: reservation_pb2.CreateReservationRequest,
    picks: list[Pick],
    now: timestamp_pb2.Timestamp,
) -> reservation_pb2.Reservation:
    """The booked record: the GPUs picked and their prices, frozen now."""
    gpus, currency = lease_rules.leased_gpus(tenant, picks)
    return reservation_pb2.Reservation(
        name=reservation_name(reservation_id),
        tenant=tenant,
        state=SCHEDULED,
        gpu_count=spec.gpu_count,
        filter=req.filter,
        placement=spec.placement,  # type: ignore[arg-type]
        pool=spec.pool,  # type: ignore[arg-type]
        allow_mixed=spec.allow_mixed,
        start_time=at_ns(spec.start_ns),
        end_time=at_ns(spec.end_ns),
        gpus=gpus,
        price_per_hour=round(sum(g.price_per_gpu_hour for g in gpus), 6),
        currency_code=currency,
        access=spec.access,
        create_time=now,
        request_id=spec.request_id,
    )


def spec_of(reservation: reservation_pb2.Reservation) -> ReservationSpec:
    """A booked reservation's request, for moving it: the same filter, at most the lowest
    per-GPU price it was booked at (equivalent GPUs at the same or a lower price, so the
    total never grows)."""
    flt = reservation_pb2.Reservation().filter
    flt.CopyFrom(reservation.filter)
    top = min((g.price_per_gpu_hour for g in reservation.gpus), default=0.0)
    if top and (not flt.max_price_per_gpu_hour or top < flt.max_price_per_gpu_hour):
        flt.max_price_per_gpu_hour = top
    return ReservationSpec(
        reservation.request_id,
        reservation.gpu_count,
        compile_filter(flt),
        reservation.placement,
        ns_of(reservation.start_time),
        ns_of(reservation.end_time),
        reservation.access,
        reservation.pool,
        reservation.allow_mixed,
    )


def moved(
    reservation: reservation_pb2.Reservation, tenant: str, picks: list[Pick], message: str
) -> reservation_pb2.Reservation:
    """The record on its new GPUs, each at its provider's price now (spec_of bounds it)."""
    out = reservation_pb2.Reservation()
    out.CopyFrom(reservation)
    gpus, out.currency_code = lease_rules.leased_gpus(tenant, picks)
    del out.gpus[:]
    out.gpus.extend(gpus)
    out.price_per_hour = round(sum(g.price_per_gpu_hour for g in gpus), 6)
    out.state = SCHEDULED
    out.message = message[:1024]
    return out


def at_risk(reservation: reservation_pb2.Reservation, message: str) -> reservation_pb2.Reservation:
    out = reservation_pb2.Reservation()
    out.CopyFrom(reservation)
    out.state = AT_RISK
    out.message = message[:1024]
    return out


def back_on_schedule(reservation: reservation_pb2.Reservation) -> reservation_pb2.Reservation:
    out = reservation_pb2.Reservation()
    out.CopyFrom(reservation)
    out.state = SCHEDULED
    out.message = "its nodes are ready again"
    return out


def by_node(reservation: reservation_pb2.Reservation) -> dict[str, list[str]]:
    """node name -> the uuids of the reservation's GPUs on it."""
    out: dict[str, list[str]] = {}
    for g in reservation.gpus:
        out.setdefault(g.node, []).append(g.uuid)
    return out


def as_lease(
    reservation: reservation_pb2.Reservation, lease_id: str, hooked: set[str], now: timestamp_pb2.Timestamp
) -> lease_pb2.Lease:
    """The lease a reservation becomes at its start: its GPUs at the booked prices, until the
    window's end (its ttl is what is left of the window, so renewing changes nothing)."""
    end_ns = ns_of(reservation.end_time)
    lease = lease_pb2.Lease(
        name=lease_name(lease_id),
        tenant=reservation.tenant,
        state=lease_pb2.LEASE_STATE_ACTIVE,
        gpus=reservation.gpus,
        price_per_hour=reservation.price_per_hour,
        currency_code=reservation.currency_code,
        create_time=now,
        expire_time=reservation.end_time,
        max_expire_time=reservation.end_time,
        ttl=duration_pb2.Duration(seconds=max(1, (end_ns - ns_of(now) + NS - 1) // NS)),
        placement=reservation.placement,
        access=reservation.access,
        gpu_count=reservation.gpu_count,
        reservation=reservation.name,
    )
    return lease_rules.handed_over(lease, hooked, now)


def started(reservation: reservation_pb2.Reservation, lease: lease_pb2.Lease) -> reservation_pb2.Reservation:
    out = reservation_pb2.Reservation()
    out.CopyFrom(reservation)
    out.state = ACTIVE
    out.lease = lease.name
    return out


def ended(
    reservation: reservation_pb2.Reservation, reason: int, now: timestamp_pb2.Timestamp, message: str = ""
) -> reservation_pb2.Reservation:
    out = reservation_pb2.Reservation()
    out.CopyFrom(reservation)
    out.state = ENDED
    out.end_reason = reason  # type: ignore[assignment]
    out.ended_time.CopyFrom(now)
    out.message = message[:1024]
    return out


def search_window(
    available_from: timestamp_pb2.Timestamp | None, available_for: duration_pb2.Duration | None, now_ns: int
) -> tuple[int, int] | None:
    """[start, end) of a search's window (SearchOffers, SummarizeCapacity), None for none:
    bounded as a booking's, a start in the past meaning now."""
    if available_for is None:
        if available_from is not None:
            raise errors.invalid(
                "INVALID_WINDOW", "available_from needs available_for", field="available_for"
            )
        return None
    start = now_ns if available_from is None else timestamp_ns(available_from, "available_from")
    d = available_for
    if d.nanos or not MIN_DURATION_S <= d.seconds <= MAX_DURATION_S:
        raise errors.invalid(
            "INVALID_WINDOW",
            f"available_for must be whole seconds in [{MIN_DURATION_S}, {MAX_DURATION_S}]",
            field="available_for",
        )
    if start > now_ns + MAX_AHEAD_S * NS:
        raise errors.invalid(
            "INVALID_WINDOW",
            f"available_from is more than {MAX_AHEAD_S // 86_400} days ahead",
            field="available_from",
        )
    start = max(start, now_ns)
    return start, start + d.seconds * NS
