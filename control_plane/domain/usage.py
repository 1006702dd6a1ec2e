"""Usage records from ended leases: one per lease and provider, with the quoted cost."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from gpufed.v1 import admin_pb2, common_pb2, lease_pb2


def usage_records(lease: lease_pb2.Lease, end: timestamp_pb2.Timestamp) -> list[admin_pb2.UsageRecord]:
    lease_id = lease.name.split("/", 1)[1]
    # Billed from ACTIVE: a lease that never got there (PROVISIONING_FAILED, or it expired or
    # was released while provisioning) has a record of zero seconds.
    start = lease.active_time if lease.HasField("active_time") else end
    seconds = max(0.0, (end.ToNanoseconds() - start.ToNanoseconds()) / 1e9)
    by_provider: dict[str, list[lease_pb2.LeasedGpu]] = {}
    for g in lease.gpus:
        by_provider.setdefault(g.provider, []).append(g)
    out = []
    for provider, gpus in sorted(by_provider.items()):
        out.append(
            admin_pb2.UsageRecord(
                name=f"usageRecords/{lease_id}-{provider}",
                lease=lease.name,
                provider=provider,
                tenant=lease.tenant,
                gpus=gpus,
                start_time=start,
                end_time=end,
                gpu_seconds=round(seconds * len(gpus), 3),
                quoted_cost=round(sum(g.price_per_gpu_hour for g in gpus) * seconds / 3600.0, 6),
                currency_code=lease.currency_code,
                end_reason=lease.end_reason,
                pool=common_pb2.POOL_KIND_OWN
                if all(g.pool == common_pb2.POOL_KIND_OWN for g in gpus)
                else common_pb2.POOL_KIND_FEDERATION,
            )
        )
    return out
