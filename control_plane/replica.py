"""One control plane replica: the etcd session, the index, the servicers and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_plane.adapters.audit_ring import AuditRing
from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.peer import PeerClient
from control_plane.adapters.store import EtcdAuth, EtcdStore, EtcdTls, Session, StoreUnavailable
from control_plane.adapters.watcher import Watcher
from control_plane.app.admin import Admin
from control_plane.app.burst import BurstPolicies
from control_plane.app.discovery import Discovery
from control_plane.app.leader import Leader
from control_plane.app.leases import Leases
from control_plane.app.nodes import Nodes
from control_plane.app.queue import Queue
from control_plane.app.quotas import Quotas
from control_plane.app.reservations import Reservations
from control_plane.app.retention import DAY_S
from control_plane.app.telemetry import Telemetry
from control_plane.auth import Authenticator, Kind, TokenRecord
from control_plane.config import Config, ConfigError, check_tokens, read_pem
from control_plane.domain import schema
from control_plane.metrics import Metrics
from control_plane.rpc import RpcWrapper, Services
from control_plane.servicers.admin import AdminServicer
from control_plane.servicers.discovery import DiscoveryServicer
from control_plane.servicers.lease import LeaseServicer
from control_plane.servicers.node import NodeServicer
from control_plane.servicers.reservation import ReservationServicer
from control_plane.servicers.telemetry import PeerServicer, TelemetryServicer
from control_plane.tls import ReloadingCertificates, TlsConfigError, check_console_listen, check_listeners
from gpufed import __version__
from gpufed.clock import SYSTEM, Clock
from gpufed.logs import get_logger
from gpufed.transport import SERVER_OPTIONS
from gpufed.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
    reservation_pb2,
    reservation_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

log = get_logger(__name__)
_TOKEN, _RESYNC, _SCHEMA = ChangeKind.TOKEN, ChangeKind.RESYNC, ChangeKind.SCHEMA

SERVICE_NAMES = [
    node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name,
    lease_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
    reservation_pb2.DESCRIPTOR.services_by_name["ReservationService"].full_name,
    telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    peer_pb2.DESCRIPTOR.services_by_name["PeerService"].full_name,
]
# What NOSPACE stops: leases and node registration write etcd (discovery, telemetry and reads
# of leases keep working).
WRITE_SERVICES = (
    lease_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
    reservation_pb2.DESCRIPTOR.services_by_name["ReservationService"].full_name,
    node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
)
HEALTH_CHECK_S = 0.5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def etcd_tls(cfg: Config) -> EtcdTls | None:
    """TLS to etcd when a CA is given; a client certificate when etcd checks them."""
    ca = read_pem(cfg.etcd_ca, "--etcd-ca")
    if ca is None:
        if cfg.etcd_cert or cfg.etcd_key:
            raise ConfigError("--etcd-cert and --etcd-key need --etcd-ca")
        return None
    if bool(cfg.etcd_cert) != bool(cfg.etcd_key):
        raise ConfigError("--etcd-cert and --etcd-key go together")
    return EtcdTls(ca, read_pem(cfg.etcd_cert, "--etcd-cert"), read_pem(cfg.etcd_key, "--etcd-key"))


def peer_credentials(cfg: Config) -> grpc.ChannelCredentials | None:
    """How this replica reaches its peers: TLS when it serves TLS (they serve alike), trusting
    the peer CA (default: the client CA, else the system roots)."""
    if not cfg.tls_cert:
        return None
    ca = cfg.peer_ca or cfg.client_ca
    return grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes() if ca else None)


class Replica:
    def __init__(self, config: Config, clock: Clock = SYSTEM) -> None:
        self.config = config
        self.clock = clock
        self.id = config.replica_id
        self.metrics = Metrics()
        self.admin_tokens = 0  # real admin tokens in etcd, counted while the bootstrap token is on
        self.shutdown = asyncio.Event()
        self.port = 0
        self.node_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: object | None = None
        self.console: Any = None  # control_plane.console.server.ConsoleServer with --console-listen
        # This replica's recent audit events (AdminService.ListAuditEvents), from its start on.
        self.audit_ring = AuditRing()
        self.address = ""

    async def start(self) -> None:
        cfg = self.config
        check_listeners(cfg.listen, cfg.tls_cert, cfg.tls_key, cfg.client_ca, cfg.node_listen, cfg.insecure)
        check_console_listen(cfg.console_listen, cfg.tls_cert)
        self.audit_ring.attach()
        check_tokens(cfg.admin_token, cfg.peer_token)
        if not cfg.peer_token:
            log.warning(
                "no GPUFED_PEER_TOKEN: telemetry of nodes streaming to other replicas is not forwarded"
            )
        auth = EtcdAuth(cfg.etcd_user, cfg.etcd_password) if cfg.etcd_user else None
        self.store = EtcdStore(cfg.etcd_endpoints, cfg.etcd_prefix, tls=etcd_tls(cfg), auth=auth)
        await self.store.revision()  # fails fast on credentials etcd refuses (StoreRefused)
        self.inventory = Inventory(self.store.keys)
        self.auth = Authenticator(self.store, cfg.admin_token, cfg.peer_token, self.clock)
        self._background: set[asyncio.Task[None]] = set()
        self.auth.throttle.limit = cfg.auth_failures_per_minute
        self.inventory.subscribe(self._on_change)
        self.metrics.watch_inventory(self.inventory)
        self.session = Session(self.store, cfg.session_ttl, on_new_lease=self._on_new_session_lease)
        await self.session.start()
        self.watcher = Watcher(self.store, self.inventory)
        self._tasks.append(asyncio.create_task(self.watcher.run(), name="watcher"))
        # The first listing: ~10 s at 100,000 nodes on one core (BENCHMARKS.md, scale).
        async with asyncio.timeout(300):
            await self.watcher.synced.wait()
        self._check_schema()  # before anything is written

        await self._check_bootstrap_token()
        self.quotas = Quotas(self.store, self.inventory, cfg.tenant_quota, cfg.provider_quota, self.clock)
        self.nodes = Nodes(
            self.store,
            self.inventory,
            self.id,
            lambda: self.session.lease_id,
            cfg.report_interval,
            cfg.grace_intervals,
            self.metrics,
            self.clock,
            trust_domain=cfg.trust_domain if cfg.client_ca else None,
            quotas=self.quotas,
            health_write_interval=cfg.health_write_interval,
        )
        self.leases = Leases(
            self.store,
            self.inventory,
            self.metrics,
            self.clock,
            self.shutdown,
            self.quotas,
            replica_id=self.id,
            history_retention_s=cfg.lease_history_hours * 3600,
            preemption_notice_s=cfg.preemption_notice_s,
        )
        self.leases.start()
        self.queue = Queue(
            self.store,
            self.inventory,
            self.leases,
            self.quotas,
            self.clock,
            self.metrics,
            max_queued=cfg.max_queued,
            share_s=cfg.queue_share_s,
        )
        self.reservations = Reservations(
            self.store,
            self.inventory,
            self.leases,
            self.clock,
            self.metrics,
            self.shutdown,
            grace_s=cfg.reservation_grace_s,
        )
        self.nodes.on_provisioned = self.leases.provisioned
        self.nodes.end_lease = self.leases.end
        self.peers = PeerClient(cfg.peer_token, peer_credentials(cfg))
        self.telemetry = Telemetry(
            self.inventory, self.nodes.telemetry, lambda: self.nodes.sessions, self.id, self.peers
        )
        self.leader = Leader(
            self.store,
            self.inventory,
            self.leases,
            self.id,
            lambda: self.session.lease_id,
            self.metrics,
            self.clock,
            queue=self.queue,
            reservations=self.reservations,
            provision_timeout_s=cfg.provision_timeout,
            usage_retention_s=cfg.usage_retention_days * DAY_S,
            usage_export_dir=cfg.usage_export_dir,
        )

        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                *SERVER_OPTIONS,
            ],
        )
        services = Services(
            server, RpcWrapper(self.auth, self.metrics, cfg.log_calls, self.quotas.stream_slot, self.shutdown)
        ).as_server()
        node_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(self.nodes), services)
        discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(
            DiscoveryServicer(
                Discovery(self.inventory, self.shutdown, cfg.search_cache, self.quotas.take_read, self.clock)
            ),
            services,
        )
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(LeaseServicer(self.leases), services)
        reservation_pb2_grpc.add_ReservationServiceServicer_to_server(
            ReservationServicer(self.reservations), services
        )
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(TelemetryServicer(self.telemetry), services)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(
                Admin(self.store, self.inventory, self.leases, self.clock, self.audit_ring, self.id),
                self.quotas,
                BurstPolicies(self.store, self.inventory, self.clock),
            ),
            services,
        )
        peer_pb2_grpc.add_PeerServiceServicer_to_server(PeerServicer(self.telemetry), services)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self._bind(server)
        self.server = server
        await server.start()
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = cfg.advertise or f"{host}:{self.port}"
        await self._put_liveness(self.session.lease_id)
        self.nodes.start()
        self._tasks.append(asyncio.create_task(self.leader.run(), name="leader"))
        await self._set_health(NOT_SERVING if self.store.refuse_writes else SERVING)
        self._tasks.append(asyncio.create_task(self._watch_health(), name="health"))
        if cfg.metrics_listen:
            from prometheus_client import start_http_server

            mhost, _, mport = cfg.metrics_listen.rpartition(":")
            self._metrics_server = start_http_server(
                int(mport), addr=mhost or "127.0.0.1", registry=self.metrics.registry
            )
        if cfg.console_listen:
            self.console = self._start_console()
        log.info(
            "replica serving",
            replica=self.id,
            address=self.address,
            etcd=cfg.etcd_endpoints,
            prefix=cfg.etcd_prefix,
        )

    def _start_console(self) -> Any:
        from control_plane.console.server import ConsoleServer

        cfg = self.config
        listen = (
            "127.0.0.1" + cfg.console_listen if cfg.console_listen.startswith(":") else cfg.console_listen
        )
        # The pages call this replica's own gRPC listener as any client does: at the address its
        # peers use (whose name its certificate carries), else at its listen host.
        host = cfg.listen.rsplit(":", 1)[0]
        target = cfg.advertise or f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{self.port}"
        console = ConsoleServer(listen, target, peer_credentials(cfg), cfg.tls_cert, cfg.tls_key)
        console.start()
        return console

    def _bind(self, server: grpc.aio.Server) -> None:
        """The main listener (plaintext on loopback, or TLS), and with mTLS the daemons' one."""
        cfg = self.config
        if not cfg.tls_cert:
            self.port = server.add_insecure_port(cfg.listen)
        else:
            certs = ReloadingCertificates(
                Path(cfg.tls_cert), Path(cfg.tls_key), Path(cfg.client_ca) if cfg.client_ca else None
            )
            self.port = server.add_secure_port(cfg.listen, certs.credentials(require_client_cert=False))
            if cfg.node_listen:
                self.node_port = server.add_secure_port(
                    cfg.node_listen, certs.credentials(require_client_cert=True)
                )
                if self.node_port == 0:
                    raise TlsConfigError(f"cannot listen on {cfg.node_listen}")
        if self.port == 0:
            raise TlsConfigError(f"cannot listen on {cfg.listen}")

    async def _set_health(self, status: int, services: Sequence[str] = ("", *SERVICE_NAMES)) -> None:
        for name in services:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def _watch_health(self) -> None:
        """Health tells the truth: NOT_SERVING while this replica's etcd session is not surely
        alive (etcd unreachable, its member without a leader, a partition: the replica's view
        may be stale and its work taken over), and the write services NOT_SERVING while etcd's
        NOSPACE alarm is raised (reads still work)."""
        serving, writable = not self.store.refuse_writes, True
        while not self.shutdown.is_set():
            await asyncio.sleep(HEALTH_CHECK_S)
            try:
                serving, writable = await self._check_health(serving, writable)
            except Exception:  # health must go on, whatever one check met
                log.exception("health check failed")

    async def _check_health(self, serving: bool, writable: bool) -> tuple[bool, bool]:
        """One look: the session and the schema (every service), then the NOSPACE alarm (write
        services)."""
        refusing = self.store.refuse_writes
        now_serving = self.session.healthy and not refusing
        if now_serving != serving:
            serving = now_serving
            why = "" if serving else refusing or "etcd session not confirmed"
            log.warning("health", serving=serving, reason=why)
            await self._set_health(SERVING if serving else NOT_SERVING)
            writable = True  # every service was just set alike
        if not serving:
            return serving, writable
        try:
            now_writable = not await self.store.no_space()
        except StoreUnavailable:
            return serving, writable
        if now_writable != writable:
            writable = now_writable
            log.warning("health", writable=writable, reason="" if writable else "etcd NOSPACE alarm")
            await self._set_health(SERVING if writable else NOT_SERVING, WRITE_SERVICES)
        return serving, writable

    def _on_change(self, change: Change) -> None:
        kind = change.kind
        if kind is _TOKEN:
            before = self.auth.revoked_streams
            known = self.auth.records.get(change.name)
            self.auth.update(change.name, change.value)
            self.metrics.revoked_streams.inc(self.auth.revoked_streams - before)
            created = change.value is not None and known is None
            if created and self.config.admin_token and self.auth.records[change.name].kind == Kind.ADMIN:
                self._note_admin_tokens(self.admin_tokens + 1)
        elif kind is _SCHEMA:
            self._check_schema()
        elif kind is _RESYNC:
            self._check_schema()
            self.auth.records.clear()
            self.auth.forget()
            # A token deleted in the watch's gap must still end what it opened.
            task = asyncio.get_running_loop().create_task(self._recheck_streams())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _check_schema(self) -> None:
        """Refuse every write while etcd holds a schema newer than this release understands
        (control_plane.domain.schema): health says NOT_SERVING, writes fail SCHEMA_TOO_NEW, the
        member key says why."""
        raw = self.inventory.schema
        refusal = schema.refusal(raw, __version__)
        with contextlib.suppress(schema.SchemaUnreadable):
            self.metrics.etcd_schema.set(schema.parse_state(raw).version)
        if refusal == self.store.refuse_writes:
            return
        self.store.refuse_writes = refusal
        self.metrics.writes_refused.set(1 if refusal else 0)
        if refusal:
            log.error("this replica refuses to write", reason=refusal)
        else:
            log.warning("this replica writes again: the schema is one it understands")
        if self.address:  # serving already: say so in the member key
            task = asyncio.get_running_loop().create_task(self._put_liveness(self.session.lease_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _put_liveness(self, lease_id: int) -> None:
        """The replica key (its peer address, read by every release) and its member key (its
        release and schema, control_plane.domain.schema), on the session lease."""
        keys = self.store.keys
        member = schema.Member(__version__, schema.SCHEMA, self.address, self.store.refuse_writes)
        await self.store.put(keys.replica(self.id), self.address.encode(), lease=lease_id, liveness=True)
        await self.store.put(keys.member(self.id), member.to_json(), lease=lease_id, liveness=True)

    async def _check_bootstrap_token(self) -> None:
        """Warn (and say so in a metric) while the bootstrap admin token is on although real
        admin tokens exist: it is a shared secret in every replica's environment, never rotated."""
        if not self.config.admin_token:
            return
        kvs, _ = await self.store.get_prefix(self.store.keys.token(""))
        admins = sum(1 for kv in kvs if TokenRecord.from_json("", kv.value).kind == Kind.ADMIN)
        self._note_admin_tokens(admins)

    def _note_admin_tokens(self, admins: int) -> None:
        self.admin_tokens = admins
        risky = bool(self.config.admin_token) and admins > 0
        self.metrics.bootstrap_token_risk.set(1 if risky else 0)
        if risky:
            log.warning(
                "the bootstrap admin token is on although real admin tokens exist: restart the replicas "
                "with --no-bootstrap-token",
                admin_tokens=admins,
            )

    async def _recheck_streams(self) -> None:
        try:
            await self.auth.recheck_streams()
        except Exception as e:  # etcd away: the next resync checks again
            log.warning("could not recheck the tokens of open streams after a resync", error=str(e))

    async def _on_new_session_lease(self, lease_id: int) -> None:
        await self._put_liveness(lease_id)
        await self.nodes.reattach(lease_id)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful, within `grace` seconds (default: --shutdown-grace): NOT_SERVING and daemons
        told to move at once, new streams refused; after --shutdown-delay (load balancers see
        NOT_SERVING meanwhile, unary RPCs are still served) the streams end and in-flight RPCs
        drain; then liveness and leadership are given up."""
        bound = self.config.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + bound
        log.info("replica stopping", replica=self.id, within_s=bound)
        self.shutdown.set()
        with contextlib.suppress(Exception):
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.nodes.tell_move("the replica is shutting down")
        await asyncio.sleep(max(0.0, min(self.config.shutdown_delay, bound / 3)))
        await self.nodes.stop()
        if self.console is not None:
            await asyncio.to_thread(self.console.stop)
        # What is left of the bound, less a second for giving up liveness and leadership.
        await self.server.stop(max(0.2, deadline - time.monotonic() - 1.0))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.audit_ring.detach()
        await self.leader.resign()
        await self.leases.stop()
        await self.peers.close()
        await self.session.close(revoke=True)
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                self._metrics_server[0].shutdown()  # type: ignore[index]
        await self.store.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()
