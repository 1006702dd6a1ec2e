#!/usr/bin/env python3
"""The demo's lease hook: answers plausible access details without touching the host.

gpufed's node daemon runs a hook on each lease's start and end (docs/providers.md, "Lease
hooks"): one JSON document on stdin, JSON access details on stdout for a start.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    doc = json.load(sys.stdin)
    if doc["action"] != "start":
        return  # nothing was set up, nothing to take down
    lease_id = doc["lease"].split("/", 1)[1]
    user = f"lease-{lease_id[:8]}"
    host = f"{doc['node_id']}.{doc['provider']}.gpufed.example"
    json.dump(
        {
            "ssh": f"ssh {user}@{host}",
            "endpoint": f"https://{host}:8888/?lease={lease_id}",
            "instructions": (
                f"CUDA_VISIBLE_DEVICES={doc['cuda_visible_devices']} is set for {user}; "
                f"{len(doc['access']['ssh_public_keys'])} SSH key(s) installed (demo: nothing was)."
            ),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
