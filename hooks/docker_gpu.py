#!/usr/bin/env python3
"""Reference lease hook: one container per lease with exactly the lease's GPUs and an SSH server
that accepts the tenant's keys; removed when the lease ends.

Run by gpufed's node daemon (`node_daemon --lease-hook /path/to/docker_gpu.py`), one JSON
document on stdin (docs/providers.md, "Lease hooks"). Idempotent: a start finds the lease's
container if it is already running; an end for a container that is gone succeeds.

GPUs by the NVIDIA Container Toolkit's CDI names (`--device nvidia.com/gpu=UUID`, the current
way; the spec from `nvidia-ctk cdi generate` names each GPU and MIG instance by its uuid), or
with GPUFED_HOOK_GPU_MODE=gpus the older `--gpus "device=UUID,..."`; default: CDI when a spec
is in /etc/cdi or /var/run/cdi.

The container gets no capability beyond Docker's defaults (all dropped, then the few an SSH
image's init needs: GPUFED_HOOK_CAPS), no-new-privileges, a read-only root file system unless
the image is in GPUFED_HOOK_WRITABLE_IMAGES (its /tmp and /run are tmpfs), and memory and pid
limits: the tenant may ask for less than the provider's bounds through the provider options
`memory` (bytes, or with a k/m/g suffix) and `pids`, never more.

The image must run sshd on port 2222 and install the keys in PUBLIC_KEY (as
lscr.io/linuxserver/openssh-server does, with USER_NAME). A tenant may pick another image
through the provider option `image` only among GPUFED_HOOK_IMAGES (comma-separated; the first is
the default).

Environment: GPUFED_HOOK_IMAGES, GPUFED_HOOK_WRITABLE_IMAGES (default: the default image, whose
init writes to its root), GPUFED_HOOK_MAX_MEMORY (default 64g), GPUFED_HOOK_MAX_PIDS (4096),
GPUFED_HOOK_CAPS, GPUFED_HOOK_GPU_MODE (cdi or gpus), GPUFED_HOOK_SSH_HOST (default: this host's
FQDN), GPUFED_HOOK_DRY_RUN=1 prints the commands on stderr instead of running them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from typing import Any

DRY_RUN = os.environ.get("GPUFED_HOOK_DRY_RUN") == "1"
DEFAULT_IMAGE = "lscr.io/linuxserver/openssh-server:latest"
# A subset of Docker's default capabilities: what an SSH image's init needs to set up its user.
DEFAULT_CAPS = "CHOWN,DAC_OVERRIDE,FOWNER,SETGID,SETUID,KILL"
DOCKER_DEFAULT_CAPS = frozenset(
    {"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP"}
    | {"SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"}
)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def env_list(name: str, default: str) -> list[str]:
    return [i.strip() for i in os.environ.get(name, default).split(",") if i.strip()]


IMAGES = env_list("GPUFED_HOOK_IMAGES", DEFAULT_IMAGE)
WRITABLE_IMAGES = set(env_list("GPUFED_HOOK_WRITABLE_IMAGES", DEFAULT_IMAGE))


def refuse(message: str, status: int = 2) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)  # fails the provisioning: the tenant learns why from its lease


def docker(*args: str, check: bool = True) -> str:
    print("+ " + shlex.join(("docker", *args)), file=sys.stderr)
    if DRY_RUN:
        return ""
    out = subprocess.run(("docker", *args), check=check, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    return str(out.stdout).strip()


def name_of(doc: dict[str, Any]) -> str:
    lease_id = str(doc["lease"]).split("/", 1)[1]
    if not re.fullmatch(r"[0-9a-f]{1,32}", lease_id):
        refuse(f"unexpected lease id {lease_id!r}", 1)
    return "gpufed-" + lease_id


def size(text: str, what: str) -> int:
    m = re.fullmatch(r"([0-9]{1,15})([kmg]?)", text.strip().lower())
    if m is None:
        refuse(f"{what} {text[:40]!r} is not a size (bytes, or a number with k, m or g)")
        raise AssertionError  # unreachable: refuse exits
    return int(m.group(1)) * UNITS[m.group(2)]


def limits(options: dict[str, str]) -> tuple[int, int]:
    """(memory bytes, pids) for the container: the tenant's ask, within the provider's bounds."""
    max_memory = size(os.environ.get("GPUFED_HOOK_MAX_MEMORY", "64g"), "GPUFED_HOOK_MAX_MEMORY")
    max_pids = int(os.environ.get("GPUFED_HOOK_MAX_PIDS", "4096"))
    memory = size(options["memory"], "memory") if "memory" in options else max_memory
    if not 6 << 20 <= memory <= max_memory:  # Docker's minimum is 6 MiB
        refuse(f"memory {options.get('memory')!r} is outside this provider's bounds (6m..{max_memory} bytes)")
    pids_text = options.get("pids", str(max_pids))
    if not re.fullmatch(r"[0-9]{1,9}", pids_text) or not 16 <= int(pids_text) <= max_pids:
        refuse(f"pids {pids_text[:40]!r} is outside this provider's bounds (16..{max_pids})")
    return memory, int(pids_text)


def capabilities() -> list[str]:
    caps = [c.upper().removeprefix("CAP_") for c in env_list("GPUFED_HOOK_CAPS", DEFAULT_CAPS)]
    extra = sorted(set(caps) - DOCKER_DEFAULT_CAPS)
    if extra:
        refuse(f"GPUFED_HOOK_CAPS may only keep Docker's default capabilities, not {extra}", 1)
    return caps


def gpu_args(doc: dict[str, Any]) -> list[str]:
    uuids = [str(g["uuid"]) for g in doc["gpus"]]
    for u in uuids:
        if not re.fullmatch(r"(GPU|MIG)-[A-Za-z0-9-]{1,92}", u):
            refuse(f"unexpected GPU uuid {u[:100]!r}", 1)
    mode = os.environ.get("GPUFED_HOOK_GPU_MODE") or (
        "cdi" if glob.glob("/etc/cdi/nvidia*.yaml") + glob.glob("/var/run/cdi/nvidia*.yaml") else "gpus"
    )
    if mode == "cdi":
        return [a for u in uuids for a in ("--device", f"nvidia.com/gpu={u}")]
    if mode == "gpus":
        return ["--gpus", f'"device={",".join(uuids)}"']
    refuse(f"GPUFED_HOOK_GPU_MODE must be cdi or gpus, not {mode!r}", 1)
    return []


def start(doc: dict[str, Any]) -> dict[str, str]:
    name = name_of(doc)
    options = dict(doc["access"]["provider_options"])
    image = options.get("image", IMAGES[0])
    if image not in IMAGES:
        refuse(f"image {image[:200]!r} is not offered here (GPUFED_HOOK_IMAGES)")
    memory, pids = limits(options)
    caps = capabilities()
    gpus = gpu_args(doc)
    running = docker("ps", "--quiet", "--filter", f"name=^{name}$")
    if not running:
        root = [] if image in WRITABLE_IMAGES else [
            "--read-only",
            "--tmpfs", "/tmp:rw,nosuid,nodev",
            "--tmpfs", "/run:rw,nosuid,nodev",
        ]  # fmt: skip
        docker(
            "run", "--detach", "--name", name,
            *gpus,
            "--cap-drop", "ALL", *(a for c in caps for a in ("--cap-add", c)),
            "--security-opt", "no-new-privileges:true",
            *root,
            "--memory", str(memory), "--memory-swap", str(memory),  # no swap beyond the memory
            "--pids-limit", str(pids),
            "--publish", "0:2222",
            "--env", "USER_NAME=gpufed",
            "--env", "PUBLIC_KEY=" + "\n".join(doc["access"]["ssh_public_keys"]),
            "--label", f"gpufed.lease={doc['lease']}",
            "--label", f"gpufed.fencing_token={doc['fencing_token']}",
            image,
        )  # fmt: skip
    port = docker("port", name, "2222/tcp").rsplit(":", 1)[-1] if not DRY_RUN else "32768"
    host = os.environ.get("GPUFED_HOOK_SSH_HOST") or socket.getfqdn()
    uuids = ",".join(g["uuid"] for g in doc["gpus"])
    return {
        "ssh": f"ssh -p {port} gpufed@{host}",
        "instructions": f"container {name} ({image}) with GPUs {uuids}, {memory >> 20} MiB and {pids} "
        "processes; removed when the lease ends.",
    }


def main() -> None:
    doc = json.load(sys.stdin)
    if doc["action"] == "start":
        json.dump(start(doc), sys.stdout)
    else:
        docker("rm", "--force", name_of(doc), check=False)  # gone already: fine


if __name__ == "__main__":
    main()
