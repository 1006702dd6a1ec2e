"""The fault suite: a federation of real processes on loopback under load while faults are
injected for real, then the checker (tests/faults/checker.py) over what happened.

  etcd:      3 members; its leader SIGKILLed (and started again); all members stopped for 10 s
  replicas:  3 processes (ra, rb, rc); the one holding the most daemons SIGKILLed (and started
             again on its port); rc reaches etcd only through TCP proxies the suite cuts
  daemons:   4 processes over the fake NVML (4 GPUs each); one SIGSTOPped past the grace period
  clients:   worker processes (tests/faults/worker.py) creating, renewing and releasing leases;
             holders SIGKILLed while they hold a lease

`python -m tests.faults.suite [--long] [--out summary.json]` runs it and prints the summary;
`make test-faults` runs the long form, `make test` the short one (tests/faults/test_suite.py).
Everything stops by itself: every wait is bounded, every process is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import etcd3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.adapters.keyspace import Keyspace
from gpufed.client import Client
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2
from tests.faults.checker import Report, Usage, check
from tests.harness import (
    ADMIN_TOKEN,
    PEER_TOKEN,
    ROOMY_ENV,
    EtcdCluster,
    EtcdMember,
    free_port,
    unique_prefix,
    wait_port,
)
from tests.proxy import CuttableProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
READY = common_pb2.NODE_STATE_READY
REPORT_INTERVAL = 0.5  # the replicas' (daemons report at it); grace = 3 intervals
SESSION_TTL = 3
ETCD_STOPPED_S = 10.0


@dataclass(frozen=True)
class Plan:
    rounds: int  # times the whole fault sequence runs
    between_s: float  # load between two faults
    cycle_workers: int
    holders: int  # workers holding one lease each until they are killed
    ttl: int  # of every lease


SHORT = Plan(rounds=1, between_s=1.5, cycle_workers=4, holders=2, ttl=5)
LONG = Plan(rounds=3, between_s=4.0, cycle_workers=6, holders=3, ttl=5)


@dataclass
class Summary:
    plan: dict[str, Any]
    seconds: float = 0.0
    operations: int = 0
    faults: list[str] = field(default_factory=list)
    leases_granted: int = 0
    leases_released: int = 0
    leases_abandoned: int = 0
    usage_records: int = 0
    violations: list[str] = field(default_factory=list)
    recovery_s: dict[str, list[float]] = field(default_factory=dict)
    freed_after_kill_max_s: float = 0.0
    freed_after_base_max_s: float = 0.0
    freed_limit_s: float = 0.0
    gpu_seconds_uncertainty_median_s: float = 0.0

    def recovered(self, what: str, seconds: float) -> None:
        self.recovery_s.setdefault(what, []).append(round(seconds, 2))

    def text(self) -> str:
        lines = [
            f"fault suite: {self.seconds:.0f} s, {self.operations} operations, "
            f"{len(self.faults)} faults injected",
            f"  faults: {', '.join(self.faults)}",
            f"  leases granted {self.leases_granted}, released {self.leases_released}, "
            f"abandoned {self.leases_abandoned}; usage records {self.usage_records}",
            f"  abandoned leases freed at most {self.freed_after_base_max_s:.2f} s after their client died "
            f"or etcd, down meanwhile, came back (limit: ttl + 2 = {self.freed_limit_s:.0f} s); "
            f"{self.freed_after_kill_max_s:.1f} s after the kill at most",
            f"  GPU-seconds truth known to within {self.gpu_seconds_uncertainty_median_s:.2f} s (median)",
            "  recovery (s):",
            *(f"    {k}: {', '.join(f'{x:.2f}' for x in v)}" for k, v in self.recovery_s.items()),
            f"  violations: {len(self.violations)}",
            *(f"    {x}" for x in self.violations[:50]),
        ]
        return "\n".join(lines)


class Proc:
    """A child process the suite can kill, pause and start again with the same arguments."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as log:
            self.p = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        return self

    @property
    def running(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.p is not None
            self.p.send_signal(sig)

    def kill(self) -> None:
        if self.running:
            assert self.p is not None
            self.p.send_signal(signal.SIGCONT)  # a stopped process dies only once it runs
            self.p.kill()
            self.p.wait(10)

    def wait(self, timeout: float) -> bool:
        if self.p is None:
            return True
        try:
            self.p.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def bounded_wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until predicate() held (exceptions count as not yet), None at the timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - start
        time.sleep(interval)
    return None


class Observer(threading.Thread):
    """Polls etcd for the lease keys every 0.1 s: when each first went missing (after it was seen)."""

    def __init__(self, members: list[EtcdMember], prefix: str) -> None:
        super().__init__(daemon=True, name="observer")
        self.members = members
        self.dir = Keyspace(prefix).dir("leases")
        self.seen: set[str] = set()
        self.gone: dict[str, float] = {}
        self.halt = threading.Event()

    def _keys(self) -> set[str] | None:
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            c = etcd3.client("127.0.0.1", m.client_port, timeout=1)
            try:
                return {
                    meta.key.decode()[len(self.dir) :] for _, meta in c.get_prefix(self.dir, keys_only=True)
                }
            except Exception:  # this member has no quorum: the next one
                continue
            finally:
                c.close()
        return None

    def run(self) -> None:
        while not self.halt.wait(0.1):
            keys = self._keys()
            if keys is None:
                continue
            now = time.time()
            for k in self.seen - keys:
                self.gone.setdefault(f"leases/{k}", now)
            self.seen |= keys


class Federation:
    """The processes of the suite and the faults done to them."""

    def __init__(self, plan: Plan, tmp: Path) -> None:
        self.plan, self.tmp = plan, tmp
        self.prefix = unique_prefix()
        (tmp / "etcd").mkdir()
        self.etcd = EtcdCluster.start(3, tmp=tmp / "etcd")
        self.proxies = [CuttableProxy(("127.0.0.1", m.client_port)) for m in self.etcd.members]
        self.replicas: dict[str, tuple[Proc, str]] = {}
        self.daemons: list[Proc] = []
        self.workers: dict[str, Proc] = {}
        self.kills: dict[str, float] = {}
        self.outages: list[tuple[float, float]] = []
        self.stop_file = tmp / "stop"
        self.env = {**os.environ, **ROOMY_ENV, "GPUFED_INSECURE": "1"}

    @property
    def endpoints(self) -> str:
        return ",".join(addr for _, addr in self.replicas.values())

    # -- processes ------------------------------------------------------------------------------

    def start_replica(self, rid: str, cut_off: bool = False) -> None:
        port = free_port()
        etcd = [p.endpoint for p in self.proxies] if cut_off else self.etcd.endpoints
        args = [
            sys.executable,
            *("-m", "control_plane", "--listen", f"127.0.0.1:{port}"),
            *("--etcd-endpoints", ",".join(etcd), "--etcd-prefix", self.prefix, "--replica-id", rid),
            *("--session-ttl", str(SESSION_TTL), "--report-interval", str(REPORT_INTERVAL)),
            *("--shutdown-grace", "2", "--shutdown-delay", "0"),
        ]
        env = {**self.env, "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN, "GPUFED_PEER_TOKEN": PEER_TOKEN}
        self.replicas[rid] = (Proc(rid, args, env, self.tmp / f"{rid}.log").start(), f"127.0.0.1:{port}")
        wait_port(port, 30)

    def restart_replica(self, rid: str) -> None:
        proc, addr = self.replicas[rid]
        proc.start()  # same arguments: same port, same id
        wait_port(int(addr.rsplit(":", 1)[1]), 30)

    def serving(self, rid: str) -> bool:
        with grpc.insecure_channel(self.replicas[rid][1]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            return bool(resp.status == SERVING)

    def start_daemons(self, provider_token: str, count: int = 4) -> None:
        addrs = [addr for _, addr in self.replicas.values()]
        for i in range(count):
            ring = addrs[i % len(addrs) :] + addrs[: i % len(addrs)]  # each starts on another replica
            args = [
                sys.executable,
                *("-m", "node_daemon", "--provider", "neo", "--node-id", f"n{i}"),
                *("--country", ("DE", "FR", "NL", "FI")[i % 4], "--region", "eu"),
                *("--fake-nvml", "l40s-4", "--price-per-gpu-hour", "1.5", "--insecure"),
                *(x for a in ring for x in ("--control-plane", a)),
            ]
            env = {**self.env, "GPUFED_TOKEN": provider_token}
            self.daemons.append(Proc(f"n{i}", args, env, self.tmp / f"n{i}.log").start())

    def start_worker(self, name: str, mode: str, tenant_token: str) -> None:
        args = [
            sys.executable,
            *("-m", "tests.faults.worker", "--endpoints", self.endpoints, "--token", tenant_token),
            *("--out", str(self.tmp / f"{name}.jsonl"), "--name", name, "--mode", mode),
            *("--ttl", str(self.plan.ttl), "--stop-file", str(self.stop_file), "--max-seconds", "900"),
        ]
        self.workers[name] = Proc(name, args, self.env, self.tmp / f"{name}.log").start()

    def nodes(self) -> list[common_pb2.Node]:
        with Client(self.endpoints, ADMIN_TOKEN, timeout=2, retries=1) as admin:
            return admin.list_nodes()

    def etcd_writable(self, timeout: float) -> float:
        self.etcd.wait_healthy(timeout)
        return time.time()

    def close(self) -> None:
        for proc in [*self.workers.values(), *self.daemons, *(p for p, _ in self.replicas.values())]:
            proc.kill()
        for proxy in self.proxies:
            proxy.close()
        self.etcd.stop()


def read_records(tmp: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(tmp.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by the SIGKILL
                out.append(json.loads(line))
    return out


def read_usage(members: list[EtcdMember], keys: Keyspace) -> list[Usage]:
    c = etcd3.client("127.0.0.1", members[0].client_port, timeout=5)
    try:
        out = []
        for value, meta in c.get_prefix(keys.records_dir("usage")):
            u = admin_pb2.UsageRecord.FromString(value)
            out.append(
                Usage(
                    lease=u.lease,
                    provider=u.provider,
                    gpus=tuple(g.uuid for g in u.gpus),
                    start=u.start_time.ToNanoseconds() / 1e9,
                    end=u.end_time.ToNanoseconds() / 1e9,
                    gpu_seconds=u.gpu_seconds,
                    end_reason=lease_pb2.LeaseEndReason.Name(u.end_reason),
                    version=meta.version,
                )
            )
        return out
    finally:
        c.close()


def leftovers(members: list[EtcdMember], keys: Keyspace) -> list[str]:
    c = etcd3.client("127.0.0.1", members[0].client_port, timeout=5)
    try:
        return [
            meta.key.decode()
            for d in (keys.dir("leases"), keys.records_dir("journal"), keys.dir("alloc"))
            for _, meta in c.get_prefix(d, keys_only=True)
        ]
    finally:
        c.close()


class Suite:
    def __init__(self, plan: Plan, tmp: Path) -> None:
        self.plan = plan
        self.tmp = tmp
        self.fed = Federation(plan, tmp)
        self.summary = Summary(plan=asdict(plan))
        self.holders = 0

    def log(self, text: str) -> None:
        print(f"[faults {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def fault(self, name: str) -> None:
        self.summary.faults.append(name)
        self.log(name)

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        f = self.fed
        for rid in ("ra", "rb"):
            f.start_replica(rid)
        f.start_replica("rc", cut_off=True)
        if bounded_wait(lambda: all(f.serving(r) for r in f.replicas), 30) is None:
            raise RuntimeError("replicas never became SERVING")
        with Client(f.endpoints, ADMIN_TOKEN) as admin:
            provider = admin.create_token("provider", "neo").secret
            self.tenant = admin.create_token("tenant", "dev").secret
        f.start_daemons(provider)
        ready = lambda: sum(n.state == READY for n in f.nodes()) == len(f.daemons)  # noqa: E731
        if bounded_wait(ready, 30) is None:
            raise RuntimeError("daemons never registered")
        self.observer = Observer(f.etcd.members, f.prefix)
        self.observer.start()
        for i in range(self.plan.cycle_workers):
            f.start_worker(f"cycle{i}", "cycle", self.tenant)
        for _ in range(self.plan.holders):
            self.new_holder()

    def new_holder(self) -> None:
        self.fed.start_worker(f"hold{self.holders}", "hold", self.tenant)
        self.holders += 1

    # -- faults ---------------------------------------------------------------------------------

    def kill_replica(self) -> None:
        f = self.fed
        nodes = f.nodes()
        counts = {rid: sum(n.replica == rid for n in nodes) for rid in f.replicas}
        rid = max(counts, key=lambda r: counts[r])
        moved = {n.name for n in nodes if n.replica == rid}
        self.fault(f"SIGKILL replica {rid} (holding {len(moved)} daemons)")
        f.replicas[rid][0].kill()

        def elsewhere() -> bool:
            now = {n.name: n for n in f.nodes()}
            return all(now[m].state == READY and now[m].replica not in ("", rid) for m in moved)

        took = bounded_wait(elsewhere, 30)
        self.summary.recovered(
            "daemon back on another replica after its replica died", took if took is not None else -1
        )
        f.restart_replica(rid)
        bounded_wait(lambda: f.serving(rid), 30)

    def kill_etcd_leader(self) -> None:
        f = self.fed
        leader = f.etcd.leader()
        self.fault(f"SIGKILL etcd leader {leader.name}")
        t = time.time()
        leader.kill()
        self.etcd_killed_at = t
        f.outages.append((t, f.etcd_writable(30)))
        time.sleep(1.0)
        f.etcd.restart(leader)
        self.first_create_after("first CreateLease after the etcd leader died", t)

    def stop_etcd(self) -> None:
        f = self.fed
        self.fault(f"stop all etcd members for {ETCD_STOPPED_S:.0f} s")
        t = time.time()
        for m in f.etcd.members:
            m.stop()
        time.sleep(ETCD_STOPPED_S)
        back = time.time()
        for m in f.etcd.members:
            f.etcd.restart(m)
        f.outages.append((t, f.etcd_writable(60)))
        took = bounded_wait(lambda: all(f.serving(r) for r in f.replicas), 30)
        self.summary.recovered("every replica SERVING after etcd returned", took if took is not None else -1)
        self.first_create_after("first CreateLease after etcd returned", back)

    def first_create_after(self, what: str, t: float) -> None:
        """From the clients' records, once one appears (at most 30 s)."""

        def first() -> float | None:
            ok = [
                float(r["t1"])
                for r in read_records(self.tmp)
                if r["op"] == "create" and r["ok"] and float(r["t0"]) >= t
            ]
            return min(ok) - t if ok else None

        bounded_wait(lambda: first() is not None, 30, interval=0.2)
        took = first()
        self.summary.recovered(what, took if took is not None else -1)

    def partition_replica(self) -> None:
        f = self.fed
        self.fault("cut replica rc off from etcd for 4 s")
        for p in f.proxies:
            p.cut()
        took = bounded_wait(lambda: not f.serving("rc"), 20)
        self.summary.recovered("partitioned replica reports NOT_SERVING", took if took is not None else -1)
        time.sleep(4.0)
        for p in f.proxies:
            p.restore()
        took = bounded_wait(lambda: f.serving("rc"), 30)
        self.summary.recovered(
            "partitioned replica SERVING after the cut healed", took if took is not None else -1
        )

    def pause_daemon(self) -> None:
        f = self.fed
        d = f.daemons[1]
        grace = REPORT_INTERVAL * 3
        self.fault(f"SIGSTOP daemon {d.name} for {grace + 2.5:.1f} s (grace {grace:.1f} s)")
        name = f"providers/neo/nodes/{d.name}"
        d.signal(signal.SIGSTOP)
        offline = bounded_wait(
            lambda: any(n.name == name and n.state != READY for n in f.nodes()), grace + 10
        )
        time.sleep(max(0.0, grace + 2.5 - (offline or 0)))
        d.signal(signal.SIGCONT)
        took = bounded_wait(lambda: any(n.name == name and n.state == READY for n in f.nodes()), 30)
        self.summary.recovered("paused daemon READY again after SIGCONT", took if took is not None else -1)

    def kill_holder(self) -> None:
        f = self.fed
        victims = [n for n, p in f.workers.items() if n.startswith("hold") and p.running]
        if not victims:
            return
        name = victims[0]
        self.fault(f"SIGKILL client {name} holding a lease")
        f.kills[name] = time.time()
        f.workers[name].kill()
        self.new_holder()

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> Summary:
        started = time.time()
        self.setup()
        time.sleep(self.plan.between_s)
        for _ in range(self.plan.rounds):
            steps: tuple[Callable[[], None], ...] = (
                self.kill_replica,
                self.kill_holder,
                self.kill_etcd_leader,
                self.stop_etcd,
                self.kill_holder,
                self.partition_replica,
                self.pause_daemon,
                self.kill_holder,
            )
            for step in steps:
                step()
                time.sleep(self.plan.between_s)
        self.finish()
        self.summary.seconds = time.time() - started
        return self.summary

    def finish(self) -> None:
        f = self.fed
        self.log("stopping the clients; waiting for every lease to end")
        self.fed.stop_file.touch()
        for name, proc in f.workers.items():
            if not proc.wait(30):
                f.kills[name] = time.time()  # stuck: it counts as killed
                proc.kill()
            elif name not in f.kills and proc.p is not None and proc.p.returncode != 0:
                tail = proc.log.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"client {name} failed ({proc.p.returncode}):\n{tail}")
        keys = Keyspace(f.prefix)
        settle = self.plan.ttl + 15
        if bounded_wait(lambda: not leftovers(f.etcd.members, keys), settle, interval=0.2) is None:
            self.log(f"leases or journal entries still in etcd after {settle} s")
        time.sleep(0.5)  # the observer's last poll
        self.observer.halt.set()
        report: Report = check(
            read_records(self.tmp),
            read_usage(f.etcd.members, keys),
            self.observer.gone,
            f.kills,
            f.outages,
            leftovers(f.etcd.members, keys),
        )
        s = self.summary
        s.operations = report.operations
        s.leases_granted, s.leases_released, s.leases_abandoned = (
            report.granted,
            report.released,
            report.abandoned,
        )
        s.usage_records = report.usage_records
        s.violations = report.violations
        s.freed_after_kill_max_s = round(max(report.freed_after_kill_s, default=0.0), 2)
        s.freed_after_base_max_s = round(max(report.freed_after_base_s, default=0.0), 2)
        s.freed_limit_s = self.plan.ttl + 2
        unc = sorted(report.gpu_seconds_uncertainty_s)
        s.gpu_seconds_uncertainty_median_s = round(unc[len(unc) // 2], 3) if unc else 0.0


@contextlib.contextmanager
def suite(plan: Plan, keep: Path | None = None) -> Iterator[Suite]:
    tmp = Path(tempfile.mkdtemp(prefix="gpufed-faults-"))
    s = Suite(plan, tmp)
    try:
        yield s
    finally:
        s.fed.close()
        if keep is not None:
            shutil.copytree(tmp, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.etcd"))
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long", action="store_true", help="three rounds, more clients (make test-faults)")
    p.add_argument("--out", help="write the summary as JSON here")
    p.add_argument("--keep", help="copy logs and client records here")
    a = p.parse_args()
    with suite(LONG if a.long else SHORT, Path(a.keep) if a.keep else None) as s:
        summary = s.run()
    print(summary.text())
    if a.out:
        Path(a.out).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    sys.exit(1 if summary.violations else 0)


if __name__ == "__main__":
    main()
