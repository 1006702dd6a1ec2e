"""What a provider's lease hook adds to a grant: latency from CreateLease to ACTIVE, and CPU.

One replica, three daemons (four as root) (fake NVML, 8 GPUs each), each of its own provider so a lease can
be aimed at one: `plain` without a hook (its leases are ACTIVE at the grant), `sh` with the
cheapest real hook (a POSIX shell script that answers one line of JSON), `python` with the demo
hook (hooks/demo.py: a Python interpreter's start-up per run, like most real hooks), and as
root `linux_user` with the hardened reference hook run for real (hooks/linux_user.py: useradd,
the home's files written through directory fds, and at the end lock, kill loop, userdel). One client
cycles: CreateLease, wait until ACTIVE (WatchLease: PROVISIONED), ReleaseLease, in rounds over
the three. Reported per mode: grant-to-ACTIVE p50/p99 and the CPU per cycle of the daemon (with
its hook children) and of the replica.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ADMIN_TOKEN, fresh_etcd, replica_process
from gpufed.client import Client
from gpufed.v1 import lease_pb2
from tests.harness import daemon_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
SH_HOOK = """#!/bin/sh
cat >/dev/null
echo '{"ssh": "ssh u@h"}'
"""


def cpu_with_children(pid: int) -> float:
    """utime + stime, and those of its children it waited for (the hook runs)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _cycle(c: Client, provider: str) -> float:
    t = time.perf_counter()
    lease = c.create_lease(1, ttl_s=30, providers=[provider])
    if lease.state == lease_pb2.LEASE_STATE_PROVISIONING:
        c.wait_active(lease.name, timeout=30)
    took = time.perf_counter() - t
    c.release_lease(lease.name)
    return took


def run(cycles: int = 60, rounds: int = 3) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="gpufed-bench-handoff-"))
    sh_hook = tmp / "hook.sh"
    sh_hook.write_text(SH_HOOK, encoding="utf-8")
    sh_hook.chmod(0o755)
    hooks = {"plain": None, "sh": str(sh_hook), "python": str(ROOT / "hooks" / "demo.py")}
    if os.geteuid() == 0 and shutil.which("useradd"):
        hooks["linux-user"] = str(ROOT / "hooks" / "linux_user.py")
    with fresh_etcd() as etcd, replica_process(etcd.endpoints, "/bench-handoff") as (replica, addr):
        with Client(addr, ADMIN_TOKEN) as admin:
            tenant = admin.create_token("tenant", "bench").secret
            tokens = {mode: admin.create_token("provider", mode).secret for mode in hooks}
        with contextlib.ExitStack() as stack:
            daemons = {}
            for mode, hook in hooks.items():
                extra = ["--insecure", "--report-interval", "2"]
                if hook:
                    extra += ["--lease-hook", hook, "--state-dir", str(tmp / mode)]
                daemons[mode] = stack.enter_context(
                    daemon_process([addr], tokens[mode], mode, "n1", *extra, profile="h100-sxm-8")
                )
            with Client(addr, tenant) as c:
                wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8 * len(hooks), timeout=30)
                lat: dict[str, list[float]] = {m: [] for m in hooks}
                cpu_d: dict[str, float] = dict.fromkeys(hooks, 0.0)
                cpu_r: dict[str, float] = dict.fromkeys(hooks, 0.0)
                for _ in range(3):  # warm-up
                    for m in hooks:
                        _cycle(c, m)
                for r in range(rounds):
                    for m in hooks if r % 2 == 0 else reversed(list(hooks)):
                        d0, r0 = cpu_with_children(daemons[m].pid), cpu_with_children(replica.pid)
                        for _ in range(cycles):
                            lat[m].append(_cycle(c, m))
                        time.sleep(1.0)  # the end hook of the last cycle
                        cpu_d[m] += cpu_with_children(daemons[m].pid) - d0
                        cpu_r[m] += cpu_with_children(replica.pid) - r0
    n = cycles * rounds
    out: dict[str, Any] = {"cycles_per_mode": n}
    for m in hooks:
        s = sorted(lat[m])
        out[m] = {
            "grant_to_active_p50_ms": round(statistics.median(s) * 1000, 1),
            "grant_to_active_p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1000, 1),
            "daemon_cpu_ms_per_cycle": round(cpu_d[m] / n * 1000, 2),
            "replica_cpu_ms_per_cycle": round(cpu_r[m] / n * 1000, 2),
        }
    for m in [m for m in hooks if m != "plain"]:
        out[f"{m}_adds_p50_ms"] = round(
            out[m]["grant_to_active_p50_ms"] - out["plain"]["grant_to_active_p50_ms"], 1
        )
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
