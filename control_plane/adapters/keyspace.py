"""The etcd keyspace: where each record lives, and the one place keys are parsed back.

All under a configurable prefix (default /gpufed); every replica watches {prefix}/, and the
records in {prefix}.records/ (requests, history, usage, the journal) are read on demand,
never streamed to every replica's index:

  nodes/{provider}/{node_id}            Node record (gpufed.v1.Node, binary)
  alive/{provider}/{node_id}            session of the stream holding the node; on its replica's lease
  alloc/{provider}/{node_id}/{gpu_uuid} lease id; on the gpufed lease's etcd lease
  alloc/{provider}/{node_id}/{gpu_uuid}/{mig_uuid}
                                        the same for a MIG instance, under its parent GPU: a
                                        whole-GPU grant compares that range empty, an instance's
                                        grant compares the parent's key absent
  leases/{lease_id}                     Lease record; on its own etcd lease
  queue/{lease_id}                      a request waiting for capacity (QueuedLeaseRecord, binary;
                                        schema 3): deleted by the Txn that grants it (which
                                        writes leases/{lease_id}) or ends it
  calendar/{provider}/{node_id}         the node's calendar (NodeCalendar, binary; schema 3): the
                                        reservations' windows on its GPUs. Bookings, moves and
                                        cancellations rewrite it by CAS; grants and renewals on
                                        the node compare it unchanged
  reservations/{reservation_id}         Reservation record (binary; schema 3) while it is
                                        booked or active; its end moves it to the history
  tokens/{token_id}                     token record with the secret's hash
  replicas/{replica_id}                 peer address; on the replica's session lease
  members/{replica_id}                  the replica's release and the newest schema it
                                        understands (JSON, control_plane.domain.schema); on its
                                        session lease. Releases before 0.2.0 write none
  schema                                the schema the records are in (JSON); absent: schema 1
  leader                                replica id of the elected leader; on its session lease
  quotas/{tenants|providers}/{name}     a principal's quota overrides (JSON)
  burst/{tenant}                        the tenant's burst policy (JSON: max price, countries)

  .records/requests/{tenant}/{request_id}  lease id, for CreateLease idempotency
  .records/holds/{tenant}/{replica}/{lease} GPU count; on the lease's etcd lease. The grant Txn
                                           compares the other replicas' holds of the tenant
                                           unchanged since its count (its own replica counts
                                           its own grants itself): no two grants anywhere can
                                           both pass the tenant's quota
  .records/nodes/{provider}/{replica}/{node} written with a node's first record by the replica
                                           that registered it: a new node's Txn compares the
                                           other replicas' markers of the provider unchanged
                                           since its node count (its own it counts itself)
  .records/history/leases/{lease_id}       ended Lease records, by id (GetLease); on the hourly
                                           history etcd lease, so they expire by themselves
  .records/tenants/{tenant}/leases/{inverted create time}/{lease_id}
                                           the same record under its tenant, newest first: a
                                           tenant's ListLeases reads only its own range
  .records/journal/{lease_id}              the active Lease record, not on its etcd lease: written
                                           by the grant and each renewal, deleted by the Txn that
                                           writes the lease's usage records (exactly once)
  .records/usage/{provider}/{end time}/{lease_id}
                                           UsageRecord (by the release Txn, or by the leader for
                                           a lease whose journal outlived it: an expiry), in end
                                           time order per provider
  .records/tenant-usage/{tenant}/{end time}/{lease_id}/{provider}
                                           the same record under its tenant, written in the
                                           same Txn: each List reads only its caller's range.
                                           The leader exports both past the retention and
                                           deletes them (control_plane.app.retention)
  .records/reservation-requests/{tenant}/{request_id}
                                           reservation id, for CreateReservation idempotency
  .records/reserved/{tenant}/{id}          GPU-hours of a booked reservation (its tenant's quota):
                                           a booking compares the tenant's range unchanged since
                                           its count, its end deletes the key
  .records/history/reservations/{id}       ended Reservation records (GetReservation); on the
                                           hourly history etcd lease
  .records/tenant-reservations/{tenant}/{inverted create time}/{id}
                                           the same under its tenant, newest first
Times in keys are zero-padded nanoseconds (20 digits), so key order is time order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from control_plane.domain.names import node_name


class KeyKind(enum.Enum):
    NODE = "node"
    ALIVE = "alive"
    ALLOC = "alloc"
    LEASE = "lease"
    TOKEN = "token"
    REPLICA = "replica"
    LEADER = "leader"
    QUOTA = "quota"
    BURST = "burst"
    MEMBER = "member"
    SCHEMA = "schema"
    QUEUE = "queue"
    CALENDAR = "calendar"
    RESERVATION = "reservation"


class Key(NamedTuple):
    """A watched key, parsed: its kind and the resource it belongs to.

    name: the node's resource name (NODE, ALIVE, ALLOC), the lease id, token id or replica id,
    "{tenants|providers}/{principal}" (QUOTA);
    gpu: the GPU uuid of an ALLOC key.
    """

    kind: KeyKind
    name: str
    gpu: str = ""


# Times in record keys: nanoseconds since the epoch, zero-padded; MAX_NS - t sorts newest first.
MAX_NS = 10**20 - 1

# top directory -> (kind, number of parts below it)
_LAYOUT = {
    "nodes": (KeyKind.NODE, 2),
    "alive": (KeyKind.ALIVE, 2),
    "alloc": (KeyKind.ALLOC, 3),
    "leases": (KeyKind.LEASE, 1),
    "tokens": (KeyKind.TOKEN, 1),
    "replicas": (KeyKind.REPLICA, 1),
    "leader": (KeyKind.LEADER, 0),
    "quotas": (KeyKind.QUOTA, 2),
    "burst": (KeyKind.BURST, 1),
    "members": (KeyKind.MEMBER, 1),
    "schema": (KeyKind.SCHEMA, 0),
    "queue": (KeyKind.QUEUE, 1),
    "calendar": (KeyKind.CALENDAR, 2),
    "reservations": (KeyKind.RESERVATION, 1),
}


@dataclass(frozen=True, slots=True)
class Keyspace:
    prefix: str = "/gpufed"

    def _k(self, *parts: str) -> str:
        return "/".join((self.prefix.rstrip("/"), *parts))

    def node(self, provider: str, node_id: str) -> str:
        return self._k("nodes", provider, node_id)

    def alive(self, provider: str, node_id: str) -> str:
        return self._k("alive", provider, node_id)

    def alloc(self, provider: str, node_id: str, gpu_uuid: str, parent_uuid: str = "") -> str:
        if parent_uuid:
            return self._k("alloc", provider, node_id, parent_uuid, gpu_uuid)
        return self._k("alloc", provider, node_id, gpu_uuid)

    def alloc_instances(self, provider: str, node_id: str, gpu_uuid: str) -> str:
        """Prefix of the allocations of a GPU's MIG instances."""
        return self._k("alloc", provider, node_id, gpu_uuid) + "/"

    def lease(self, lease_id: str) -> str:
        return self._k("leases", lease_id)

    def queued(self, lease_id: str) -> str:
        return self._k("queue", lease_id)

    def calendar(self, provider: str, node_id: str) -> str:
        return self._k("calendar", provider, node_id)

    def reservation(self, reservation_id: str) -> str:
        return self._k("reservations", reservation_id)

    def token(self, token_id: str) -> str:
        return self._k("tokens", token_id)

    def replica(self, replica_id: str) -> str:
        return self._k("replicas", replica_id)

    @property
    def leader(self) -> str:
        return self._k("leader")

    def member(self, replica_id: str) -> str:
        return self._k("members", replica_id)

    @property
    def schema(self) -> str:
        return self._k("schema")

    def quota(self, kind: str, principal: str) -> str:
        return self._k("quotas", kind, principal)

    def burst(self, tenant: str) -> str:
        return self._k("burst", tenant)

    # Records (request ids, history, usage, the journal) live beside the watched state, in
    # {prefix}.records/: read on demand, never streamed to every replica's index.
    def _r(self, *parts: str) -> str:
        return "/".join((self.prefix.rstrip("/") + ".records", *parts))

    def request(self, tenant: str, request_id: str) -> str:
        return self._r("requests", tenant, request_id)

    def reservation_request(self, tenant: str, request_id: str) -> str:
        return self._r("reservation-requests", tenant, request_id)

    def reserved(self, tenant: str, reservation_id: str) -> str:
        return self._r("reserved", tenant, reservation_id)

    def reserved_dir(self, tenant: str) -> str:
        return self._r("reserved", tenant) + "/"

    def reservation_history(self, reservation_id: str) -> str:
        return self._r("history", "reservations", reservation_id)

    def tenant_reservation_history(self, tenant: str, create_ns: int, reservation_id: str) -> str:
        return self._r("tenant-reservations", tenant, f"{MAX_NS - create_ns:020d}", reservation_id)

    def tenant_reservations_dir(self, tenant: str | None = None) -> str:
        top = self._r("tenant-reservations")
        return f"{top}/{tenant}/" if tenant is not None else top + "/"

    def hold(self, tenant: str, replica: str, lease_id: str) -> str:
        return self._r("holds", tenant, replica, lease_id)

    def node_marker(self, provider: str, replica: str, node_id: str) -> str:
        return self._r("nodes", provider, replica, node_id)

    def node_markers_dir(self, provider: str) -> str:
        return self._r("nodes", provider) + "/"

    def holds_dir(self, tenant: str) -> str:
        return self._r("holds", tenant) + "/"

    def lease_history(self, lease_id: str) -> str:
        return self._r("history", "leases", lease_id)

    def tenant_history(self, tenant: str, create_ns: int, lease_id: str) -> str:
        return self._r("tenants", tenant, "leases", f"{MAX_NS - create_ns:020d}", lease_id)

    def tenant_history_dir(self, tenant: str | None = None) -> str:
        """One tenant's ended leases, or (None) every tenant's."""
        return self._r("tenants", tenant, "leases") + "/" if tenant is not None else self._r("tenants") + "/"

    def history_sort_key(self, key: bytes | str) -> str:
        """ "{tenant}/{inverted time}/{lease_id}" of a tenant history key: the order ListLeases
        pages in (a tenant's newest first; an operator's by tenant, then newest first)."""
        text = key.decode() if isinstance(key, bytes) else key
        tenant, _, inverted, lease_id = text[len(self._r("tenants")) + 1 :].split("/")
        return f"{tenant}/{inverted}/{lease_id}"

    def history_key_of(self, sort_key: str) -> str:
        tenant, inverted, lease_id = sort_key.split("/")
        return self._r("tenants", tenant, "leases", inverted, lease_id)

    def usage_record(self, provider: str, end_ns: int, lease_id: str) -> str:
        return self._r("usage", provider, f"{end_ns:020d}", lease_id)

    def tenant_usage(self, tenant: str, end_ns: int, lease_id: str, provider: str) -> str:
        return self._r("tenant-usage", tenant, f"{end_ns:020d}", lease_id, provider)

    def usage_dir(self, provider: str = "") -> str:
        """Every provider's usage records, or one provider's."""
        return self._r("usage", provider) + "/" if provider else self._r("usage") + "/"

    def tenant_usage_dir(self, tenant: str) -> str:
        return self._r("tenant-usage", tenant) + "/"

    def records_dir(self, name: str) -> str:
        return self._r(name) + "/"

    def journal(self, lease_id: str) -> str:
        return self._r("journal", lease_id)

    def dir(self, name: str) -> str:
        """Prefix of one top-level directory, with a trailing slash: dir('nodes') -> /gpufed/nodes/."""
        return self._k(name) + "/"

    @property
    def root(self) -> str:
        return self.prefix.rstrip("/") + "/"

    def relative(self, key: bytes | str) -> list[str]:
        """Path parts of a key below the prefix: /gpufed/nodes/p/n -> ['nodes', 'p', 'n']."""
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.root) :].split("/")

    def parse(self, key: bytes | str) -> Key | None:
        """The watched key's kind and resource; None for a key outside the layout."""
        parts = self.relative(key)
        layout = _LAYOUT.get(parts[0])
        if layout is None:
            return None
        kind = layout[0]
        if kind is KeyKind.ALLOC and len(parts) == 5:  # a MIG instance's, under its parent
            return Key(kind, node_name(parts[1], parts[2]), parts[4])
        if len(parts) != layout[1] + 1:
            return None
        if kind is KeyKind.QUOTA:
            return Key(kind, f"{parts[1]}/{parts[2]}")
        if len(parts) >= 3:  # nodes, alive, alloc: the node's resource name (and the GPU)
            return Key(kind, node_name(parts[1], parts[2]), parts[3] if len(parts) == 4 else "")
        return Key(kind, parts[1] if len(parts) == 2 else parts[0])
