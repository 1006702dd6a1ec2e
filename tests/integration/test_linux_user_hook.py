"""hooks/linux_user.py run for real, as root, with a real sshd on 127.0.0.1: the tenant logs in
with its key and sees its GPUs, cannot turn the hook's writes against root files, and is gone
(account, home, processes, login) when the lease ends.

Needs root (useradd, sshd); CI runs as root with Debian's openssh-server installed by .ci/run.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpufed.client import Client
from node_daemon.fake_nvml import FakeNvml
from tests.harness import ADMIN_TOKEN, DaemonThread, ReplicaThread, daemon_config, wait_until

pytestmark = pytest.mark.integration

HOOK = Path(__file__).parents[2] / "hooks" / "linux_user.py"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LEASE = "leases/7e57ab1e00c0ffee"
USER = "gpufed-7e57ab1e00c0ffee"

if os.geteuid() != 0:
    pytest.skip(
        "the linux_user hook runs as root (useradd, sshd): run as root, as CI does", allow_module_level=True
    )
if not os.path.exists(SSHD):
    if os.environ.get("CI"):
        raise RuntimeError("sshd missing: .ci/run installs Debian's openssh-server")
    pytest.skip("no sshd: apt-get install openssh-server (CI installs it)", allow_module_level=True)


@dataclass
class Sshd:
    port: int
    key: Path
    known_hosts: Path

    def ssh(self, command: str | None, stdin: str = "", user: str = USER) -> subprocess.CompletedProcess[str]:
        args = [
            "ssh", "-i", str(self.key), "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=10",
            f"{user}@127.0.0.1",
        ]  # fmt: skip
        if command is None:
            args.insert(1, "-T")  # no command: sshd runs the user's login shell on our stdin
        else:
            args.append(command)
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "tenant_key")], check=True)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n"
        "StrictModes yes\nAuthorizedKeysFile .ssh/authorized_keys\nLogLevel VERBOSE\n",
        encoding="utf-8",
    )
    host_pub = (d / "host_key.pub").read_text(encoding="utf-8").split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n", encoding="utf-8")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation directory
    log = (d / "sshd.log").open("w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.05)
    yield Sshd(port, d / "tenant_key", d / "known_hosts")
    proc.terminate()
    proc.wait(10)
    log.close()


def doc(action: str, key: str) -> dict[str, Any]:
    return {
        "version": 1,
        "action": action,
        "lease": LEASE,
        "tenant": "dev",
        "provider": "neo",
        "node_id": "n1",
        "gpus": [{"uuid": "GPU-a", "index": 2}, {"uuid": "GPU-b", "index": 3}],
        "cuda_visible_devices": "2,3",
        "fencing_token": 42,
        "expire_time": "2026-12-02T00:00:00Z",
        "access": {"ssh_public_keys": [key], "provider_options": {}},
    }


def hook(action: str, sshd: Sshd) -> subprocess.CompletedProcess[str]:
    key = sshd.key.with_suffix(".pub").read_text(encoding="utf-8").strip()
    env = {**os.environ, "GPUFED_HOOK_SSH_HOST": "127.0.0.1", "GPUFED_HOOK_SSH_PORT": str(sshd.port)}
    env.pop("GPUFED_HOOK_DRY_RUN", None)
    return subprocess.run(
        [str(HOOK)], input=json.dumps(doc(action, key)), capture_output=True, text=True, timeout=90, env=env
    )


def exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def processes_of(uid: int) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                status = (p / "status").read_text(encoding="utf-8")
            except OSError:
                continue
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:4]
            if str(uid) in uids and "\nState:\tZ" not in status:
                out.append(p.name)
    return out


@pytest.fixture
def tenant(sshd: Sshd) -> Iterator[pwd.struct_passwd]:
    started = hook("start", sshd)
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["ssh"] == f"ssh -p {sshd.port} {USER}@127.0.0.1"
    yield pwd.getpwnam(USER)
    if exists(USER):  # the test failed half-way: leave the host clean for the next one
        subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
        subprocess.run(["userdel", "--remove", USER], check=False, capture_output=True)


def test_the_tenant_logs_in_with_its_key_and_sees_its_gpus_in_non_interactive_and_login_shells(
    sshd: Sshd, tenant: pwd.struct_passwd
) -> None:
    command = sshd.ssh("echo gpus=$CUDA_VISIBLE_DEVICES")
    assert command.returncode == 0, command.stderr
    assert command.stdout.strip() == "gpus=2,3"  # `ssh host cmd`, as SkyPilot, dstack, Ansible do
    login = sshd.ssh(None, stdin="echo gpus=$CUDA_VISIBLE_DEVICES\n")
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip().splitlines()[-1] == "gpus=2,3"
    assert stat.S_IMODE(os.stat(tenant.pw_dir).st_mode) == 0o700  # no other tenant reads the home


def test_links_planted_by_the_tenant_do_not_turn_a_second_start_against_root_files(
    sshd: Sshd, tenant: pwd.struct_passwd, tmp_path: Path
) -> None:
    targets = {}
    for name in ("env", "keys", "bashrc", "profile"):
        target = tmp_path / f"root-owned-{name}"
        target.write_text(f"root's {name}\n", encoding="utf-8")
        target.chmod(0o600)
        targets[name] = target
    tmp_path.chmod(0o755)  # the tenant may even read the directory: only the links matter
    plant = (
        f"ln -sfn {targets['env']} ~/.gpufed_env && ln -sfn {targets['keys']} ~/.ssh/authorized_keys.new"
        f" && ln -sfn {targets['bashrc']} ~/.bashrc && ln -sfn {targets['profile']} ~/.profile"
    )
    planted = sshd.ssh(plant)
    assert planted.returncode == 0, planted.stderr
    # authorized_keys itself is replaced last: the session above read the real one.
    assert sshd.ssh("mv -f ~/.ssh/authorized_keys.new ~/.ssh/authorized_keys").returncode == 0

    again = hook("start", sshd)  # the daemon restarted and ensures the lease

    assert again.returncode == 0, again.stderr
    for name, target in targets.items():
        st = target.stat()
        assert target.read_text(encoding="utf-8") == f"root's {name}\n", name
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name
    for rel in (".gpufed_env", ".ssh/authorized_keys", ".bashrc", ".profile"):
        p = Path(tenant.pw_dir) / rel
        assert not p.is_symlink() and p.lstat().st_uid == tenant.pw_uid, rel
    assert sshd.ssh("echo gpus=$CUDA_VISIBLE_DEVICES").stdout.strip() == "gpus=2,3"


def test_a_linked_ssh_directory_is_replaced_not_followed(
    sshd: Sshd, tenant: pwd.struct_passwd, tmp_path: Path
) -> None:
    root_dir = tmp_path / "root-dir"
    root_dir.mkdir(mode=0o755)
    assert sshd.ssh(f"rm -rf ~/.ssh && ln -s {root_dir} ~/.ssh").returncode == 0

    again = hook("start", sshd)

    assert again.returncode == 0, again.stderr
    assert list(root_dir.iterdir()) == [] and root_dir.stat().st_uid == 0
    assert sshd.ssh("echo in").stdout.strip() == "in"


def test_the_end_leaves_no_user_home_process_or_login_even_with_a_process_that_keeps_forking(
    sshd: Sshd, tenant: pwd.struct_passwd
) -> None:
    # Each generation forks the next and exits, so its pid never stays: a single scan misses it.
    forker = (
        "import os, time\\n"
        "end = time.time() + 60\\n"
        "while time.time() < end:\\n"
        "    if os.fork(): os._exit(0)\\n"
        "    time.sleep(0.02)\\n"
    )
    left = sshd.ssh(
        f"printf '{forker}' > /tmp/forker.py && setsid python3 /tmp/forker.py </dev/null >/dev/null 2>&1 & "
        "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo left"
    )
    assert left.stdout.strip() == "left", left.stderr
    time.sleep(0.3)
    assert processes_of(tenant.pw_uid)

    ended = hook("end", sshd)

    assert ended.returncode == 0, ended.stderr
    assert not exists(USER)
    assert not Path(tenant.pw_dir).exists()
    assert processes_of(tenant.pw_uid) == []
    assert not Path("/tmp/forker.py").exists()  # its files outside the home went too
    login = sshd.ssh("echo in")
    assert login.returncode == 255 and "in" not in login.stdout
    again = hook("end", sshd)  # an end runs again after a daemon restart: it must succeed
    assert again.returncode == 0, again.stderr


def test_a_federation_lease_is_reached_with_gpufed_lease_ssh_and_closed_when_released(
    sshd: Sshd, replica: ReplicaThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon runs the real hook as the provider would; its answer points at our sshd. The
    # developer's side is `gpufed lease ssh`, which runs the real ssh client.
    monkeypatch.setenv("GPUFED_HOOK_SSH_HOST", "127.0.0.1")
    monkeypatch.setenv("GPUFED_HOOK_SSH_PORT", str(sshd.port))
    monkeypatch.delenv("GPUFED_HOOK_DRY_RUN", raising=False)
    with Client(replica.address, ADMIN_TOKEN) as admin:
        tenant = admin.create_token("tenant", "dev").secret
        provider = admin.create_token("provider", "neo").secret
    cfg = daemon_config(
        [replica.address], provider, "neo", "n1", lease_hook=str(HOOK), lease_hook_timeout=60,
        state_dir=str(tmp_path / "state"),
    )  # fmt: skip
    daemon = DaemonThread(cfg, FakeNvml("l40s-4")).start()
    user = ""
    try:
        with Client(replica.address, tenant) as c:
            wait_until(lambda: sum(o.free_gpus for o in c.search_offers(providers=["neo"])) == 4, timeout=20)
            public = sshd.key.with_suffix(".pub").read_text(encoding="utf-8").strip()
            lease = c.wait_active(c.create_lease(2, ttl_s=60, ssh_keys=[public]).name, timeout=30)
            user = "gpufed-" + lease.name.split("/")[1][:16]

            def login(*command: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [
                        sys.executable, "-m", "gpufed", "--endpoint", replica.address, "--token", tenant,
                        "lease", "ssh", lease.name, "--key", str(sshd.key),
                        "--ssh-option", f"UserKnownHostsFile={sshd.known_hosts}",
                        "--ssh-option", "BatchMode=yes", "--", *command,
                    ],
                    capture_output=True, text=True, timeout=60,
                    env={**os.environ, "GPUFED_CONFIG": "/nonexistent"},
                )  # fmt: skip

            inside = login("echo", "$USER", "gpus=$CUDA_VISIBLE_DEVICES")
            assert inside.returncode == 0, inside.stderr
            indexes = ",".join(str(g.index) for g in lease.gpus)
            assert inside.stdout.strip() == f"{user} gpus={indexes}"

            c.release_lease(lease.name)
            wait_until(lambda: not exists(user), timeout=30)
            assert login("echo", "in").returncode != 0
    finally:
        daemon.stop()
        if user and exists(user):  # the test failed half-way: leave the host clean
            subprocess.run(["pkill", "-KILL", "-u", user], check=False)
            subprocess.run(["userdel", "--remove", user], check=False, capture_output=True)
