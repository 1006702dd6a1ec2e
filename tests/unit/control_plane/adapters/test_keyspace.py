"""The keyspace: where records live, and keys parsed back in the one place that does it."""

from __future__ import annotations

import pytest

from control_plane.adapters.keyspace import Key, KeyKind, Keyspace

K = Keyspace("/gpufed")


def test_records_live_under_the_prefix_and_records_beside_it() -> None:
    assert K.node("p", "n") == "/gpufed/nodes/p/n"
    assert K.alloc("p", "n", "g") == "/gpufed/alloc/p/n/g"
    assert K.request("t", "r") == "/gpufed.records/requests/t/r"
    assert K.hold("t", "r1", "00ff") == "/gpufed.records/holds/t/r1/00ff"
    assert K.hold("t", "r1", "00ff").startswith(K.holds_dir("t"))
    assert not K.hold("tt", "r1", "00ff").startswith(K.holds_dir("t"))
    assert K.relative(b"/gpufed/alloc/p/n/g") == ["alloc", "p", "n", "g"]


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        (K.node("p", "n"), Key(KeyKind.NODE, "providers/p/nodes/n")),
        (K.alive("p", "n"), Key(KeyKind.ALIVE, "providers/p/nodes/n")),
        (K.alloc("p", "n", "GPU-1"), Key(KeyKind.ALLOC, "providers/p/nodes/n", "GPU-1")),
        (K.lease("00ff"), Key(KeyKind.LEASE, "00ff")),
        (K.token("t1"), Key(KeyKind.TOKEN, "t1")),
        (K.replica("r1"), Key(KeyKind.REPLICA, "r1")),
        (K.leader, Key(KeyKind.LEADER, "leader")),
        (K.quota("tenants", "acme"), Key(KeyKind.QUOTA, "tenants/acme")),
    ],
)
def test_every_watched_key_parses_to_its_kind_and_resource(key: str, parsed: Key) -> None:
    assert K.parse(key.encode()) == parsed


@pytest.mark.parametrize(
    "key", ["/gpufed/nodes/p", "/gpufed/alloc/p/n", "/gpufed/leases/a/b", "/gpufed/other/x"]
)
def test_keys_outside_the_layout_parse_to_none(key: str) -> None:
    assert K.parse(key) is None
