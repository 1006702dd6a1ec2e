"""The schema of what gpufed keeps in etcd, and the rules that move it from one version to the
next during a rolling upgrade (docs/operations.md, "Upgrading").

One key, `{prefix}/schema` (JSON), says which schema the records are in; absent, schema 1 (the
releases before 0.2.0 wrote none). Each replica says which release it runs and the newest schema
it understands in its member key, on its session lease. Replicas of 0.1.0 write no member key:
a replica key without one is a replica that understands schema 1 only.

The steps, all by the leader, each in one Txn fenced by its term:

1. every live replica understands schema N+1: the schema key says N+1, "migrating". From then
   on writers write the N+1 shape (they read the key through the index);
2. the records of schema N are rewritten in the N+1 shape, a bounded batch to a Txn, each key
   compared unchanged since it was read (a concurrent write wins; the next pass looks again);
3. none is left: the schema key says N+1, "done".

A replica that finds a schema newer than it understands writes nothing (the store refuses
every write but its own liveness keys) and reports NOT_SERVING with the reason.

Schema 2 (release 0.2.0): every JSON record (tokens/, quotas/, burst/) carries the version of
its own shape, "v". Schema 3 (release 0.3.0): requests waiting for capacity, queue/{lease_id};
nothing to rewrite. Protobuf records (nodes, leases, usage) carry none: they change only by
fields added under `buf breaking` (make lint), so every release in the skew policy reads every
other's records, unknown fields kept; the schema key covers what their fields mean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The newest schema this release understands (reads, and writes once the key says so).
SCHEMA = 3
# The first schema with the queue (queue/{lease_id} records): no replica writes one before every
# replica reads them, since a release that does not know them would grant past the queue and
# answer NOT_FOUND for a queued lease.
QUEUE_SCHEMA = 3
# The oldest schema this release still reads: the previous release's records.
OLDEST_READ = 1
MIGRATING, DONE = "migrating", "done"
# The field of a JSON record that says its shape; a record without one is of schema 1.
RECORD_VERSION = "v"
# Records rewritten per migration Txn: bounded like every Txn (etcd's --max-txn-ops is 128).
MIGRATION_BATCH = 100


@dataclass(frozen=True, slots=True)
class SchemaState:
    version: int = 1
    state: str = DONE
    release: str = ""  # the release of the leader that wrote the key
    update_time_ns: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "state": self.state,
                "release": self.release,
                "update_time_ns": self.update_time_ns,
            },
            sort_keys=True,
        ).encode()


class SchemaUnreadable(ValueError):
    """The schema key holds what no release wrote: treated as newer than any we know."""


def parse_state(raw: bytes | None) -> SchemaState:
    if raw is None:
        return SchemaState()
    try:
        d = json.loads(raw)
        version, state = d["version"], d["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaUnreadable(f"the schema key is not a schema record: {raw[:80]!r}") from e
    if not isinstance(version, int) or version < 1 or state not in (MIGRATING, DONE):
        raise SchemaUnreadable(f"the schema key is not a schema record: {raw[:80]!r}")
    return SchemaState(version, state, str(d.get("release", "")), int(d.get("update_time_ns", 0)))


def refusal(raw: bytes | None, release: str, understood: int = SCHEMA) -> str:
    """Why a replica of `release` must not write under this schema key ("" if it may)."""
    try:
        state = parse_state(raw)
    except SchemaUnreadable as e:
        return f"{e}; this release ({release}) writes nothing"
    if state.version <= understood:
        return ""
    by = f" (written by release {state.release})" if state.release else ""
    return (
        f"etcd holds schema {state.version}{by}; this release ({release}) understands up to "
        f"schema {understood}: run {state.release or 'a newer release'} or later, or restore etcd "
        "from the backup taken before the upgrade"
    )


@dataclass(frozen=True, slots=True)
class Member:
    """What a replica says about itself in its member key."""

    release: str
    schema: int  # the newest schema it understands
    address: str = ""
    refusing: str = ""  # why it writes nothing, if it does not

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"release": self.release, "schema": self.schema, "address": self.address}
        if self.refusing:
            d["refusing"] = self.refusing
        return json.dumps(d, sort_keys=True).encode()


def parse_member(raw: bytes) -> Member | None:
    try:
        d = json.loads(raw)
        return Member(
            str(d["release"]), int(d["schema"]), str(d.get("address", "")), str(d.get("refusing", ""))
        )
    except (ValueError, KeyError, TypeError):
        return None


def laggards(replicas: Mapping[str, object], members: Mapping[str, bytes], target: int) -> list[str]:
    """The live replicas that do not understand schema `target`: those of releases before
    0.2.0 (a replica key, no member key) and those whose member key says an older schema."""
    out = []
    for rid in sorted(replicas):
        raw = members.get(rid)
        member = parse_member(raw) if raw is not None else None
        if member is None or member.schema < target:
            out.append(rid)
    return out


def target(replicas: Mapping[str, object], members: Mapping[str, bytes]) -> int:
    """The newest schema every live replica understands (at most this release's): the one
    the leader migrates to, step by step as the replicas upgrade."""
    understood = [SCHEMA]
    for rid in replicas:
        raw = members.get(rid)
        member = parse_member(raw) if raw is not None else None
        understood.append(member.schema if member is not None else 1)
    return max(1, min(understood))


def next_step(state: SchemaState, replicas: Mapping[str, object], members: Mapping[str, bytes]) -> str:
    """What the leader does next: "start" (every replica understands a newer schema than the
    key's: begin migrating to target()), "migrate" (rewrite old records), or "" (nothing:
    done, or a replica still lags)."""
    if state.version > SCHEMA:
        return ""  # not ours to touch (this replica refuses writes anyway)
    if state.state == MIGRATING:
        return "migrate"
    if not replicas or target(replicas, members) <= state.version:
        return ""
    return "start"


def queue_open(raw_state: bytes | None) -> bool:
    """Whether requests may be queued: the key says every replica reads the queue."""
    try:
        return parse_state(raw_state).version >= QUEUE_SCHEMA
    except SchemaUnreadable:
        return False


def writes_version(raw_state: bytes | None) -> int:
    """The schema writers write now: the key's (it moves to N+1 only once every replica reads
    N+1), at most the one this release knows."""
    try:
        return min(parse_state(raw_state).version, SCHEMA)
    except SchemaUnreadable:
        return OLDEST_READ


def stamped(record: dict[str, Any], version: int) -> dict[str, Any]:
    """A JSON record as schema `version` writes it: from schema 2 on, with its own version."""
    if version >= 2:
        record[RECORD_VERSION] = 2
    return record


def record_version(record: Mapping[str, Any]) -> int:
    v = record.get(RECORD_VERSION, 1)
    return v if isinstance(v, int) and v >= 1 else 1


def migrated_json(raw: bytes) -> bytes | None:
    """A schema-1 JSON record rewritten in the schema-2 shape; None if it needs nothing (already
    stamped) or is not a JSON object (left as it is: a reader skips it either way)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or RECORD_VERSION in record:
        return None
    return json.dumps(stamped(record, 2), sort_keys=True).encode()
