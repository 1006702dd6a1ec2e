"""The etcd adapter's pure parts: prefix ranges and channel targets."""

from __future__ import annotations

from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import (
    _channel_target,
    prefix_end,
)


def test_keyspace_and_prefix_ranges() -> None:
    k = Keyspace("/gpufed")
    assert k.node("p", "n") == "/gpufed/nodes/p/n"
    assert k.relative(b"/gpufed/alloc/p/n/g") == ["alloc", "p", "n", "g"]
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"\xff") == b"\0"
    assert _channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert _channel_target(["etcd.example:2379"]) == "dns:///etcd.example:2379"
