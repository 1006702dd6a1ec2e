"""The daemon's one stream to the control plane (NodeService.Connect).

Hello first; then a report every interval and events at once, over a single writer; lease
assignments and commands are read concurrently. When the stream breaks the daemon keeps
sampling into a bounded backlog, reconnects with exponential backoff and jitter across its list
of control plane endpoints, and on return sends the backlog newest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpufed.logs import get_logger
from gpufed.transport import CLIENT_OPTIONS
from gpufed.v1 import common_pb2, node_pb2, node_pb2_grpc
from node_daemon import __version__
from node_daemon.assignments import Assignments
from node_daemon.collector import Collector, GpuEvent
from node_daemon.config import DaemonConfig
from node_daemon.hook import LeaseHook
from node_daemon.provisioning import Provisioner

log = get_logger(__name__)

BACKOFF_START = 0.2
BACKOFF_MAX = 10.0


@dataclass
class SessionState:
    connected: bool = False
    connects: int = 0
    replica: str = ""
    session_id: str = ""
    cordoned: bool = False
    draining: bool = False
    last_error: str = ""
    sent_reports: int = 0
    acks: list[node_pb2.AssignmentAck] = field(default_factory=list)


class DaemonSession:
    def __init__(
        self,
        config: DaemonConfig,
        collector: Collector,
        credentials: grpc.ChannelCredentials | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.collector = collector
        self.credentials = credentials
        self.rng = rng or random.Random()
        self.interval = config.report_interval
        self.assignments = Assignments()
        self.state = SessionState()
        self.backlog: deque[node_pb2.NodeMessage] = deque(maxlen=config.backlog)
        self._outgoing: asyncio.Queue[node_pb2.NodeMessage] | None = None
        self._stop = asyncio.Event()
        self._interval_changed = asyncio.Event()
        self.on_assignment: Callable[[node_pb2.LeaseAssignment, bool, str], None] | None = None
        self._started_now: set[str] = set()  # leases STARTED on the current stream
        self.provisioner: Provisioner | None = None
        if config.lease_hook:
            self.provisioner = Provisioner(
                LeaseHook(config.lease_hook, config.lease_hook_timeout),
                self.assignments,
                self._send_or_keep,
                lambda: {g.uuid: g.index for g in collector.inventory()},
                config.provider,
                config.node_id,
                config.state_dir,
            )

    # -- inputs from other threads -----------------------------------------------------------

    def event_from_thread(self, loop: asyncio.AbstractEventLoop, event: GpuEvent) -> None:
        loop.call_soon_threadsafe(self._queue_event, event)

    def _queue_event(self, event: GpuEvent) -> None:
        msg = node_pb2.NodeMessage(
            event=node_pb2.NodeEvent(
                event_time=event.time,
                gpu_uuid=event.gpu_uuid,
                health=event.verdict.health,  # type: ignore[arg-type]
                health_reasons=event.verdict.to_proto_reasons(),
            )
        )
        if event.xid is not None:
            msg.event.xid.xid = event.xid
        elif event.lost:
            msg.event.gpu_lost.SetInParent()
        self._send_or_keep(msg)

    def _send_or_keep(self, msg: node_pb2.NodeMessage) -> None:
        if self._outgoing is not None and self.state.connected:
            self._outgoing.put_nowait(msg)
        else:
            self.backlog.append(msg)

    # -- hello -----------------------------------------------------------------------------------

    def hello(self) -> node_pb2.NodeHello:
        c = self.config
        return node_pb2.NodeHello(
            provider=c.provider,
            node_id=c.node_id,
            location=common_pb2.Location(
                region=c.region,
                country_code=c.country,
                zone=c.zone,
                latitude=c.latitude,
                longitude=c.longitude,
            ),
            gpus=self.collector.inventory(),
            price_per_gpu_hour=c.price_per_gpu_hour,
            interruptible_price_per_gpu_hour=c.interruptible_price_per_gpu_hour,
            currency_code=c.currency,
            labels=c.labels,
            daemon_version=__version__,
            driver_version=self.collector.driver_version,
            lease_hook=self.provisioner is not None,
            cuda_driver_version=self.collector.cuda_driver_version,
            boot_id=c.boot_id,
            reservable_fraction=c.reservable_fraction,
        )

    # -- main loop -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        sampler = asyncio.create_task(self._sample_loop(), name="sampler")
        if self.provisioner is not None:
            self.provisioner.resume()
        attempt = 0
        i = 0
        try:
            while not self._stop.is_set():
                endpoint = self.config.control_planes[i % len(self.config.control_planes)]
                welcomed = self.state.connects
                config_problem = False
                try:
                    await self._connect(endpoint)
                    attempt = 0
                except _Move as e:
                    log.info("control plane asked the node to move", endpoint=endpoint, reason=str(e))
                    i += 1
                    attempt = 0
                    continue  # at once: the replica is going away, the next one is not
                except grpc.aio.AioRpcError as e:
                    self.state.last_error = f"{e.code().name}: {e.details()}"
                    log.warning(
                        "stream to control plane ended",
                        endpoint=endpoint,
                        code=e.code().name,
                        detail=e.details(),
                    )
                    if e.code() in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        # e.g. DAEMON_VERSION_UNSUPPORTED: the next replica may be of another
                        # release (a rolling upgrade), but this one will not change its mind.
                        grpc.StatusCode.FAILED_PRECONDITION,
                    ):
                        config_problem = True
                        attempt = max(attempt, 4)  # a config problem: do not hammer the server
                except (TimeoutError, OSError) as e:
                    self.state.last_error = str(e)
                    log.warning("cannot reach control plane", endpoint=endpoint, error=str(e))
                except Exception as e:  # e.g. grpc.aio's InvalidStateError "RPC already finished"
                    # when a replica goes away mid-call: the session must outlive any one stream.
                    self.state.last_error = f"{type(e).__name__}: {e}"
                    log.exception("stream to control plane failed", endpoint=endpoint)
                finally:
                    self.state.connected = False
                if self._stop.is_set():
                    break
                if self.state.connects > welcomed and not config_problem:
                    # The stream was up: a new outage, not the next failure of the last one, so
                    # the backoff starts again from its shortest delay.
                    attempt = 0
                i += 1
                attempt += 1
                delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** min(attempt, 10))
                delay *= self.rng.uniform(0.5, 1.0)  # jitter: a fleet must not reconnect in lockstep
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
        finally:
            if self.provisioner is not None:
                self.provisioner.close()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    async def _sample_loop(self) -> None:
        while True:
            report = self.collector.sample()
            if self.provisioner is not None:
                self.provisioner.mark_leftovers(report)
            self._send_or_keep(node_pb2.NodeMessage(report=report))
            self._interval_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._interval_changed.wait()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        opts = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            *CLIENT_OPTIONS,
        ]
        if self.credentials is not None:
            return grpc.aio.secure_channel(endpoint, self.credentials, options=opts)
        return grpc.aio.insecure_channel(endpoint, options=opts)

    async def _connect(self, endpoint: str) -> None:
        async with self._channel(endpoint) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            call = stub.Connect(metadata=(("authorization", f"Bearer {self.config.token}"),))
            await call.write(node_pb2.NodeMessage(hello=self.hello()))
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
                await call.code()
                raise OSError("control plane did not welcome the node")
            w = first.welcome
            self.state.replica, self.state.session_id = w.replica, w.session_id
            self._set_interval(w.report_interval.seconds + w.report_interval.nanos / 1e9)
            self.state.connects += 1
            log.info(
                "connected",
                endpoint=endpoint,
                replica=w.replica,
                session=w.session_id,
                node=w.node,
                backlog=len(self.backlog),
            )
            self._started_now = set()
            outgoing: asyncio.Queue[node_pb2.NodeMessage] = asyncio.Queue()
            # The backlog goes first, newest first: the freshest state matters most.
            while self.backlog:
                outgoing.put_nowait(self.backlog.pop())
            self._outgoing = outgoing
            self.state.connected = True
            writer = asyncio.create_task(self._write(call, outgoing))
            stopper = asyncio.create_task(self._stop.wait())
            reader = asyncio.create_task(self._read(call, outgoing))
            try:
                done, _ = await asyncio.wait({writer, reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    await call.done_writing()
                    return
                for t in done:
                    t.result()
            finally:
                self.state.connected = False
                self._outgoing = None
                # What was queued but not sent goes back to the backlog.
                while not outgoing.empty():
                    self.backlog.append(outgoing.get_nowait())
                for t in (writer, reader, stopper):
                    t.cancel()
                for t in (writer, reader, stopper):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                call.cancel()

    async def _write(self, call: Any, outgoing: asyncio.Queue[node_pb2.NodeMessage]) -> None:
        while True:
            msg = await outgoing.get()
            await call.write(msg)
            if msg.WhichOneof("message") == "report":
                self.state.sent_reports += 1

    async def _read(self, call: Any, outgoing: asyncio.Queue[node_pb2.NodeMessage]) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                await call.code()  # raises AioRpcError with the server's status if it failed
                raise OSError("control plane closed the stream")
            kind = msg.WhichOneof("message")
            if kind == "assignment":
                a = msg.assignment
                ok, reason = self.assignments.apply(a)
                log.info(
                    "lease assignment",
                    lease=a.lease,
                    action=node_pb2.AssignmentAction.Name(a.action),
                    gpus=list(a.gpu_uuids),
                    fencing_token=a.fencing_token,
                    accepted=ok,
                    reason=reason,
                )
                ack = node_pb2.AssignmentAck(
                    lease=a.lease, fencing_token=a.fencing_token, accepted=ok, reason=reason
                )
                self.state.acks.append(ack)
                outgoing.put_nowait(node_pb2.NodeMessage(assignment_ack=ack))
                if ok and a.action == node_pb2.ASSIGNMENT_ACTION_STARTED:
                    self._started_now.add(a.lease)
                if ok and self.provisioner is not None:
                    if a.action == node_pb2.ASSIGNMENT_ACTION_STARTED:
                        self.provisioner.started(a)
                    else:
                        self.provisioner.ended(a.lease)
                if self.on_assignment is not None:
                    self.on_assignment(a, ok, reason)
            elif kind == "command":
                self._command(msg.command)

    def _command(self, cmd: node_pb2.NodeCommand) -> None:
        t = cmd.type
        log.info("command", type=node_pb2.NodeCommandType.Name(t), reason=cmd.reason)
        if t == node_pb2.NODE_COMMAND_TYPE_CORDON:
            self.state.cordoned, self.state.draining = True, False
        elif t == node_pb2.NODE_COMMAND_TYPE_DRAIN:
            self.state.cordoned, self.state.draining = True, True
        elif t == node_pb2.NODE_COMMAND_TYPE_UNCORDON:
            self.state.cordoned = self.state.draining = False
        elif t == node_pb2.NODE_COMMAND_TYPE_SET_REPORT_INTERVAL:
            self._set_interval(cmd.report_interval.seconds + cmd.report_interval.nanos / 1e9)
        elif t == node_pb2.NODE_COMMAND_TYPE_RECONNECT:
            raise _Move(cmd.reason)
        elif t == node_pb2.NODE_COMMAND_TYPE_CLEAR_GPU_FAULTS:
            self.collector.clear_faults(list(cmd.gpu_uuids))
        elif t == node_pb2.NODE_COMMAND_TYPE_ASSIGNMENTS_SYNCED:
            # Leases held from before this stream that it did not start again have ended.
            for name in [n for n in self.assignments.active if n not in self._started_now]:
                self.assignments.active.pop(name, None)
            if self.provisioner is not None:
                self.provisioner.synced(self._started_now)

    def _set_interval(self, seconds: float) -> None:
        if seconds > 0 and seconds != self.interval:
            self.interval = max(0.1, seconds)
            self._interval_changed.set()


class _Move(Exception):
    """The replica said RECONNECT: it is going away; connect to the next endpoint now."""
