"""Token handling and group-commit batching."""

from __future__ import annotations

import asyncio

import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane import auth
from control_plane.commit import GroupCommit
from control_plane.errors import ApiError
from control_plane.store import EtcdStore, Keyspace, _channel_target, prefix_end, put


def test_tokens_are_shown_once_and_stored_as_a_hash() -> None:
    secret, record = auth.new_token(auth.Kind.TENANT, "acme")
    assert secret.startswith("gpf_") and secret.split("_", 2)[2] not in record.to_json().decode()
    assert auth.parse_token(secret) == (record.token_id, secret.split("_", 2)[2])
    assert auth.parse_token("nope") is None


def test_authenticator_resolves_cached_records_and_rejects_everything_else() -> None:
    a = auth.Authenticator(None, admin_token="boot")
    secret, record = auth.new_token(auth.Kind.PROVIDER, "neo")
    a.update(record.token_id, record.to_json())

    def run(md: list[tuple[str, str]]) -> auth.Principal:
        return asyncio.run(a.authenticate(md))

    assert run([("authorization", f"Bearer {secret}")]) == auth.Principal(auth.Kind.PROVIDER, "neo")
    assert run([("authorization", "bearer boot")]).kind == auth.Kind.ADMIN
    for md, reason in (
        ([], "MISSING_TOKEN"),
        ([("authorization", "Bearer x")], "UNKNOWN_TOKEN"),
        ([("authorization", f"Bearer {secret}x")], "UNKNOWN_TOKEN"),
    ):
        with pytest.raises(ApiError) as e:
            run(md)
        assert e.value.reason == reason
    a.update(record.token_id, None)
    with pytest.raises(ApiError):
        run([("authorization", f"Bearer {secret}")])


def test_keyspace_and_prefix_ranges() -> None:
    k = Keyspace("/gpufed")
    assert k.node("p", "n") == "/gpufed/nodes/p/n"
    assert k.relative(b"/gpufed/alloc/p/n/g") == ["alloc", "p", "n", "g"]
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"\xff") == b"\0"
    assert _channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert _channel_target(["etcd.example:2379"]) == "dns:///etcd.example:2379"


def test_group_commit_never_batches_two_writes_of_one_key() -> None:
    async def scenario() -> list[list[bytes]]:
        gc = GroupCommit(store=EtcdStore.__new__(EtcdStore))
        loop = asyncio.get_running_loop()
        from control_plane.commit import _Pending, _written_keys

        def pending(*keys: str) -> _Pending:
            txn = rpc.TxnRequest(success=[put(k, b"x") for k in keys])
            return _Pending(txn, _written_keys(txn), loop.create_future())

        gc._queue.extend([pending("a"), pending("b"), pending("a", "c"), pending("d")])
        first = gc._take_batch()
        second = gc._take_batch()
        return [[op.request_put.key for p in b for op in p.txn.success] for b in (first, second)]

    first, second = asyncio.run(scenario())
    assert first == [b"a", b"b", b"d"]
    assert second == [b"a", b"c"]
