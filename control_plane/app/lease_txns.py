"""The etcd transactions of a lease's life: grant, renewal record, release."""

from __future__ import annotations

from collections.abc import Callable

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import MAX_TXN_OPS, TxnBuilder, absent, mod_revision_is, prefix_end
from control_plane.domain.placement import Pick
from control_plane.domain.usage import usage_records
from gpufed.v1 import admin_pb2, lease_pb2


def grant_txn(
    keys: Keyspace,
    lease_id: str,
    record: bytes,
    req_key: bytes | None,
    etcd_lease: int,
    picks: list[Pick],
    tenant: str,
    replica: str,
    holds_revision: int,
    calendar_revision: Callable[[str], int],
) -> TxnBuilder:
    """The grant: the record, the request key (when the request has an id), the tenant's hold
    and one allocation per GPU on the etcd lease, if each allocation and the request are absent,
    each node is unchanged and alive, each node's calendar is as the grant read it
    (`calendar_revision(node)`, 0: none; a booking meanwhile could start before the lease's
    expire_time), and no other replica put a hold of the tenant after
    `holds_revision` (the revision its quota was counted at; this replica's own holds it counts
    itself). On failure it reads back the request key first, then the tenant's holds, each node
    and allocation (what made it fail)."""
    txn = TxnBuilder()
    lease_key = keys.lease(lease_id).encode()
    holds = keys.holds_dir(tenant).encode()
    own = (keys.holds_dir(tenant) + replica + "/").encode()
    value = lease_id.encode()
    if req_key is not None:
        txn.absent(req_key)
    txn.absent(lease_key)
    txn.range_unchanged_since(holds, holds_revision, end=own)  # replicas sorting before ours
    txn.range_unchanged_since(prefix_end(own), holds_revision, end=prefix_end(holds))  # after
    if req_key is not None:
        txn.read_on_failure(req_key)
    txn.read_prefix_on_failure(holds)
    txn.put(lease_key, record, etcd_lease)
    if req_key is not None:
        txn.put(req_key, value, etcd_lease)
    gpus = sum(len(p.gpu_uuids) for p in picks)
    txn.put(keys.hold(tenant, replica, lease_id).encode(), str(gpus).encode(), etcd_lease)
    # Not on the etcd lease: it outlives an expiry, so the leader finds what to bill.
    txn.put(keys.journal(lease_id).encode(), record)
    for p in picks:
        node = p.candidate.node
        node_key = keys.node(node.provider, node.node_id).encode()
        txn.mod_revision_is(node_key, p.candidate.mod_revision)
        txn.present(keys.alive(node.provider, node.node_id).encode())
        txn.read_on_failure(node_key)
        calendar_is(
            txn, keys.calendar(node.provider, node.node_id).encode(), calendar_revision(p.candidate.name)
        )
        by_uuid = {g.uuid: g for g in p.candidate.gpus}
        for u in p.gpu_uuids:
            gpu = by_uuid[u]
            parent = gpu.parent_uuid
            key = keys.alloc(node.provider, node.node_id, u, parent).encode()
            txn.absent(key)
            txn.put(key, value, etcd_lease)
            txn.read_on_failure(key)
            # A GPU and its MIG instances are never held together: an instance's grant needs
            # its parent free, a whole GPU's needs every instance free (one range compare).
            if parent:
                parent_key = keys.alloc(node.provider, node.node_id, parent).encode()
                txn.absent(parent_key)
                txn.guard(parent_key)
            elif gpu.mig_enabled:
                txn.range_absent(keys.alloc_instances(node.provider, node.node_id, u).encode())
    return txn


def calendar_compare(keys: Keyspace, node: str, revision: int) -> rpc.Compare:
    """The node's calendar record is the one read at `revision` (0: there is none)."""
    _, provider, _, node_id = node.split("/")
    key = keys.calendar(provider, node_id)
    return mod_revision_is(key, revision) if revision else absent(key)


def calendar_is(txn: TxnBuilder, key: bytes, revision: int) -> None:
    """The same in a Txn being built, with the key read back if it fails."""
    if revision:
        txn.mod_revision_is(key, revision)
    else:
        txn.absent(key)
    txn.read_on_failure(key)


def release_txn(
    keys: Keyspace, lease: lease_pb2.Lease, revision: int, final: lease_pb2.Lease, history_lease: int
) -> TxnBuilder:
    """The end of an active lease: if its record is unchanged, delete it and its allocations,
    keep the final record and the spent request id (if any) as history, and write its usage
    records and delete its journal entry: exactly once, since the compare holds only once.
    (A lease too wide for one Txn leaves its journal entry to the leader, which bills from the
    history written here.)"""
    lease_id = lease.name.split("/", 1)[1]
    key = keys.lease(lease_id).encode()
    txn = TxnBuilder()
    txn.mod_revision_is(key, revision)
    txn.delete(key)
    put_history(txn, keys, final, history_lease)
    txn.delete(keys.hold(lease.tenant, lease.grant_replica, lease_id).encode())
    if lease.request_id:
        txn.put(keys.request(lease.tenant, lease.request_id).encode(), lease_id.encode(), history_lease)
    for g in lease.gpus:
        txn.delete(keys.alloc(g.provider, g.node_id, g.uuid, g.parent_uuid).encode())
    records = usage_records(final, final.end_time)
    if len(txn.req.success) + 2 * len(records) + 1 <= MAX_TXN_OPS:
        put_usage(txn, keys, records)
        txn.delete(keys.journal(lease_id).encode())
    return txn


def put_history(txn: TxnBuilder, keys: Keyspace, final: lease_pb2.Lease, history_lease: int) -> None:
    """The ended record by id and under its tenant (newest first), on the history etcd lease."""
    lease_id = final.name.split("/", 1)[1]
    value = final.SerializeToString()
    txn.put(keys.lease_history(lease_id).encode(), value, history_lease)
    created = final.create_time.ToNanoseconds()
    txn.put(keys.tenant_history(final.tenant, created, lease_id).encode(), value, history_lease)


def put_usage(txn: TxnBuilder, keys: Keyspace, records: list[admin_pb2.UsageRecord]) -> None:
    """Each record under its provider and under its tenant, in end time order."""
    for r in records:
        lease_id, end, value = r.lease.split("/", 1)[1], r.end_time.ToNanoseconds(), r.SerializeToString()
        txn.put(keys.usage_record(r.provider, end, lease_id).encode(), value)
        txn.put(keys.tenant_usage(r.tenant, end, lease_id, r.provider).encode(), value)
