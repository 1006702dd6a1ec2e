from __future__ import annotations

import json

import pytest

from control_plane.domain import schema
from control_plane.domain.schema import DONE, MIGRATING, SCHEMA, Member, SchemaState


def _member(release: str, understood: int) -> bytes:
    return Member(release, understood, "127.0.0.1:1").to_json()


def test_an_absent_schema_key_is_schema_one_which_the_releases_before_it_wrote() -> None:
    assert schema.parse_state(None) == SchemaState(1, DONE)
    assert schema.writes_version(None) == 1


def test_the_schema_key_round_trips() -> None:
    state = SchemaState(2, MIGRATING, "0.2.0", 7)
    assert schema.parse_state(state.to_json()) == state


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b"{}", b'{"version": 0, "state": "done"}', b'{"version": 2, "state": "x"}']
)
def test_a_schema_key_no_release_wrote_is_refused_not_guessed(raw: bytes) -> None:
    assert "not a schema record" in schema.refusal(raw, "0.2.0")


def test_a_replica_refuses_to_write_under_a_schema_newer_than_it_understands_saying_which() -> None:
    newer = SchemaState(SCHEMA + 1, DONE, "0.9.0").to_json()
    why = schema.refusal(newer, "0.2.0")
    assert f"schema {SCHEMA + 1}" in why and "0.9.0" in why and f"up to schema {SCHEMA}" in why
    assert schema.refusal(SchemaState(SCHEMA, MIGRATING).to_json(), "0.2.0") == ""
    assert schema.refusal(None, "0.2.0") == ""


def test_the_migration_starts_only_once_every_live_replica_understands_the_new_schema() -> None:
    state = SchemaState()
    replicas = {"a": b"addr", "b": b"addr"}
    # b runs a release before 0.2.0: a replica key, no member key.
    assert schema.next_step(state, replicas, {"a": _member("0.2.0", 2)}) == ""
    assert schema.laggards(replicas, {"a": _member("0.2.0", 2)}, 2) == ["b"]
    # b of a release that understands only schema 1 (or says nothing readable).
    assert schema.next_step(state, replicas, {"a": _member("0.2.0", 2), "b": _member("0.1.5", 1)}) == ""
    assert schema.next_step(state, replicas, {"a": _member("0.2.0", 2), "b": b"garbage"}) == ""
    both = {"a": _member("0.2.0", 2), "b": _member("0.2.1", 2)}
    assert schema.next_step(state, replicas, both) == "start"
    assert schema.next_step(SchemaState(2, MIGRATING), replicas, both) == "migrate"
    assert schema.next_step(SchemaState(2, DONE), replicas, both) == ""
    assert schema.next_step(SchemaState(SCHEMA + 1, MIGRATING), replicas, both) == ""
    assert schema.next_step(state, {}, {}) == ""


def test_the_leader_migrates_to_the_newest_schema_every_replica_understands_step_by_step() -> None:
    replicas = {"a": b"addr", "b": b"addr"}
    mixed = {"a": _member("0.3.0", 3), "b": _member("0.2.0", 2)}
    assert schema.target(replicas, mixed) == 2
    assert schema.next_step(SchemaState(), replicas, mixed) == "start"  # to 2, beside 0.2.0
    assert schema.next_step(SchemaState(2, DONE), replicas, mixed) == ""
    upgraded = {"a": _member("0.3.0", 3), "b": _member("0.3.0", 3)}
    assert schema.target(replicas, upgraded) == SCHEMA
    assert schema.next_step(SchemaState(2, DONE), replicas, upgraded) == "start"
    assert schema.target(replicas, {"a": _member("0.9.0", 9), "b": _member("0.9.0", 9)}) == SCHEMA


def test_requests_may_queue_only_once_every_replica_reads_the_queue() -> None:
    assert not schema.queue_open(None)
    assert not schema.queue_open(SchemaState(2, DONE).to_json())
    assert not schema.queue_open(b"garbage")
    assert schema.queue_open(SchemaState(3, MIGRATING).to_json())
    assert schema.queue_open(SchemaState(3, DONE).to_json())


def test_writers_write_the_new_shape_only_once_the_schema_key_says_so() -> None:
    assert "v" not in schema.stamped({"a": 1}, schema.writes_version(None))
    stamped = schema.stamped({"a": 1}, schema.writes_version(SchemaState(2, MIGRATING).to_json()))
    assert stamped["v"] == 2
    # A key newer than this release: it writes (if it wrote at all) no shape it does not know.
    assert schema.writes_version(SchemaState(9, DONE).to_json()) == SCHEMA


def test_the_migration_stamps_schema_one_json_records_and_leaves_the_rest() -> None:
    old = json.dumps({"kind": "tenant", "principal": "acme"}).encode()
    new = schema.migrated_json(old)
    assert new is not None and json.loads(new) == {"kind": "tenant", "principal": "acme", "v": 2}
    assert schema.record_version(json.loads(new)) == 2
    assert schema.record_version(json.loads(old)) == 1
    assert schema.migrated_json(new) is None  # once
    assert schema.migrated_json(b"not json") is None
    assert schema.migrated_json(b"[1, 2]") is None


def test_a_member_key_round_trips_and_a_mangled_one_reads_as_none() -> None:
    m = Member("0.2.0", 2, "10.0.0.1:50051", "etcd holds schema 3")
    assert schema.parse_member(m.to_json()) == m
    assert schema.parse_member(b"{") is None
    assert schema.parse_member(b'{"release": "x"}') is None
