"""Lease assignments on this host, guarded by fencing tokens.

A token is the etcd revision of the grant. For each GPU the daemon remembers the newest token it
has accepted and rejects any assignment older than that: a delayed message from a replica that
lost its stream cannot hand a GPU back to a lease that has been superseded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufed.v1 import node_pb2

STARTED = node_pb2.ASSIGNMENT_ACTION_STARTED
ENDED = node_pb2.ASSIGNMENT_ACTION_ENDED


@dataclass
class Assignments:
    newest: dict[str, int] = field(default_factory=dict)  # gpu uuid -> newest fencing token
    active: dict[str, node_pb2.LeaseAssignment] = field(default_factory=dict)  # lease name -> assignment

    def apply(self, a: node_pb2.LeaseAssignment) -> tuple[bool, str]:
        """Accept or reject one assignment; (accepted, reason)."""
        if a.fencing_token <= 0 or a.action not in (STARTED, ENDED):
            return False, "MALFORMED_ASSIGNMENT"
        if a.action == ENDED:
            # Always: an end concerns only its own lease, however late it comes.
            self.active.pop(a.lease, None)
            return True, ""
        for uuid in a.gpu_uuids:
            if a.fencing_token < self.newest.get(uuid, 0):
                return False, "STALE_FENCING_TOKEN"
        if a.action == STARTED:
            for uuid in a.gpu_uuids:
                self.newest[uuid] = a.fencing_token
            self.active[a.lease] = a
        else:
            self.active.pop(a.lease, None)
        return True, ""

    def holder(self, gpu_uuid: str) -> str | None:
        for name, a in self.active.items():
            if gpu_uuid in a.gpu_uuids:
                return name
        return None
