"""Lease request validation and record building: pure functions of the request, the chosen GPUs
and the time."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import duration_pb2, timestamp_pb2

from control_plane.domain import access, errors, mig, pools
from control_plane.domain.filters import Filter, compile_filter
from control_plane.domain.names import lease_name, validate_request_id
from control_plane.domain.placement import MAX_GANG, Pick
from gpufed.v1 import lease_pb2

MIN_TTL_S = 5
MAX_TTL_S = 3600
DEFAULT_TTL_S = 60
# CreateLeaseRequest.max_wait: whole seconds, at most a day.
MAX_WAIT_S = 86_400
_PLACEMENTS = frozenset(lease_pb2.Placement.values())
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
PROVISIONING = lease_pb2.LEASE_STATE_PROVISIONING
QUEUED = lease_pb2.LEASE_STATE_QUEUED
# The states of a lease record under leases/: it holds its GPUs.
LIVE = frozenset((ACTIVE, PROVISIONING))


def is_live(lease: lease_pb2.Lease) -> bool:
    return lease.state in LIVE


@dataclass(frozen=True, slots=True)
class CreateSpec:
    request_id: str
    gpu_count: int
    filter: Filter
    placement: int
    ttl_s: int
    access: lease_pb2.AccessRequest = field(default_factory=lease_pb2.AccessRequest)
    pool: int = 0  # common_pb2.PoolChoice
    allow_mixed: bool = False
    max_wait_s: int = 0  # 0: answer now; else a request without capacity waits (QUEUED)
    interruptible: bool = False  # at the interruptible price, preempted with notice


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
    access.validate_request(req.access)
    pools.validate_choice(req.pool)
    if req.allow_mixed and placement != lease_pb2.PLACEMENT_SPREAD:
        raise errors.invalid("MIXED_NEEDS_SPREAD", "allow_mixed needs placement SPREAD", field="allow_mixed")
    max_wait_s = 0
    if req.HasField("max_wait"):
        if req.max_wait.nanos or not 0 <= req.max_wait.seconds <= MAX_WAIT_S:
            raise errors.invalid(
                "INVALID_MAX_WAIT",
                f"max_wait must be a whole number of seconds in [0, {MAX_WAIT_S}]",
                field="max_wait",
            )
        max_wait_s = req.max_wait.seconds
    if req.interruptible and max_wait_s:
        raise errors.invalid(
            "INTERRUPTIBLE_CANNOT_WAIT",
            "an interruptible request takes what is free now: no max_wait",
            field="interruptible",
        )
    return CreateSpec(
        req.request_id,
        req.gpu_count,
        compile_filter(req.filter),
        placement,
        ttl_s,
        req.access,
        req.pool,
        req.allow_mixed,
        max_wait_s,
        req.interruptible,
    )


def _requested(
    lease_id: str, tenant: str, spec: CreateSpec, now: timestamp_pb2.Timestamp, state: int
) -> lease_pb2.Lease:
    """What a lease record says of its request, granted or queued."""
    return lease_pb2.Lease(
        name=lease_name(lease_id),
        tenant=tenant,
        state=state,  # type: ignore[arg-type]
        access=spec.access,
        request_id=spec.request_id,
        placement=spec.placement,  # type: ignore[arg-type]
        ttl=duration_pb2.Duration(seconds=spec.ttl_s),
        create_time=now,
        gpu_count=spec.gpu_count,
    )


def leased_gpus(
    tenant: str, picks: list[Pick], interruptible: bool = False
) -> tuple[list[lease_pb2.LeasedGpu], str]:
    """The picked GPUs as a lease (or a reservation) holds them, each at its quoted price (the
    interruptible one for interruptible capacity), and the currency of the quote."""
    out: list[lease_pb2.LeasedGpu] = []
    currency = ""
    for pick in picks:
        node = pick.candidate.node
        currency = currency or node.currency_code
        by_uuid = {g.uuid: g for g in node.gpus}
        price = node.price_per_gpu_hour
        if interruptible:
            price = node.interruptible_price_per_gpu_hour or price  # records before 0.3.0: none
        for u in pick.gpu_uuids:
            g = by_uuid[u]
            out.append(
                lease_pb2.LeasedGpu(
                    node=pick.candidate.name,
                    provider=node.provider,
                    node_id=node.node_id,
                    uuid=u,
                    index=g.index,
                    model=g.model,
                    location=node.location,
                    price_per_gpu_hour=mig.unit_price(price, g),
                    pool=pools.kind_of(node.pool_tenant, tenant),  # type: ignore[arg-type]
                    parent_uuid=g.parent_uuid,
                    mig_profile=g.mig_profile,
                )
            )
    return out, currency or "USD"


def build_lease(
    lease_id: str, tenant: str, spec: CreateSpec, picks: list[Pick], now: timestamp_pb2.Timestamp
) -> lease_pb2.Lease:
    """The record of a grant: PROVISIONING while any of its nodes' hooks has to set up access,
    else ACTIVE (and billed) from now."""
    lease = _requested(lease_id, tenant, spec, now, lease_pb2.LEASE_STATE_ACTIVE)
    lease.expire_time.seconds = now.seconds + spec.ttl_s
    lease.expire_time.nanos = now.nanos
    gpus, lease.currency_code = leased_gpus(tenant, picks, spec.interruptible)
    lease.gpus.extend(gpus)
    lease.interruptible = spec.interruptible
    lease.price_per_hour = round(sum(g.price_per_gpu_hour for g in lease.gpus), 6)
    hooked = {p.candidate.name for p in picks if p.candidate.node.lease_hook}
    return handed_over(lease, hooked, now)


def handed_over(lease: lease_pb2.Lease, hooked: set[str], now: timestamp_pb2.Timestamp) -> lease_pb2.Lease:
    """A new lease's handoff: an empty access entry per node without a hook (nothing to hand
    over); PROVISIONING while a hooked node has to answer, else ACTIVE and billed from now."""
    for node in dict.fromkeys(g.node for g in lease.gpus):
        if node not in hooked:
            lease.access_details.add(node=node)
    if hooked:
        lease.state = PROVISIONING
    else:
        lease.active_time.CopyFrom(now)
    return lease


def nodes_of(lease: lease_pb2.Lease) -> set[str]:
    return {g.node for g in lease.gpus}


def provisioned(
    lease: lease_pb2.Lease, details: lease_pb2.AccessDetails, now: timestamp_pb2.Timestamp
) -> lease_pb2.Lease:
    """The record after one node's hook answered: its details set (again, for a repeated
    answer), and ACTIVE from now once every node has answered."""
    out = lease_pb2.Lease()
    out.CopyFrom(lease)
    kept = [d for d in out.access_details if d.node != details.node]
    del out.access_details[:]
    out.access_details.extend([*kept, details])
    if out.state == PROVISIONING and {d.node for d in out.access_details} >= nodes_of(out):
        out.state = ACTIVE
        out.active_time.CopyFrom(now)
    return out


def renewed(lease: lease_pb2.Lease, at: timestamp_pb2.Timestamp) -> lease_pb2.Lease:
    """The record after a renewal at `at`: it expires one ttl later (the only change)."""
    out = lease_pb2.Lease()
    out.CopyFrom(lease)
    out.expire_time.seconds = at.seconds + (lease.ttl.seconds or DEFAULT_TTL_S)
    out.expire_time.nanos = at.nanos
    return out


def renewal_moves(current: lease_pb2.Lease, new: lease_pb2.Lease) -> bool:
    """Whether a renewal is worth a write: it moves expire_time by at least a tenth of the ttl.
    A client renewing faster than that (the SDK renews every third of it) keeps the etcd lease
    alive but writes nothing; the record stays at most a tenth of the ttl early, never late."""
    step = (current.ttl.seconds or DEFAULT_TTL_S) * 1_000_000_000 // 10
    return new.expire_time.ToNanoseconds() - current.expire_time.ToNanoseconds() >= step


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


def queued(lease_id: str, tenant: str, spec: CreateSpec, now: timestamp_pb2.Timestamp) -> lease_pb2.Lease:
    """The record of a request that waits for capacity: what it asked, no GPU."""
    lease = _requested(lease_id, tenant, spec, now, QUEUED)
    lease.wait_expire_time.seconds = now.seconds + spec.max_wait_s
    lease.wait_expire_time.nanos = now.nanos
    return lease


def granted_from_queue(lease: lease_pb2.Lease, waiting: lease_pb2.Lease) -> lease_pb2.Lease:
    """A grant's record for a request that waited: queued at create_time, granted now."""
    lease.grant_time.CopyFrom(lease.create_time)
    lease.create_time.CopyFrom(waiting.create_time)
    lease.wait_expire_time.CopyFrom(waiting.wait_expire_time)
    return lease
