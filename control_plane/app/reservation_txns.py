"""The etcd transactions of a reservation's life: booking, start (it becomes a lease), end."""

from __future__ import annotations

from collections.abc import Mapping

from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import TxnBuilder
from control_plane.app.lease_txns import calendar_is
from control_plane.domain import calendar
from control_plane.domain.placement import Pick
from control_plane.domain.reservation_rules import by_node
from gpufed.clock import ts_ns
from gpufed.v1 import lease_pb2, reservation_pb2


def _id(name: str) -> str:
    return name.split("/", 1)[1]


def book_txn(
    keys: Keyspace,
    record: reservation_pb2.Reservation,
    req_key: bytes | None,
    picks: list[Pick],
    calendars: Mapping[str, tuple[reservation_pb2.NodeCalendar | None, int]],
    index_revision: int,
    holders: Mapping[str, int],
    previous: tuple[reservation_pb2.Reservation, int] | None = None,
    quota_revision: int = 0,
) -> TxnBuilder:
    """The booking: the record, and its window on each node's calendar, if each calendar is as
    read (CAS: no other booking of those nodes meanwhile), each node is unchanged and alive, no
    GPU (or MIG instance of one) was granted after `index_revision` (the index the choice was
    made on), and the leases that hold them now (`holders`: lease id -> record revision; each
    ends before the window) were not renewed since. A move (`previous`: the record and its
    revision) compares the record unchanged instead of absent and takes its windows off the
    calendars of the nodes it leaves. A new booking compares the tenant's booked GPU-hours
    unchanged since `quota_revision` (the revision they were counted at) and adds its own."""
    txn = TxnBuilder()
    key = keys.reservation(_id(record.name)).encode()
    if previous is None:
        booked = keys.reserved_dir(record.tenant).encode()
        txn.range_unchanged_since(booked, quota_revision)
        txn.read_prefix_on_failure(booked)
        txn.put(keys.reserved(record.tenant, _id(record.name)).encode(), str(gpu_hours(record)).encode())
    if req_key is not None:
        txn.absent(req_key)
        txn.read_on_failure(req_key)
    if previous is None:
        txn.absent(key)
    else:
        txn.mod_revision_is(key, previous[1])
        staying = {p.candidate.name for p in picks}  # their calendars are rewritten below
        for left in by_node(previous[0]):
            if left in staying:
                continue
            _leave(txn, keys, left, calendars.get(left, (None, 0)), record.name)
    start, end = ts_ns(record.start_time), ts_ns(record.end_time)
    for p in picks:
        node = p.candidate.node
        cal_key = keys.calendar(node.provider, node.node_id).encode()
        cal, revision = calendars.get(p.candidate.name, (None, 0))
        calendar_is(txn, cal_key, revision)
        txn.mod_revision_is(keys.node(node.provider, node.node_id).encode(), p.candidate.mod_revision)
        txn.present(keys.alive(node.provider, node.node_id).encode())
        new = calendar.with_entry(cal, record.name, p.gpu_uuids, start, end)  # replaces its own
        txn.put(cal_key, new.SerializeToString())
        for u in p.gpu_uuids:
            # The GPU's allocation and its instances' (they sort under it): no grant since.
            txn.range_unchanged_since(keys.alloc(node.provider, node.node_id, u).encode(), index_revision)
    for lease_id, revision in sorted(holders.items()):
        txn.mod_revision_is(keys.lease(lease_id).encode(), revision)
    txn.put(key, record.SerializeToString())
    if req_key is not None:
        txn.put(req_key, _id(record.name).encode())
    return txn


def _leave(
    txn: TxnBuilder,
    keys: Keyspace,
    node: str,
    read: tuple[reservation_pb2.NodeCalendar | None, int],
    reservation: str,
) -> None:
    """The reservation's window off a node's calendar (compared as read; none left: deleted)."""
    cal, revision = read
    provider, node_id = node.split("/")[1], node.split("/")[3]
    key = keys.calendar(provider, node_id).encode()
    calendar_is(txn, key, revision)
    rest = calendar.without(cal, reservation)
    if rest.entries:
        txn.put(key, rest.SerializeToString())
    elif revision:
        txn.delete(key)


def gpu_hours(r: reservation_pb2.Reservation) -> float:
    """What a reservation counts in its tenant's max_reserved_gpu_hours."""
    return round(r.gpu_count * (ts_ns(r.end_time) - ts_ns(r.start_time)) / 3.6e12, 6)


def start_txn(
    txn: TxnBuilder,
    keys: Keyspace,
    reservation: reservation_pb2.Reservation,
    revision: int,
    started: reservation_pb2.Reservation,
    lease: lease_pb2.Lease,
    etcd_lease: int,
    mig_enabled: set[str],
) -> TxnBuilder:
    """The start (in the leader's fenced `txn`): the reservation unchanged becomes ACTIVE, and
    its lease is granted as any lease is (record, journal, one allocation per GPU on the etcd
    lease, each compared absent with its MIG instances' allocations)."""
    key = keys.reservation(_id(reservation.name)).encode()
    lease_id = _id(lease.name)
    lease_key = keys.lease(lease_id).encode()
    txn.mod_revision_is(key, revision)
    txn.absent(lease_key)
    txn.put(key, started.SerializeToString())
    value = lease.SerializeToString()
    txn.put(lease_key, value, etcd_lease)
    txn.put(keys.journal(lease_id).encode(), value)
    for g in reservation.gpus:
        alloc = keys.alloc(g.provider, g.node_id, g.uuid).encode()
        txn.absent(alloc)
        txn.put(alloc, lease_id.encode(), etcd_lease)
        if g.uuid in mig_enabled:
            txn.range_absent(keys.alloc_instances(g.provider, g.node_id, g.uuid).encode())
    return txn


def end_txn(
    txn: TxnBuilder,
    keys: Keyspace,
    reservation: reservation_pb2.Reservation,
    revision: int,
    final: reservation_pb2.Reservation,
    calendars: Mapping[str, tuple[reservation_pb2.NodeCalendar | None, int]],
    history_lease: int,
) -> TxnBuilder:
    """The end: the record (unchanged since read) moves to the history and its windows leave
    each node's calendar (each compared as read)."""
    rid = _id(reservation.name)
    key = keys.reservation(rid).encode()
    txn.mod_revision_is(key, revision)
    txn.delete(key)
    txn.delete(keys.reserved(reservation.tenant, rid).encode())
    for node in by_node(reservation):
        _leave(txn, keys, node, calendars.get(node, (None, 0)), reservation.name)
    value = final.SerializeToString()
    txn.put(keys.reservation_history(rid).encode(), value, history_lease)
    created = final.create_time.ToNanoseconds()
    txn.put(keys.tenant_reservation_history(final.tenant, created, rid).encode(), value, history_lease)
    if final.request_id:
        txn.put(
            keys.reservation_request(final.tenant, final.request_id).encode(), rid.encode(), history_lease
        )
    return txn
