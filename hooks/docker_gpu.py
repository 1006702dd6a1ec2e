#!/usr/bin/env python3
"""Reference lease hook: one container per lease with exactly the lease's GPUs
(`docker run --gpus device=UUID,...`, NVIDIA Container Toolkit) and an SSH server that
accepts the tenant's keys; removed when the lease ends.

Run by gpufed's node daemon (`node_daemon --lease-hook /path/to/docker_gpu.py`), one JSON
document on stdin (docs/providers.md, "Lease hooks"). Idempotent: a start finds the lease's
container if it is already running; an end for a container that is gone succeeds.

The image must run sshd on port 22 and install the keys in PUBLIC_KEY (as
lscr.io/linuxserver/openssh-server does, with USER_NAME). A tenant may pick another image
through the provider option `image` only among GPUFED_HOOK_IMAGES (comma-separated; the first is
the default).

Environment: GPUFED_HOOK_IMAGES, GPUFED_HOOK_SSH_HOST (default: this host's FQDN),
GPUFED_HOOK_DRY_RUN=1 prints the commands on stderr instead of running them.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from typing import Any

DRY_RUN = os.environ.get("GPUFED_HOOK_DRY_RUN") == "1"
DEFAULT_IMAGE = "lscr.io/linuxserver/openssh-server:latest"
IMAGES = [i for i in os.environ.get("GPUFED_HOOK_IMAGES", DEFAULT_IMAGE).split(",") if i]


def docker(*args: str, check: bool = True) -> str:
    print("+ " + shlex.join(("docker", *args)), file=sys.stderr)
    if DRY_RUN:
        return ""
    out = subprocess.run(("docker", *args), check=check, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    return str(out.stdout).strip()


def name_of(doc: dict[str, Any]) -> str:
    return "gpufed-" + str(doc["lease"]).split("/", 1)[1]


def start(doc: dict[str, Any]) -> dict[str, str]:
    name = name_of(doc)
    image = doc["access"]["provider_options"].get("image", IMAGES[0])
    if image not in IMAGES:
        print(f"image {image!r} is not offered here (GPUFED_HOOK_IMAGES)", file=sys.stderr)
        sys.exit(2)  # fails the provisioning: the tenant learns why from its lease
    uuids = ",".join(g["uuid"] for g in doc["gpus"])
    running = docker("ps", "--quiet", "--filter", f"name=^{name}$")
    if not running:
        docker(
            "run", "--detach", "--name", name,
            "--gpus", f'"device={uuids}"',
            "--publish", "0:22" if DRY_RUN else "0:2222",
            "--env", "USER_NAME=gpufed",
            "--env", "PUBLIC_KEY=" + "\n".join(doc["access"]["ssh_public_keys"]),
            "--label", f"gpufed.lease={doc['lease']}",
            "--label", f"gpufed.fencing_token={doc['fencing_token']}",
            image,
        )  # fmt: skip
    port = docker("port", name, "2222/tcp").rsplit(":", 1)[-1] if not DRY_RUN else "32768"
    host = os.environ.get("GPUFED_HOOK_SSH_HOST") or socket.getfqdn()
    return {
        "ssh": f"ssh -p {port} gpufed@{host}",
        "instructions": f"container {name} ({image}) with GPUs {uuids}; removed when the lease ends.",
    }


def main() -> None:
    doc = json.load(sys.stdin)
    if doc["action"] == "start":
        json.dump(start(doc), sys.stdout)
    else:
        docker("rm", "--force", name_of(doc), check=False)  # gone already: fine


if __name__ == "__main__":
    main()
