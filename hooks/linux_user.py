#!/usr/bin/env python3
"""Reference lease hook: one Linux user per lease, with the tenant's SSH keys and the lease's
GPUs in CUDA_VISIBLE_DEVICES; locked, emptied of processes and removed with its home when the
lease ends.

Run by gpufed's node daemon (`node_daemon --lease-hook /path/to/linux_user.py`) as root, one
JSON document on stdin (docs/providers.md, "Lease hooks"). Idempotent both ways: a start for a
user that exists rewrites its keys; an end for a user that is gone succeeds.

It runs as root in a home its tenant controls, so it never follows a link there: every file is
written through a directory fd, to a new temporary name (O_EXCL, O_NOFOLLOW), chowned and
chmodded on its fd and renamed over the old name (which replaces a planted symlink, not what it
points at); a FIFO or device planted in place of a file is never opened for reading.

What is isolated: the account (its own uid, home mode 0700, no other tenant reads it), its
processes (the end kills every one, atomically per pass), its files in /tmp, /var/tmp and
/dev/shm (removed at the end, so a reused uid inherits nothing). GPUs: CUDA_VISIBLE_DEVICES
selects them but does not isolate them; on a systemd host the user's slice also gets a device
allow-list (DevicePolicy=closed, the lease's /dev/nvidiaN and the driver's control nodes), so
the other GPUs cannot be opened from its sessions. Without systemd, use the container hook
(hooks/docker_gpu.py) where tenants must not reach each other's GPUs.

Environment: GPUFED_HOOK_SSH_HOST (default: this host's FQDN), GPUFED_HOOK_SSH_PORT (22),
GPUFED_HOOK_END_TIMEOUT (seconds to empty the account of processes, default 30),
GPUFED_HOOK_DRY_RUN=1 prints the commands on stderr instead of running them (and writes nothing).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DRY_RUN = os.environ.get("GPUFED_HOOK_DRY_RUN") == "1"
SYSTEMD = Path("/run/systemd/system").is_dir()
DROPIN_DIR = "/run/systemd/system/user-{uid}.slice.d"
DROPIN_NAME = "50-gpufed-gpus.conf"
MARK = "# gpufed: the lease's environment, for login and non-interactive shells (ssh host cmd)"
SOURCE = '[ -f "$HOME/.gpufed_env" ] && . "$HOME/.gpufed_env"'
MAX_RC_BYTES = 1 << 20
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# The driver's nodes every CUDA process opens, beside its GPUs' /dev/nvidiaN.
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


class HookError(Exception):
    """The hook cannot finish: it says why on stderr and exits 1 (the daemon retries an end)."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(*cmd: str, ok: tuple[int, ...] = (0,)) -> int:
    say("+ " + shlex.join(cmd))
    if DRY_RUN:
        return 0
    rc = subprocess.run(cmd, check=False, stdout=sys.stderr).returncode
    if rc not in ok:
        raise HookError(f"{cmd[0]} exited with status {rc}")
    return rc


def user_of(doc: dict[str, Any]) -> str:
    lease_id = str(doc["lease"]).split("/", 1)[1]
    if not re.fullmatch(r"[0-9a-f]{1,32}", lease_id):
        raise HookError(f"unexpected lease id {lease_id!r}")
    return "gpufed-" + lease_id[:16]  # 23 characters: within Linux's 32


def account(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


# -- files in the tenant's home, never through a link -------------------------------------------


def open_dir(parent: int | None, name: str, pw: pwd.struct_passwd, create: bool) -> int:
    """A directory fd for `name` (under the fd `parent`, or an absolute path), owned by the
    tenant with mode 0700 when it is one of its own; anything else in its place is removed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except OSError as e:
        if parent is None or not create or e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise
        if e.errno != errno.ENOENT:
            os.unlink(name, dir_fd=parent)  # a planted link or file: it goes, its target stays
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, flags, dir_fd=parent)
    st = os.fstat(fd)
    if parent is None and st.st_uid != pw.pw_uid:
        os.close(fd)
        raise HookError(f"{name} is not owned by {pw.pw_name}")
    if parent is not None:
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
        os.fchmod(fd, 0o700)
    return fd


def read_regular(dir_fd: int, name: str) -> str:
    """The text of a regular file in the directory, "" when there is none (or something else
    stands there: a link, a FIFO that would hang us, a device); never follows a link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RC_BYTES:
            return ""
        return os.read(fd, MAX_RC_BYTES).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def write_at(dir_fd: int, name: str, text: str, pw: pwd.struct_passwd, mode: int) -> None:
    """Replace `name` in the directory with a new file: created under a fresh name (O_EXCL,
    O_NOFOLLOW), owned and moded on its fd, then renamed over `name` (a link there is replaced,
    its target untouched)."""
    tmp = f".gpufed-{secrets.token_hex(8)}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
            f.write(text)
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def with_source_line(text: str) -> str:
    """The rc file with the line that reads the lease's environment first, before Debian's
    "not interactive: return", so that `ssh host cmd` sees CUDA_VISIBLE_DEVICES too."""
    if text.startswith(MARK + "\n" + SOURCE + "\n"):
        return text
    kept = "".join(line for line in text.splitlines(keepends=True) if line.rstrip("\n") not in (MARK, SOURCE))
    return f"{MARK}\n{SOURCE}\n{kept}"


def provision_home(pw: pwd.struct_passwd, keys: str, env: str) -> None:
    home = open_dir(None, pw.pw_dir, pw, create=False)
    try:
        os.fchmod(home, 0o700)  # no other tenant on the host reads it
        ssh = open_dir(home, ".ssh", pw, create=True)
        try:
            write_at(ssh, "authorized_keys", keys, pw, 0o600)
        finally:
            os.close(ssh)
        write_at(home, ".gpufed_env", env, pw, 0o644)
        for rc in (".bashrc", ".profile"):
            old = read_regular(home, rc)
            new = with_source_line(old)
            if new != old:
                write_at(home, rc, new, pw, 0o644)
    finally:
        os.close(home)


# -- GPUs: a device allow-list on the user's slice (systemd hosts) ---------------------------------


def gpu_dropin(doc: dict[str, Any]) -> str:
    nodes = [f"/dev/nvidia{int(g['index'])}" for g in doc["gpus"] if int(g["index"]) >= 0]
    allow = ["char-pts rw", *(f"{n} rw" for n in (*NVIDIA_CONTROL, *sorted(set(nodes))))]
    lines = [
        "# Written by gpufed's linux_user hook for " + str(doc["lease"]),
        "[Slice]",
        "DevicePolicy=closed",
    ]
    return "\n".join(lines + [f"DeviceAllow={a}" for a in allow]) + "\n"


def isolate_gpus(doc: dict[str, Any], uid: int) -> bool:
    """True when the user's sessions can open only the lease's GPUs."""
    if not SYSTEMD:
        return False
    directory = Path(DROPIN_DIR.format(uid=uid))
    say(f"+ write {directory / DROPIN_NAME} (device allow-list)")
    if not DRY_RUN:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)  # root's tree: no tenant writes here
        tmp = directory / (DROPIN_NAME + ".tmp")
        tmp.write_text(gpu_dropin(doc), encoding="utf-8")
        os.replace(tmp, directory / DROPIN_NAME)
    run("systemctl", "daemon-reload")
    return True


def drop_gpu_isolation(uid: int) -> None:
    path = Path(DROPIN_DIR.format(uid=uid)) / DROPIN_NAME
    if SYSTEMD and (DRY_RUN or path.exists()):
        say(f"+ rm {path}")
        if not DRY_RUN:
            path.unlink(missing_ok=True)
        run("systemctl", "daemon-reload")


# -- start ------------------------------------------------------------------------------------


def start(doc: dict[str, Any]) -> dict[str, str]:
    user = user_of(doc)
    if account(user) is None:
        run(
            "useradd", "--create-home", "--shell", "/bin/bash", "--key", "HOME_MODE=0700",
            "--password", "*",  # no password, and not locked: sshd without PAM refuses a "!" account
            "--comment", f"gpufed {doc['lease']}", user,
        )  # fmt: skip
    keys = "".join(k.strip() + "\n" for k in doc["access"]["ssh_public_keys"])
    env = f"export CUDA_VISIBLE_DEVICES={shlex.quote(str(doc['cuda_visible_devices']))}\n"
    pw = account(user)
    if DRY_RUN or pw is None:
        say(f"+ write ~{user}/.ssh/authorized_keys, ~{user}/.gpufed_env, the rc files (never through a link)")
        isolated = isolate_gpus(doc, 0)
    else:
        provision_home(pw, keys, env)
        isolated = isolate_gpus(doc, pw.pw_uid)
    host = os.environ.get("GPUFED_HOOK_SSH_HOST") or socket.getfqdn()
    port = os.environ.get("GPUFED_HOOK_SSH_PORT", "22")
    ssh = f"ssh {user}@{host}" if port == "22" else f"ssh -p {port} {user}@{host}"
    gpus = "only these GPUs can be opened" if isolated else "the host does not isolate the other GPUs"
    return {
        "ssh": ssh,
        "instructions": f"GPUs {doc['cuda_visible_devices']} (CUDA_VISIBLE_DEVICES; {gpus}) until the "
        "lease ends; the user, its processes and its files are removed then.",
    }


# -- end ----------------------------------------------------------------------------------------


def processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes with the uid as real, effective or saved uid."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uids = fields.get("Uid", "").split()
        if str(uid) in uids[:3] and not fields.get("State", "").strip().startswith(("Z", "X")):
            found.append(int(entry.name))
    return found


def kill_all(pw: pwd.struct_passwd, timeout: float) -> None:
    """Kill every process of the user until none is left. Each pass is kill(-1, SIGKILL) from a
    child that became the user: the kernel signals all of the uid's processes in one sweep, so a
    process that keeps forking cannot outrun it as it outruns pkill's scan of /proc."""
    deadline = time.monotonic() + timeout
    passes = 0
    while left := processes_of(pw.pw_uid):
        if time.monotonic() > deadline:
            raise HookError(
                f"{len(left)} processes of {pw.pw_name} survive after {passes} kill passes: {left[:10]}"
            )
        passes += 1
        child = os.fork()
        if child == 0:  # pragma: no cover - the child only kills and exits
            try:
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        time.sleep(0.02 * min(passes, 10))
    say(f"+ killed every process of {pw.pw_name} ({passes} passes)")


def remove_temp_files(uid: int) -> None:
    """Its files outside its home: a later user given the same uid must not inherit them."""
    for d in TMP_DIRS:
        if os.path.isdir(d):
            run("find", d, "-xdev", "-depth", "-uid", str(uid), "-delete", ok=(0, 1))


def end(doc: dict[str, Any]) -> None:
    user = user_of(doc)
    pw = account(user)
    if pw is None and not DRY_RUN:
        return  # ended before, or never started
    # First nobody gets in again: locked (no password), expired (no key either), keys gone.
    run("usermod", "--lock", "--expiredate", "1", user)
    say(f"+ rm ~{user}/.ssh/authorized_keys")
    if pw is not None and not DRY_RUN:
        remove_keys(pw)
    timeout = float(os.environ.get("GPUFED_HOOK_END_TIMEOUT", "30"))
    if pw is not None and not DRY_RUN:
        kill_all(pw, timeout)
        uid = pw.pw_uid
    else:
        say(f"+ kill(-1, SIGKILL) as {user} until none of its processes is left")
        uid = 0
    if shutil.which("crontab"):
        run("crontab", "-r", "-u", user, ok=(0, 1))  # 1: it had none
    remove_temp_files(uid)
    run("userdel", "--remove", user, ok=(0, 12))  # 12: no mail spool to remove (the home is gone)
    drop_gpu_isolation(uid)
    if not DRY_RUN and account(user) is not None:
        raise HookError(f"{user} still exists after userdel")
    if not DRY_RUN and Path(pw.pw_dir if pw else "/nonexistent").exists():
        raise HookError(f"{pw.pw_dir if pw else ''} still exists after userdel --remove")


def remove_keys(pw: pwd.struct_passwd) -> None:
    try:
        ssh = os.open(
            os.path.join(pw.pw_dir, ".ssh"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except OSError:
        return  # no keys directory (or a planted link: sshd refuses a linked .ssh under StrictModes)
    try:
        os.unlink("authorized_keys", dir_fd=ssh)
    except FileNotFoundError:
        pass
    finally:
        os.close(ssh)


def main() -> None:
    doc = json.load(sys.stdin)
    try:
        if doc["action"] == "start":
            json.dump(start(doc), sys.stdout)
        else:
            end(doc)
    except (HookError, OSError) as e:
        say(f"linux_user hook {doc.get('action')} of {doc.get('lease')} failed: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
