"""Nodes: the daemon's stream protocol, registration, health, liveness and assignment fan-out.

A daemon holds one stream to one replica. Its first message is a hello: the node is registered
(the record written only when it changed), its `alive` key put on this replica's session lease,
and a welcome sent back. Then reports (kept in memory: control_plane.app.telemetry), events and
acks flow in, and lease assignments and operator commands flow out. Steady-state reports write
nothing to etcd; only registration, inventory, health, price and liveness transitions do.

A session ends once, whoever ends it (the stream, the liveness sweeper, a takeover by a newer
stream, shutdown); its alive key is deleted only by compare-and-swap on its own session value,
so a takeover on another replica is never undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from google.protobuf import duration_pb2

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.store import (
    CAS_ATTEMPTS,
    EtcdStore,
    KeyValue,
    StoreUnavailable,
    WritesRefused,
    delete,
    none_created_since,
    prefix_end,
    put,
    value_is,
)
from control_plane.app.quotas import Quotas
from control_plane.app.telemetry import TelemetryRings
from control_plane.domain import errors, lease_rules, registration, versions
from control_plane.domain.errors import DomainError
from control_plane.domain.names import node_name
from control_plane.domain.quotas import TokenBucket, rate_limited
from control_plane.metrics import Metrics
from gpufed import __version__
from gpufed.clock import SYSTEM, Clock, now_ts
from gpufed.logs import get_logger
from gpufed.v1 import common_pb2, lease_pb2, node_pb2

log = get_logger(__name__)
# The release this replica runs: what the daemon version skew policy is measured from.
RELEASE = versions.release(__version__)

NodeState = common_pb2.NodeState
Reported: TypeAlias = dict[str, tuple[Any, list[common_pb2.HealthReason]]]
_UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY
_LEASE, _ALIVE, _NODE, _RESYNC = ChangeKind.LEASE, ChangeKind.ALIVE, ChangeKind.NODE, ChangeKind.RESYNC


HELLO_TIMEOUT_S = 10.0


@dataclass
class NodeSession:
    name: str
    provider: str
    node_id: str
    session_id: str
    last_seen: float  # monotonic
    outgoing: asyncio.Queue[node_pb2.ControlMessage | None] = field(default_factory=asyncio.Queue)
    end_error: DomainError | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    sent_started: dict[str, int] = field(default_factory=dict)  # lease name -> fencing token
    admin_state: int = 0
    # Called once when the session ends, whoever ends it (reader, sweeper, takeover, shutdown):
    # the cleanup must not depend on gRPC still driving the response generator.
    on_end: Callable[[NodeSession], None] | None = None
    closed: bool = False
    # Messages allowed beyond the answers owed (the provider's report rate); None: unlimited.
    bucket: TokenBucket | None = None
    # Answers the daemon owes for what was sent it (an ack per assignment, a ProvisionResult
    # per STARTED): those are free; any other message, of any kind, takes from the bucket.
    owed: int = 0
    last_health_write: float = float("-inf")  # monotonic
    # GPU uuid -> the operator clear (GpuRepair.cleared_time, ns) the daemon was told of.
    clears: dict[str, int] = field(default_factory=dict)

    @property
    def alive_value(self) -> str:
        return self.session_id

    def end(self, error: DomainError | None) -> None:
        if not self.ended.is_set():
            self.end_error = error
            self.ended.set()
            if self.on_end is not None:
                self.on_end(self)
            self.outgoing.put_nowait(None)


def _replaced(where: str) -> DomainError:
    return errors.aborted("SESSION_REPLACED", f"a newer stream for this node took over{where}")


class Nodes:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        replica_id: str,
        session_lease: Callable[[], int],
        report_interval: float = 2.0,
        grace_intervals: float = 3.0,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM,
        trust_domain: str | None = None,
        quotas: Quotas | None = None,
        health_write_interval: float = 10.0,
    ) -> None:
        self.health_write_interval = health_write_interval
        # A stream that sends no hello within this long ends (it holds a stream slot meanwhile).
        self.hello_timeout = HELLO_TIMEOUT_S
        self.quotas = quotas or Quotas(store, inventory, clock=clock)
        # Set (mTLS on): a daemon's certificate must name the provider of its token.
        self.trust_domain = trust_domain
        self.store = store
        self.keys = store.keys
        self.inventory = inventory
        self.replica_id = replica_id
        self.session_lease = session_lease
        self.report_interval = report_interval
        self.grace = report_interval * grace_intervals
        self.metrics = metrics
        self.clock = clock
        self.sessions: dict[str, NodeSession] = {}
        self.telemetry = TelemetryRings()
        self.reports_ingested = 0
        self._unsubscribe = inventory.subscribe(self._on_change)
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        # Set by the replica: ends a lease (Leases.end), for a hello that drops a leased GPU.
        self.end_lease: Callable[[str, int, str], Awaitable[object]] | None = None
        # Set by the replica: records a hook's ProvisionResult (Leases.provisioned).
        self.on_provisioned: Callable[[str, node_pb2.ProvisionResult], Awaitable[str]] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="liveness-sweeper")

    async def stop(self) -> None:
        self._unsubscribe()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for s in list(self.sessions.values()):
            s.end(errors.unavailable("REPLICA_SHUTTING_DOWN", "the replica is shutting down; reconnect"))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def tell_move(self, reason: str) -> None:
        """Ask every daemon streaming here to move to another replica now (shutdown)."""
        cmd = node_pb2.NodeCommand(type=node_pb2.NODE_COMMAND_TYPE_RECONNECT, reason=reason)
        for s in list(self.sessions.values()):
            s.outgoing.put_nowait(node_pb2.ControlMessage(command=cmd))

    # -- the stream -----------------------------------------------------------------------------

    async def open(
        self, first: node_pb2.NodeMessage, provider: str, cert_uris: list[str], pool_tenant: str = ""
    ) -> NodeSession:
        """A session from the stream's first message, which must be a hello of `provider`;
        with mTLS on, from a daemon whose certificate (`cert_uris`) names that provider. A token
        private to a tenant (`pool_tenant`) puts the node into that tenant's private pool."""
        if self.trust_domain is not None:
            registration.check_certificate(provider, cert_uris, self.trust_domain)
        if first.WhichOneof("message") != "hello":
            raise errors.invalid(
                "HELLO_REQUIRED", "the first message of a Connect stream must be a hello", field="hello"
            )
        hello = first.hello
        registration.validate_hello(hello, provider)
        versions.check_daemon(hello.daemon_version, RELEASE)
        name = node_name(hello.provider, hello.node_id)
        self.quotas.take_connect(provider, name)
        await self._end_leases_on_removed_gpus(name, hello)  # before the GPU leaves the record
        await self._register(hello, pool_tenant)
        await self._end_leases_on_removed_gpus(name, hello)  # a grant that raced the hello
        session = NodeSession(
            name,
            hello.provider,
            hello.node_id,
            f"{self.replica_id}/{uuid.uuid4().hex[:12]}",
            self.clock.monotonic(),
            bucket=self.quotas.report_bucket(hello.provider),
        )
        session.on_end = self._schedule_close
        old = self.sessions.get(name)
        if old is not None:
            old.end(_replaced(""))
        self.sessions[name] = session
        if self.metrics is not None:
            self.metrics.streams.set(len(self.sessions))
        await self.store.put(
            self.keys.alive(hello.provider, hello.node_id),
            session.alive_value.encode(),
            lease=self.session_lease(),
        )
        log.info("node connected", node=name, session=session.session_id)
        return session

    async def serve(
        self, session: NodeSession, requests: AsyncIterator[node_pb2.NodeMessage]
    ) -> AsyncIterator[node_pb2.ControlMessage]:
        """The session's outgoing messages (welcome, assignments, commands) while its incoming
        ones are read; raises the session's end error, if any, when it ends."""
        reader = asyncio.create_task(self._read(session, requests))
        try:
            yield node_pb2.ControlMessage(
                welcome=node_pb2.Welcome(
                    session_id=session.session_id,
                    replica=self.replica_id,
                    report_interval=duration_pb2.Duration(
                        seconds=int(self.report_interval), nanos=int((self.report_interval % 1) * 1e9)
                    ),
                    node=session.name,
                )
            )
            for msg in self._initial_assignments(session):
                _owe(session, msg)
                yield msg
            while (out := await session.outgoing.get()) is not None:
                _owe(session, out)
                yield out
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self._close(session)
        if session.end_error is not None:
            raise session.end_error

    async def _read(self, session: NodeSession, requests: AsyncIterator[node_pb2.NodeMessage]) -> None:
        try:
            async for msg in requests:
                session.last_seen = now = self.clock.monotonic()
                kind = msg.WhichOneof("message")
                if kind in ("assignment_ack", "provisioned") and session.owed > 0:
                    session.owed -= 1
                elif session.bucket is not None:
                    wait = session.bucket.take(now)
                    if wait:
                        session.end(rate_limited("the node passed its provider's message rate", wait))
                        return
                if kind == "report":
                    await self._ingest(session, msg.report)
                elif kind == "event":
                    await self._event(session, msg.event)
                elif kind == "assignment_ack":
                    ack = msg.assignment_ack
                    if not ack.accepted:
                        log.warning(
                            "daemon rejected an assignment",
                            node=session.name,
                            lease=ack.lease,
                            reason=ack.reason,
                        )
                elif kind == "provisioned":
                    await self._provisioned(session, msg.provisioned)
                elif kind == "hello":
                    session.end(
                        errors.invalid(
                            "UNEXPECTED_HELLO", "hello is only valid as the first message", field="hello"
                        )
                    )
                    return
            session.end(None)
        except asyncio.CancelledError:
            raise
        except DomainError as e:
            session.end(e)
        except StoreUnavailable as e:
            reason = "SCHEMA_TOO_NEW" if isinstance(e, WritesRefused) else "ETCD_UNAVAILABLE"
            session.end(errors.unavailable(reason, str(e)))
        except Exception:
            log.exception("node stream reader failed", node=session.name)
            session.end(
                errors.DomainError(errors.Code.INTERNAL, "INTERNAL_ERROR", "the replica failed; reported")
            )

    async def _end_leases_on_removed_gpus(self, name: str, hello: node_pb2.NodeHello) -> None:
        """End every lease holding a GPU (or MIG instance) the hello no longer has: it would stay
        billed on a GPU that is gone while the GPU's new uuid is offered free."""
        if self.end_lease is None:
            return
        present = {g.uuid for g in hello.gpus}
        gone = sorted(
            {lease for gpu, lease in self.inventory.held(name).items() if not set(gpu.split("/")) <= present}
        )
        for lease_id in gone:
            await self.end_lease(
                lease_id,
                lease_pb2.LEASE_END_REASON_GPU_REMOVED,
                f"node {name} came back without a GPU of the lease",
            )
            log.warning("lease ended: its GPU left the node's inventory", node=name, lease=lease_id)

    async def _provisioned(self, session: NodeSession, result: node_pb2.ProvisionResult) -> None:
        if self.on_provisioned is None:
            return
        try:
            outcome = await self.on_provisioned(session.name, result)
        except DomainError as e:  # about the lease (e.g. it kept changing), not the stream
            outcome = f"not recorded: {e.reason}"
        # Not the details: they may hold what only the tenant should read.
        log.info("lease hook answered", node=session.name, lease=result.lease, ok=result.ok, outcome=outcome)

    def _schedule_close(self, session: NodeSession) -> None:
        task = asyncio.get_running_loop().create_task(self._close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, session: NodeSession) -> None:
        if session.closed:
            return
        session.closed = True
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
            self.telemetry.drop(session.name)
            if self.metrics is not None:
                self.metrics.streams.set(len(self.sessions))
        # Only the owner may take the node offline: a takeover by another stream stays.
        key = self.keys.alive(session.provider, session.node_id)
        with contextlib.suppress(StoreUnavailable):
            await self.store.txn([value_is(key, session.alive_value.encode())], [delete(key)])
        log.info(
            "node disconnected",
            node=session.name,
            session=session.session_id,
            reason=session.end_error.reason if session.end_error else "STREAM_ENDED",
        )

    # -- registration and health ----------------------------------------------------------------

    async def _register(self, hello: node_pb2.NodeHello, pool_tenant: str = "") -> None:
        """Write the node record if the hello changed it, within the provider's node quota.

        A new node's record is written with this replica's marker of it, if no other replica
        created a marker of the provider since the count (control_plane.app.quotas counts this
        replica's own): registrations on several replicas cannot all pass the quota, and a
        fleet coming up on one replica does not contend. A loser counts again once its index
        has moved."""
        now = now_ts(self.clock)
        name = node_name(hello.provider, hello.node_id)
        markers = self.keys.node_markers_dir(hello.provider)
        own = f"{markers}{self.replica_id}/"

        def merge(kv: KeyValue | None) -> bytes | None:
            existing = common_pb2.Node.FromString(kv.value) if kv else None
            record = registration.record_from_hello(hello, existing, now, pool_tenant)
            if existing is not None and registration.same_record(existing, record):
                return None
            return record.SerializeToString()

        for n in range(CAS_ATTEMPTS):
            reservation = self.quotas.reserve_node(hello.provider, name, registration.whole_gpus(hello.gpus))
            seen = reservation.revision if reservation is not None else self.inventory.revision
            on_create = (
                [
                    none_created_since(markers, own, seen),
                    none_created_since(prefix_end(own.encode()), prefix_end(markers.encode()), seen),
                ],
                [put(self.keys.node_marker(hello.provider, self.replica_id, hello.node_id), b"")],
            )
            created = 0
            try:
                updated = await self.store.update(
                    self.keys.node(hello.provider, hello.node_id),
                    merge,
                    what="the node record",
                    reason="REGISTRATION_CONFLICT",
                    on_create=on_create,
                    attempts=2,
                )
                created = updated.revision if updated.created else 0
                return
            except DomainError as e:
                if e.reason != "REGISTRATION_CONFLICT" or n == CAS_ATTEMPTS - 1:
                    raise
            finally:
                if reservation is not None:
                    reservation.done(created)
            await self.inventory.wait_for_revision(seen + 1, timeout=0.5)

    async def _update_health(self, session: NodeSession, reported: Reported) -> None:
        now = now_ts(self.clock)

        def fold(kv: KeyValue | None) -> bytes | None:
            if kv is None:
                return None
            node = common_pb2.Node.FromString(kv.value)
            if not registration.apply_health(node, reported, now):
                return None
            node.update_time.CopyFrom(now)
            return node.SerializeToString()

        entry = self.inventory.nodes.get(session.name)
        key = self.keys.node(session.provider, session.node_id)
        known = (
            KeyValue(key.encode(), entry.node.SerializeToString(), entry.mod_revision, 0, 0)
            if entry
            else None
        )
        session.last_health_write = self.clock.monotonic()
        updated = await self.store.update(
            key, fold, known=known, what="the node record", reason="NODE_CHANGING"
        )
        if updated.revision:
            await self.inventory.wait_for_revision(updated.revision, timeout=1.0)
            log.info(
                "gpu health changed",
                node=session.name,
                gpus={u: common_pb2.GpuHealth.Name(h) for u, (h, _) in reported.items()},
            )

    def _health_differs(self, session: NodeSession, reported: Reported) -> bool:
        """Whether the node record should be written for this health: at once when a GPU turns
        UNHEALTHY (it must leave the offers), other changes at most once per
        health_write_interval (a flapping GPU must not write etcd on every report; reports
        carry the whole health, so the next one after the interval writes the latest). A GPU
        stays UNHEALTHY within a session, unless only a lease's unfinished end made it so."""
        entry = self.inventory.nodes.get(session.name)
        if entry is None:
            return False
        differs = False
        for gpu in entry.node.gpus:
            got = reported.get(gpu.uuid)
            if got is None or got[0] in (0, gpu.health):
                continue
            if gpu.health == _UNHEALTHY:
                if registration.cleanup_only(gpu.health_reasons):
                    return True  # the host finished a lease's end: the GPU is offered again at once
                continue
            if got[0] == _UNHEALTHY:
                return True
            differs = True
        return differs and self.clock.monotonic() - session.last_health_write >= self.health_write_interval

    async def _ingest(self, session: NodeSession, report: common_pb2.NodeReport) -> None:
        size = report.ByteSize()
        reported = registration.reported_health(report, size)  # INVALID_ARGUMENT ends the stream
        self.telemetry.add(session.name, report, size)
        self.reports_ingested += 1
        if self.metrics is not None:
            self.metrics.reports.inc()
        if self._health_differs(session, reported):
            await self._update_health(session, reported)

    async def _event(self, session: NodeSession, event: node_pb2.NodeEvent) -> None:
        # Validated first: an unknown health value would break GpuHealth.Name below.
        where = f"event of GPU {errors.shown(event.gpu_uuid)}"
        registration.validate_health(event.health, event.health_reasons, where, "event.health")
        log.warning(
            "node event",
            node=session.name,
            gpu=event.gpu_uuid,
            kind=event.WhichOneof("event"),
            xid=event.xid.xid if event.HasField("xid") else None,
            health=common_pb2.GpuHealth.Name(event.health),
        )
        reported = {event.gpu_uuid: (event.health, list(event.health_reasons))}
        if self._health_differs(session, reported):
            await self._update_health(session, reported)

    # -- liveness -------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.report_interval / 2))
            self.sweep_once()

    def sweep_once(self) -> None:
        """End every session silent for longer than the grace period."""
        now = self.clock.monotonic()
        for s in list(self.sessions.values()):
            if now - s.last_seen > self.grace:
                log.warning(
                    "node silent past the grace period", node=s.name, silent_s=round(now - s.last_seen, 1)
                )
                s.end(errors.unavailable("REPORT_TIMEOUT", "no report within the grace period; reconnect"))

    async def reattach(self, lease_id: int) -> None:
        """After the session lease was replaced: put every alive key again on the new lease."""
        for s in list(self.sessions.values()):
            with contextlib.suppress(StoreUnavailable):
                await self.store.put(
                    self.keys.alive(s.provider, s.node_id), s.alive_value.encode(), lease=lease_id
                )

    # -- assignments and commands ---------------------------------------------------------------

    @staticmethod
    def _assignment(
        lease: lease_pb2.Lease, node: str, action: int, token: int
    ) -> node_pb2.ControlMessage | None:
        uuids = [g.uuid for g in lease.gpus if g.node == node]
        if not uuids:
            return None
        return node_pb2.ControlMessage(
            assignment=node_pb2.LeaseAssignment(
                lease=lease.name,
                gpu_uuids=uuids,
                tenant=lease.tenant,
                expire_time=lease.expire_time,
                fencing_token=token,
                action=action,  # type: ignore[arg-type]
                access=lease.access if action == node_pb2.ASSIGNMENT_ACTION_STARTED else None,
            )
        )

    def _initial_assignments(self, session: NodeSession) -> list[node_pb2.ControlMessage]:
        out = self._sync_assignments(session)
        # The daemon may hold leases from before (it restarted, or its last stream died before
        # an ENDED reached it): whatever was not just started again, it ends.
        synced = node_pb2.NodeCommand(type=node_pb2.NODE_COMMAND_TYPE_ASSIGNMENTS_SYNCED)
        out.append(node_pb2.ControlMessage(command=synced))
        entry = self.inventory.nodes.get(session.name)
        session.admin_state = entry.node.state if entry else 0
        if entry is not None:
            session.clears = _operator_clears(entry.node)  # a new daemon has nothing to forget
        if session.admin_state in (NodeState.NODE_STATE_CORDONED, NodeState.NODE_STATE_DRAINING):
            out.append(_command_for(session.admin_state, entry.node.state_reason if entry else ""))
        return out

    def _sync_assignments(self, session: NodeSession) -> list[node_pb2.ControlMessage]:
        """STARTED for active leases on the node not sent yet, ENDED for sent ones that are gone:
        the whole diff against the index (a new session, or after a resync)."""
        out = []
        active: set[str] = set()
        for lease in list(self.inventory.leases.values()):
            if not lease_rules.is_live(lease) or not any(g.node == session.name for g in lease.gpus):
                continue
            active.add(lease.name)
            if lease.name not in session.sent_started:
                msg = self._assignment(
                    lease, session.name, node_pb2.ASSIGNMENT_ACTION_STARTED, lease.fencing_token
                )
                if msg is not None:
                    session.sent_started[lease.name] = lease.fencing_token
                    out.append(msg)
        for name in [n for n in session.sent_started if n not in active]:
            token = session.sent_started.pop(name)
            out.append(
                node_pb2.ControlMessage(
                    assignment=node_pb2.LeaseAssignment(
                        lease=name, fencing_token=token, action=node_pb2.ASSIGNMENT_ACTION_ENDED
                    )
                )
            )
        return out

    def _on_change(self, change: Change) -> None:
        kind = change.kind
        if kind is _LEASE:
            self._on_lease(change)
        elif kind is _ALIVE:
            s = self.sessions.get(change.name)
            if s is not None and change.value is not None and change.value.decode() != s.alive_value:
                s.end(_replaced(" on another replica"))
        elif kind is _NODE and change.value is not None:
            s = self.sessions.get(change.name)
            if s is not None:
                record = common_pb2.Node.FromString(change.value)
                self._sync_state(s, record)
        elif kind is _RESYNC:
            self._resync()

    def _on_lease(self, change: Change) -> None:
        # The index's copy carries the fencing token (the record's create revision).
        lease = change.lease
        if lease is None:
            return  # a record the index never held: no assignment of it was ever sent
        for node in {g.node for g in lease.gpus}:
            s = self.sessions.get(node)
            if s is None:
                continue
            if change.value is not None and lease_rules.is_live(lease):
                if lease.name in s.sent_started:
                    continue  # a renewal: the daemon already has it
                token = s.sent_started[lease.name] = lease.fencing_token
                action = node_pb2.ASSIGNMENT_ACTION_STARTED
            elif lease.name in s.sent_started:
                # An expired record (deleted while active) holds no token: use the one sent.
                token = s.sent_started.pop(lease.name)
                action = node_pb2.ASSIGNMENT_ACTION_ENDED
            else:
                continue
            msg = self._assignment(lease, node, action, token)
            if msg is not None:
                s.outgoing.put_nowait(msg)

    def _sync_state(self, s: NodeSession, record: common_pb2.Node) -> None:
        if record.state != s.admin_state:
            s.admin_state = record.state
            s.outgoing.put_nowait(_command_for(record.state, record.state_reason))
        clears = _operator_clears(record)
        fresh = [u for u, t in clears.items() if t > s.clears.get(u, 0)]
        s.clears = clears
        if fresh:  # an operator cleared these (SetGpuHealthy): the daemon forgets their XIDs
            cmd = node_pb2.NodeCommand(
                type=node_pb2.NODE_COMMAND_TYPE_CLEAR_GPU_FAULTS,
                gpu_uuids=fresh,
                reason="cleared by an operator",
            )
            s.outgoing.put_nowait(node_pb2.ControlMessage(command=cmd))

    def _resync(self) -> None:
        """The index was re-listed: changes in the gap were never seen, so each session is
        compared with the index as it is now (takeover, assignments, operator state)."""
        for s in list(self.sessions.values()):
            holder = self.inventory.alive.get(s.name)
            if holder is not None and holder != s.alive_value:
                s.end(_replaced(" on another replica"))
                continue
            for msg in self._sync_assignments(s):
                s.outgoing.put_nowait(msg)
            entry = self.inventory.nodes.get(s.name)
            if entry is not None:
                self._sync_state(s, entry.node)


def _operator_clears(node: common_pb2.Node) -> dict[str, int]:
    return {
        g.uuid: g.repair.cleared_time.ToNanoseconds()
        for g in node.gpus
        if g.HasField("repair") and g.repair.cleared_by not in ("", "reboot")
    }


def _command_for(state: int, reason: str) -> node_pb2.ControlMessage:
    kind = {
        NodeState.NODE_STATE_CORDONED: node_pb2.NODE_COMMAND_TYPE_CORDON,
        NodeState.NODE_STATE_DRAINING: node_pb2.NODE_COMMAND_TYPE_DRAIN,
    }.get(state, node_pb2.NODE_COMMAND_TYPE_UNCORDON)  # type: ignore[call-overload]
    return node_pb2.ControlMessage(command=node_pb2.NodeCommand(type=kind, reason=reason))


def _owe(session: NodeSession, msg: node_pb2.ControlMessage) -> None:
    """What the daemon may answer for free to a message sent it."""
    if msg.WhichOneof("message") == "assignment":
        session.owed += 2 if msg.assignment.action == node_pb2.ASSIGNMENT_ACTION_STARTED else 1
