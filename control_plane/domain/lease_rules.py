"""Lease request validation and record building: pure functions of the request, the chosen GPUs
and the time."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import duration_pb2, timestamp_pb2

from control_plane.domain import errors
from control_plane.domain.filters import Filter, compile_filter
from control_plane.domain.names import lease_name, validate_request_id
from control_plane.domain.placement import MAX_GANG, Pick
from gpufed.v1 import lease_pb2

MIN_TTL_S = 5
MAX_TTL_S = 3600
DEFAULT_TTL_S = 60
_PLACEMENTS = frozenset(lease_pb2.Placement.values())


@dataclass(frozen=True, slots=True)
class CreateSpec:
    request_id: str
    gpu_count: int
    filter: Filter
    placement: int
    ttl_s: int


def validate_create(req: lease_pb2.CreateLeaseRequest) -> CreateSpec:
    validate_request_id(req.request_id)
    if req.gpu_count < 1:
        raise errors.invalid("INVALID_GPU_COUNT", "gpu_count must be at least 1", field="gpu_count")
    if req.gpu_count > MAX_GANG:
        raise errors.exhausted(
            "GANG_TOO_LARGE",
            f"gpu_count {req.gpu_count} exceeds {MAX_GANG}, the most one atomic etcd transaction can grant",
        )
    if req.placement not in _PLACEMENTS:
        raise errors.invalid("INVALID_PLACEMENT", f"unknown placement {req.placement}", field="placement")
    ttl_s = DEFAULT_TTL_S
    if req.HasField("ttl"):
        if req.ttl.nanos or not MIN_TTL_S <= req.ttl.seconds <= MAX_TTL_S:
            raise errors.invalid(
                "INVALID_TTL",
                f"ttl must be a whole number of seconds in [{MIN_TTL_S}, {MAX_TTL_S}]",
                field="ttl",
            )
        ttl_s = req.ttl.seconds
    placement = req.placement or lease_pb2.PLACEMENT_SINGLE_NODE
    return CreateSpec(req.request_id, req.gpu_count, compile_filter(req.filter), placement, ttl_s)


def build_lease(
    lease_id: str, tenant: str, spec: CreateSpec, picks: list[Pick], now: timestamp_pb2.Timestamp
) -> lease_pb2.Lease:
    lease = lease_pb2.Lease(
        name=lease_name(lease_id),
        tenant=tenant,
        state=lease_pb2.LEASE_STATE_ACTIVE,
        request_id=spec.request_id,
        placement=spec.placement,  # type: ignore[arg-type]
        ttl=duration_pb2.Duration(seconds=spec.ttl_s),
        create_time=now,
    )
    lease.expire_time.seconds = now.seconds + spec.ttl_s
    lease.expire_time.nanos = now.nanos
    currency = ""
    for pick in picks:
        node = pick.candidate.node
        currency = currency or node.currency_code
        by_uuid = {g.uuid: g for g in node.gpus}
        for u in pick.gpu_uuids:
            g = by_uuid[u]
            lease.gpus.add(
                node=pick.candidate.name,
                provider=node.provider,
                node_id=node.node_id,
                uuid=u,
                index=g.index,
                model=g.model,
                location=node.location,
                price_per_gpu_hour=node.price_per_gpu_hour,
            )
    lease.price_per_hour = round(sum(g.price_per_gpu_hour for g in lease.gpus), 6)
    lease.currency_code = currency or "USD"
    return lease


def renewed(lease: lease_pb2.Lease, at: timestamp_pb2.Timestamp) -> lease_pb2.Lease:
    """The record after a renewal at `at`: it expires one ttl later (the only change)."""
    out = lease_pb2.Lease()
    out.CopyFrom(lease)
    out.expire_time.seconds = at.seconds + (lease.ttl.seconds or DEFAULT_TTL_S)
    out.expire_time.nanos = at.nanos
    return out


def expired(lease: lease_pb2.Lease) -> lease_pb2.Lease:
    """The final record of a lease nobody renewed: it ended at its expire_time (the last grant
    or renewal plus the ttl), whenever its end was noticed."""
    return ended(lease, lease_pb2.LEASE_END_REASON_EXPIRED, lease.expire_time)


def ended(
    lease: lease_pb2.Lease, reason: int, now: timestamp_pb2.Timestamp, message: str = ""
) -> lease_pb2.Lease:
    out = lease_pb2.Lease()
    out.CopyFrom(lease)
    out.state = lease_pb2.LEASE_STATE_ENDED
    out.end_reason = reason  # type: ignore[assignment]
    out.end_time.CopyFrom(now)
    out.end_message = message
    return out
