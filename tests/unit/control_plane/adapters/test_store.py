"""The etcd adapter's pure parts: prefix ranges and channel targets."""

from __future__ import annotations

from control_plane.adapters.store import _channel_target, prefix_end


def test_prefix_ranges_select_every_key_below_a_prefix() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"\xff") == b"\0"


def test_several_endpoints_become_one_failover_target() -> None:
    assert _channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert _channel_target(["etcd.example:2379"]) == "dns:///etcd.example:2379"
