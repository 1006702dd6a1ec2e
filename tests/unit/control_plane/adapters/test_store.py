"""The etcd adapter's pure parts: prefix ranges and channel targets."""

from __future__ import annotations

from control_plane.adapters.store import _channel_target, prefix_end


def test_prefix_ranges_select_every_key_below_a_prefix() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"\xff") == b"\0"


def test_several_endpoints_become_one_failover_target() -> None:
    assert _channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert _channel_target(["etcd.example:2379"]) == "dns:///etcd.example:2379"  # re-resolved by gRPC
    names = {"e1.example": ["10.0.0.1"], "e2.example": ["10.0.0.2", "10.0.0.3"]}
    target = _channel_target(["e1.example:2379", "e2.example:2379"], None, lambda h: names[h])
    assert target == "ipv4:10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"  # several names fail over too


def test_https_endpoints_are_never_downgraded_and_schemes_do_not_mix() -> None:
    import pytest

    from control_plane.adapters.store import EtcdTls, parse_endpoints
    from control_plane.config import ConfigError

    tls = EtcdTls(b"ca")
    assert parse_endpoints(["https://127.0.0.1:1", "https://127.0.0.2:2"], tls) == (
        [("127.0.0.1", "1"), ("127.0.0.2", "2")],
        True,
    )
    assert parse_endpoints(["127.0.0.1:1"], tls)[1] is True  # a CA alone means TLS
    assert parse_endpoints(["http://127.0.0.1:1", "127.0.0.2:2"], None)[1] is False
    for endpoints, t, error in [
        (["https://127.0.0.1:1"], None, "never downgraded"),
        (["http://127.0.0.1:1"], tls, "cannot be used with --etcd-ca"),
        (["127.0.0.1"], None, "not \\[http\\(s\\)://\\]HOST:PORT"),
        (["ftp://127.0.0.1:1"], None, "unknown etcd endpoint scheme"),
    ]:
        with pytest.raises(ConfigError, match=error):
            parse_endpoints(endpoints, t)
    assert _channel_target(["https://127.0.0.1:1", "https://[::1]:2"], tls) == "ipv6:[127.0.0.1]:1,[::1]:2"


def test_what_a_member_without_quorum_answers_is_an_outage_not_a_bug() -> None:
    import grpc

    from control_plane.adapters.store import EtcdStore, StoreNoSpace, StoreUnavailable

    def err(code: grpc.StatusCode, details: str) -> Exception:
        return EtcdStore._mapped(
            grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        )

    for details in ("context deadline exceeded", "etcdserver: request timed out", "etcdserver: no leader"):
        assert isinstance(err(grpc.StatusCode.UNKNOWN, details), StoreUnavailable)
    no_space = err(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
    assert isinstance(no_space, StoreNoSpace)
    assert not isinstance(
        err(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided"), StoreUnavailable
    )
