#!/usr/bin/env python3
"""Reference lease hook: one Linux user per lease, with the tenant's SSH keys and the lease's
GPUs in CUDA_VISIBLE_DEVICES; removed (with its processes and home) when the lease ends.

Run by gpufed's node daemon (`node_daemon --lease-hook /path/to/linux_user.py`) as root, one
JSON document on stdin (docs/providers.md, "Lease hooks"). Idempotent both ways: a start for a
user that exists rewrites its keys; an end for a user that is gone succeeds.

CUDA_VISIBLE_DEVICES selects GPUs, it does not isolate them: a user can still open every
/dev/nvidia* device. Where tenants must not reach each other's GPUs, use the container hook
(hooks/docker_gpu.py) or device cgroups.

Environment: GPUFED_HOOK_SSH_HOST (default: this host's FQDN), GPUFED_HOOK_SSH_PORT (22),
GPUFED_HOOK_DRY_RUN=1 prints the commands on stderr instead of running them (and writes nothing).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

DRY_RUN = os.environ.get("GPUFED_HOOK_DRY_RUN") == "1"


def run(*cmd: str, check: bool = True) -> None:
    print("+ " + shlex.join(cmd), file=sys.stderr)
    if not DRY_RUN:
        subprocess.run(cmd, check=check, stdout=sys.stderr)


def user_of(doc: dict[str, Any]) -> str:
    return "gpufed-" + str(doc["lease"]).split("/", 1)[1][:16]  # 23 characters: within Linux's 32


def exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def write(path: Path, text: str, user: str, mode: int) -> None:
    print(f"+ write {path} ({len(text)} bytes, mode {mode:o}, owner {user})", file=sys.stderr)
    if DRY_RUN:
        return
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    pw = pwd.getpwnam(user)
    os.chown(path.parent, pw.pw_uid, pw.pw_gid)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def start(doc: dict[str, Any]) -> dict[str, str]:
    user = user_of(doc)
    if not exists(user):
        run("useradd", "--create-home", "--shell", "/bin/bash", "--comment", f"gpufed {doc['lease']}", user)
    home = Path("/home") / user
    keys = "".join(k.strip() + "\n" for k in doc["access"]["ssh_public_keys"])
    write(home / ".ssh" / "authorized_keys", keys, user, 0o600)
    env = f"export CUDA_VISIBLE_DEVICES={doc['cuda_visible_devices']}\n"
    write(home / ".gpufed_env", env, user, 0o644)
    for rc in (".bashrc", ".profile"):
        line = "[ -f ~/.gpufed_env ] && . ~/.gpufed_env\n"
        path = home / rc
        if DRY_RUN or line not in (path.read_text(encoding="utf-8") if path.exists() else ""):
            print(f"+ append to {path}: {line.strip()}", file=sys.stderr)
            if not DRY_RUN:
                with path.open("a", encoding="utf-8") as f:
                    f.write(line)
    host = os.environ.get("GPUFED_HOOK_SSH_HOST") or socket.getfqdn()
    port = os.environ.get("GPUFED_HOOK_SSH_PORT", "22")
    ssh = f"ssh {user}@{host}" if port == "22" else f"ssh -p {port} {user}@{host}"
    return {
        "ssh": ssh,
        "instructions": f"GPUs {doc['cuda_visible_devices']} (CUDA_VISIBLE_DEVICES) until the lease ends; "
        "the user and its home are removed then.",
    }


def end(doc: dict[str, Any]) -> None:
    user = user_of(doc)
    if DRY_RUN or exists(user):
        run("pkill", "--signal", "KILL", "--uid", user, check=False)  # exit 1: no processes
        run("userdel", "--remove", user)


def main() -> None:
    doc = json.load(sys.stdin)
    if doc["action"] == "start":
        json.dump(start(doc), sys.stdout)
    else:
        end(doc)


if __name__ == "__main__":
    main()
