"""Real processes on loopback for tests and benchmarks: etcd members and control plane replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from control_plane.config import Config
from control_plane.domain.quotas import ProviderLimits, TenantLimits
from control_plane.replica import Replica

# A replica refuses a bootstrap token under 32 characters and a peer token equal to it.
# The replicas of the tests serve plaintext on loopback; clients (SDK, CLI, daemons in their own
# processes) speak TLS unless told otherwise, so the tests say so, once, here.
os.environ.setdefault("GPUFED_INSECURE", "1")
ADMIN_TOKEN = "test-admin-token-of-at-least-32-characters"
PEER_TOKEN = "test-peer-token-of-its-own-for-replicas"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    path = os.environ.get("ETCD_BIN") or shutil.which("etcd")
    if not path:
        raise RuntimeError("no etcd binary: run `make test` (installs etcd-server) or set ETCD_BIN")
    return path


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass(frozen=True)
class EtcdTlsFiles:
    """PEM files of a TLS etcd: its CA, and one certificate (server and client usage) that the
    members serve, present to each other and that clients present (--client-cert-auth)."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # more etcd flags (benchmarks: --metrics extensive)
    tls: EtcdTlsFiles | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        prefix = "https://" if self.tls else ""
        return f"{prefix}127.0.0.1:{self.client_port}"

    def _tls_args(self) -> list[str]:
        t = self.tls
        if t is None:
            return []
        return [
            *("--cert-file", str(t.cert), "--key-file", str(t.key)),
            *("--trusted-ca-file", str(t.ca), "--client-cert-auth"),
            *("--peer-cert-file", str(t.cert), "--peer-key-file", str(t.key)),
            *("--peer-trusted-ca-file", str(t.ca), "--peer-client-cert-auth"),
        ]

    def start(self, initial_cluster: str, state: str = "new") -> None:
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                etcd_binary(),
                "--name",
                self.name,
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                f"{self.scheme}://127.0.0.1:{self.client_port}",
                "--advertise-client-urls",
                f"{self.scheme}://127.0.0.1:{self.client_port}",
                "--listen-peer-urls",
                f"{self.scheme}://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"{self.scheme}://127.0.0.1:{self.peer_port}",
                *self._tls_args(),
                "--initial-cluster",
                initial_cluster,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "gpufed-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
                "--log-level",
                "error",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")},
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    tmp: Path
    _initial: str = ""

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @classmethod
    def start(
        cls,
        size: int = 1,
        tmp: Path | None = None,
        extra_args: tuple[str, ...] = (),
        tls: EtcdTlsFiles | None = None,
    ) -> EtcdCluster:
        tmp = tmp or Path(tempfile.mkdtemp(prefix="gpufed-etcd-"))
        members = [
            EtcdMember(f"m{i}", free_port(), free_port(), tmp / f"m{i}.etcd", extra_args=extra_args, tls=tls)
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.scheme}://127.0.0.1:{m.peer_port}" for m in members)
        cluster = cls(members, tmp, initial)
        for m in members:
            m.start(initial)
        for m in members:
            wait_port(m.client_port)
        cluster.wait_healthy()
        return cluster

    def wait_healthy(self, timeout: float = 20.0) -> None:
        import etcd3

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is None or m.proc.poll() is not None:
                    continue
                try:
                    t = m.tls
                    c = etcd3.client(
                        "127.0.0.1",
                        m.client_port,
                        timeout=2,
                        ca_cert=str(t.ca) if t else None,
                        cert_cert=str(t.cert) if t else None,
                        cert_key=str(t.key) if t else None,
                    )
                    c.put("/health-probe", "1")
                    c.close()
                    return
                except Exception as e:  # a member without a leader yet
                    last = e
            time.sleep(0.1)
        raise TimeoutError(f"etcd cluster never became writable: {last}")

    def leader(self) -> EtcdMember:
        """The member that the first live one with a leader names leader."""
        import etcd3

        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            c = etcd3.client("127.0.0.1", m.client_port, timeout=2)
            try:
                status = c.status()
                names = {mm.id: mm.name for mm in c.members}
                return next(x for x in self.members if x.name == names[status.leader.id])
            except Exception:  # no leader yet, or a member cut off: ask the next
                continue
            finally:
                c.close()
        raise RuntimeError("no etcd member knows a leader")

    def restart(self, member: EtcdMember) -> None:
        member.start(self._initial, state="existing")
        wait_port(member.client_port)

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class ReplicaThread:
    """A real replica served from its own event loop in a background thread."""

    config: Config
    replica: Replica | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self.replica is not None
        return f"127.0.0.1:{self.replica.port}"

    def start(self) -> ReplicaThread:
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def boot() -> None:
                self.replica = Replica(self.config)
                await self.replica.start()

            try:
                self.loop.run_until_complete(boot())
            except BaseException as e:
                error.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name=f"replica-{self.config.replica_id}")
        self.thread.start()
        ready.wait(60)
        if error:
            raise error[0]
        return self

    def call(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.replica is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                self.call(self.replica.stop(grace=1.0))
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(15)


# Tests not about quotas run without them getting in the way (the quota tests set their own).
ROOMY_TENANT = TenantLimits(
    max_gpus=100_000,
    max_leases=100_000,
    create_leases_per_second=10_000,
    create_leases_burst=100_000,
    max_streams=10_000,
    renewals_per_second=100_000,
    renewal_burst=1_000_000,
    reads_per_second=100_000,
    read_burst=1_000_000,
)
ROOMY_PROVIDER = ProviderLimits(reports_per_second=1000, report_burst=10_000, connects_per_minute=6000)
ROOMY_ENV = {
    **{f"GPUFED_QUOTA_TENANT_{k.upper()}": str(v) for k, v in asdict(ROOMY_TENANT).items()},
    **{f"GPUFED_QUOTA_PROVIDER_{k.upper()}": str(v) for k, v in asdict(ROOMY_PROVIDER).items()},
}


def replica_config(endpoints: list[str], prefix: str, **kw: object) -> Config:
    kw.setdefault("tenant_quota", ROOMY_TENANT)
    kw.setdefault("provider_quota", ROOMY_PROVIDER)
    return Config(
        listen="127.0.0.1:0",
        etcd_endpoints=endpoints,
        etcd_prefix=prefix,
        admin_token=ADMIN_TOKEN,
        peer_token=PEER_TOKEN,
        **kw,  # type: ignore[arg-type]
    )


def unique_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}"


def replica_command(
    endpoints: list[str], prefix: str, port: int, *extra: str, python: str = sys.executable
) -> list[str]:
    """The command line of a replica on 127.0.0.1:`port` (`python`: of another release)."""
    return [
        python,
        "-m",
        "control_plane",
        "--listen",
        f"127.0.0.1:{port}",
        "--etcd-endpoints",
        ",".join(endpoints),
        "--etcd-prefix",
        prefix,
        *extra,
    ]


@contextlib.contextmanager
def replica_process(
    endpoints: list[str], prefix: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A replica as its own OS process (for tests that SIGKILL it). Its log goes to a file that
    is removed afterwards (a pipe nobody reads would block the replica once it is full)."""
    port = free_port()
    with tempfile.TemporaryFile(prefix="gpufed-replica-") as log_file:
        proc = subprocess.Popen(
            replica_command(endpoints, prefix, port, *extra),
            env={
                **os.environ,
                **ROOMY_ENV,
                "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN,
                "GPUFED_PEER_TOKEN": PEER_TOKEN,
                **(env or {}),
            },
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            try:
                wait_port(port, 30)
            except Exception:
                log_file.seek(0)
                sys.stderr.write(log_file.read()[-4000:].decode(errors="replace"))
                raise
            yield proc, f"127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def metadata(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def channel(address: str) -> grpc.Channel:
    ch = grpc.insecure_channel(address)
    grpc.channel_ready_future(ch).result(timeout=10)
    return ch


@dataclass
class DaemonThread:
    """A node daemon (collector + stream session) over a FakeNvml, in a background event loop."""

    config: object
    nvml: object
    session: object | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def start(self) -> DaemonThread:
        from node_daemon.collector import Collector, XidWatcher
        from node_daemon.main import credentials
        from node_daemon.session import DaemonSession

        collector = Collector(self.nvml)
        collector.start()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            creds = credentials(self.config)  # type: ignore[arg-type]  # TLS as the daemon's main sets it up
            self.session = session = DaemonSession(self.config, collector, creds)  # type: ignore[arg-type]
            self.watcher = XidWatcher(
                collector, lambda ev: session.event_from_thread(self.loop, ev), wait_ms=50
            )
            self.watcher.start()
            ready.set()
            self.loop.run_until_complete(session.run())

        self.thread = threading.Thread(target=run, daemon=True, name="daemon")
        self.thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self.session is not None:
            self.loop.call_soon_threadsafe(self.session.stop)  # type: ignore[attr-defined]
        if self.thread is not None:
            self.thread.join(15)
        self.watcher.stop()


def daemon_config(
    endpoints: list[str], token: str, provider: str, node_id: str, country: str = "DE", **kw: object
) -> object:
    from node_daemon.config import DaemonConfig

    defaults: dict[str, object] = dict(
        region="eu-central", latitude=50.11, longitude=8.68, price_per_gpu_hour=2.0, report_interval=0.5
    )
    # Plaintext to loopback replicas, explicitly; a test that gives a CA gets TLS regardless.
    defaults["insecure"] = not (kw.get("ca_cert") or kw.get("client_cert"))
    defaults.update(kw)
    return DaemonConfig(
        control_planes=endpoints,
        token=token,
        provider=provider,
        node_id=node_id,
        country=country,
        **defaults,  # type: ignore[arg-type]
    )


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Poll until predicate() is truthy; the seconds it took. Raises TimeoutError."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            if predicate():  # type: ignore[operator]
                return time.monotonic() - start
        except Exception as e:  # not there yet (e.g. NOT_FOUND before registration)
            last = e
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s; last error: {last!r}")


@contextlib.contextmanager
def daemon_process(
    endpoints: list[str],
    token: str,
    provider: str,
    node_id: str,
    *extra: str,
    country: str = "DE",
    profile: str = "l40s-4",
) -> Iterator[subprocess.Popen[bytes]]:
    """A node daemon as its own OS process over the fake NVML (for tests that SIGKILL it)."""
    args = daemon_command(endpoints, provider, node_id, *extra, country=country, profile=profile)
    proc = subprocess.Popen(
        args, env={**os.environ, "GPUFED_TOKEN": token}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def daemon_command(
    endpoints: list[str],
    provider: str,
    node_id: str,
    *extra: str,
    country: str = "DE",
    profile: str = "l40s-4",
    python: str = sys.executable,
) -> list[str]:
    """The command line of a node daemon over the fake NVML (`python`: of another release)."""
    args = [
        python,
        "-m",
        "node_daemon",
        "--provider",
        provider,
        "--node-id",
        node_id,
        "--country",
        country,
        "--region",
        "eu",
        "--fake-nvml",
        profile,
        "--price-per-gpu-hour",
        "1.5",
        *extra,
    ]
    for ep in endpoints:
        args += ["--control-plane", ep]
    return args


@contextlib.contextmanager
def one_node(address: str, tenant_name: str = "dev") -> Iterator[str]:
    """A tenant token and one 4 x L40S node of provider 'neo' streaming to `address`, offered
    before the block starts; the daemon stops after it."""
    from gpufed.client import Client
    from node_daemon.fake_nvml import FakeNvml

    with Client(address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", tenant_name).secret
        provider = admin.create_token("provider", "neo").secret
    daemon = DaemonThread(daemon_config([address], provider, "neo", "n1"), FakeNvml("l40s-4")).start()
    try:
        with Client(address, tenant) as c:
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 4)
        yield tenant
    finally:
        daemon.stop()


def reservations_open(c: Any) -> bool:
    """Whether the leader has moved a fresh prefix to the schema with reservations: a booking a
    day ahead is accepted (and cancelled at once), not UPGRADE_IN_PROGRESS."""
    from gpufed.client import GpufedError

    try:
        c.cancel_reservation(c.create_reservation(1, time.time() + 86_400, 60).name)
    except GpufedError as e:
        if e.reason == "UPGRADE_IN_PROGRESS":
            return False
        raise
    return True
