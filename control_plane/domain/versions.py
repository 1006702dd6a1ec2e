"""Releases and the version skew policy (docs/operations.md, "Version skew policy").

A release is MAJOR.MINOR.PATCH (a pre-release, development or build suffix is allowed and
ignored here). "A release" in the policy is a minor release: 0.2.x follows 0.1.x. The policy:

- replicas of releases N and N-1 run side by side on one etcd (a rolling upgrade);
- node daemons may be up to DAEMON_SKEW releases older than the replica they stream to, never
  newer (upgrade the replicas first), and of the same major version;
- the SDK and CLI may be any release of the same major version (the wire contract is checked
  by `buf breaking` against the last release).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from control_plane.domain import errors
from control_plane.domain.errors import shown

DAEMON_SKEW = 2
_NUMBER = r"(0|[1-9][0-9]{0,5})"
# Then a semver pre-release or build suffix (0.3.0-rc.1, 0.3.0+abc) or a PEP 440 one (0.3.0.dev0,
# 0.3.0rc1: what pyproject.toml says between releases). The length is bounded before
# (registration.MAX_VERSION).
_RELEASE = re.compile(rf"{_NUMBER}\.{_NUMBER}\.{_NUMBER}(?:[-+][0-9A-Za-z.+-]+|\.?[A-Za-z][0-9A-Za-z.+-]*)?")


class Release(NamedTuple):
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse(text: str) -> Release | None:
    m = _RELEASE.fullmatch(text)
    return None if m is None else Release(int(m[1]), int(m[2]), int(m[3]))


def release(text: str) -> Release:
    """A version this program was built as: it must parse."""
    found = parse(text)
    if found is None:
        raise ValueError(f"{text!r} is not a release version")
    return found


def oldest_daemon(replica: Release) -> Release:
    """The oldest daemon release a replica of `replica` accepts."""
    return Release(replica.major, max(0, replica.minor - DAEMON_SKEW), 0)


def check_daemon(daemon_version: str, replica: Release) -> None:
    """FAILED_PRECONDITION DAEMON_VERSION_UNSUPPORTED for a daemon outside the policy: no
    release version, another major, more than DAEMON_SKEW releases older, or newer."""
    daemon = parse(daemon_version)
    oldest = oldest_daemon(replica)
    if daemon is None:
        problem = f"the hello's daemon_version {shown(daemon_version)} is not a release (MAJOR.MINOR.PATCH)"
    elif daemon[:2] > replica[:2]:
        problem = f"daemon {daemon} is newer than this replica ({replica}): upgrade the control plane first"
    elif daemon.major != replica.major or daemon[:2] < oldest[:2]:
        problem = f"daemon {daemon} is older than this replica ({replica}) accepts: upgrade the daemon"
    else:
        return
    raise errors.failed_precondition(
        "DAEMON_VERSION_UNSUPPORTED",
        f"{problem}; replica {replica} accepts daemons {oldest.major}.{oldest.minor}.x to "
        f"{replica.major}.{replica.minor}.x",
        field="hello.daemon_version",
    )
