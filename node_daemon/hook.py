"""The provider's lease hook: an executable the daemon runs when a lease starts and ends on
this host (--lease-hook PATH), with one JSON document on stdin; for a start it prints JSON
access details. The contract is in docs/providers.md ("Lease hooks").

The hook runs as a child process with a timeout, off the stream's loop (an asyncio subprocess);
its stderr goes to the daemon's log, line by line.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from gpufed.logs import get_logger
from gpufed.v1 import lease_pb2, node_pb2

log = get_logger(__name__)

MAX_STDOUT_BYTES = 64 * 1024
MAX_STDERR_LINES = 50
DETAIL_FIELDS = ("ssh", "endpoint", "instructions")


@dataclass(frozen=True)
class HookOutcome:
    ok: bool
    details: lease_pb2.AccessDetails
    error: str = ""


def hook_input(
    action: str,
    a: node_pb2.LeaseAssignment,
    indexes: dict[str, int],
    provider: str,
    node_id: str,
) -> dict[str, Any]:
    """The document on the hook's stdin. GPUs in the assignment's order; CUDA_VISIBLE_DEVICES by
    index (NVML's, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID), a MIG instance by its
    MIG-... uuid (its index is its GPU's, which would give away the whole GPU)."""
    gpus = [{"uuid": u, "index": indexes.get(u, -1)} for u in a.gpu_uuids]
    return {
        "version": 1,
        "action": action,
        "lease": a.lease,
        "tenant": a.tenant,
        "provider": provider,
        "node_id": node_id,
        "gpus": gpus,
        "cuda_visible_devices": ",".join(
            str(g["uuid"]) if str(g["uuid"]).startswith("MIG-") else str(g["index"]) for g in gpus
        ),
        "fencing_token": a.fencing_token,
        "expire_time": a.expire_time.ToJsonString() if a.HasField("expire_time") else "",
        "access": {
            "ssh_public_keys": list(a.access.ssh_public_keys),
            "provider_options": dict(a.access.provider_options),
        },
    }


def parse_details(stdout: bytes) -> lease_pb2.AccessDetails:
    """The hook's answer to a start: a JSON object with optional string fields ssh, endpoint,
    instructions (others are ignored). ValueError if it is not that."""
    if len(stdout) > MAX_STDOUT_BYTES:
        raise ValueError(f"the hook printed more than {MAX_STDOUT_BYTES} bytes")
    text = stdout.decode("utf-8", errors="strict").strip()
    doc = json.loads(text) if text else {}
    if not isinstance(doc, dict):
        raise ValueError("the hook printed JSON that is not an object")
    out = lease_pb2.AccessDetails()
    for name in DETAIL_FIELDS:
        value = doc.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        setattr(out, name, value)
    return out


class LeaseHook:
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    async def run(self, doc: dict[str, Any]) -> HookOutcome:
        lease, action = doc["lease"], doc["action"]
        try:
            proc = await asyncio.create_subprocess_exec(
                self.path,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            return HookOutcome(False, lease_pb2.AccessDetails(), f"the lease hook could not start: {e}")
        try:
            out, err = await asyncio.wait_for(proc.communicate(json.dumps(doc).encode()), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return HookOutcome(
                False, lease_pb2.AccessDetails(), f"the lease hook timed out after {self.timeout:g} s"
            )
        lines = err.decode(errors="replace").splitlines()
        for line in lines[-MAX_STDERR_LINES:]:
            log.info("lease hook", lease=lease, action=action, stderr=line[:500])
        if proc.returncode != 0:
            last = lines[-1][:300] if lines else ""
            error = f"the lease hook exited with status {proc.returncode}" + (f": {last}" if last else "")
            return HookOutcome(False, lease_pb2.AccessDetails(), error)
        if action != "start":
            return HookOutcome(True, lease_pb2.AccessDetails())
        try:
            return HookOutcome(True, parse_details(out))
        except (ValueError, UnicodeDecodeError) as e:
            return HookOutcome(False, lease_pb2.AccessDetails(), f"the lease hook's answer: {e}")
