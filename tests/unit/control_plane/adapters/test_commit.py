"""Group commit: batching, hand-off and failure of shared Txns."""

from __future__ import annotations

import asyncio
from typing import cast

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.commit import GroupCommit, TxnResult
from control_plane.adapters.store import (
    EtcdStore,
    StoreUnavailable,
    TxnBuilder,
)


def test_group_commit_never_batches_two_writes_of_one_key() -> None:
    async def scenario() -> list[list[bytes]]:
        gc = GroupCommit(store=EtcdStore.__new__(EtcdStore))
        loop = asyncio.get_running_loop()
        from control_plane.adapters.commit import _Pending

        def pending(*keys: str) -> _Pending:
            txn = TxnBuilder()
            for k in keys:
                txn.put(k.encode(), b"x")
            return _Pending(txn.req, txn.writes, loop.create_future())

        gc._queue.extend([pending("a"), pending("b"), pending("a", "c"), pending("d")])
        first = gc._take_batch()
        second = gc._take_batch()
        return [[op.request_put.key for p in b for op in p.txn.success] for b in (first, second)]

    first, second = asyncio.run(scenario())
    assert first == [b"a", b"b", b"d"]
    assert second == [b"a", b"c"]


class _FakeEtcd:
    """Records what GroupCommit sends; each commit waits until the test lets it through."""

    def __init__(self) -> None:
        self.sent: list[rpc.TxnRequest] = []
        self.gate = asyncio.Event()
        self.fail = False

    async def send_txn(self, req: rpc.TxnRequest) -> rpc.TxnResponse:
        self.sent.append(req)
        await self.gate.wait()
        if self.fail:
            raise StoreUnavailable("etcd: UNAVAILABLE")
        resp = rpc.TxnResponse(succeeded=True, header=rpc.ResponseHeader(revision=10 + len(self.sent)))
        for op in req.success:
            if op.HasField("request_txn"):  # a shared commit: each member's own outcome
                resp.responses.add(response_txn=rpc.TxnResponse(succeeded=not op.request_txn.compare))
        return resp


def _member(key: str, contended: bool = False) -> TxnBuilder:
    txn = TxnBuilder()
    if contended:
        txn.present(b"x")  # the fake fails every member that compares anything
    txn.put(key.encode(), b"v")
    return txn


def test_group_commit_sends_a_lone_member_as_is_without_a_hand_off() -> None:
    async def scenario() -> tuple[list[rpc.TxnRequest], TxnBuilder, int]:
        etcd = _FakeEtcd()
        etcd.gate.set()
        gc = GroupCommit(store=cast(EtcdStore, etcd))  # no background task started: direct path only
        member = _member("a")
        result = await gc.submit(member)
        return etcd.sent, member, result.revision

    sent, member, revision = asyncio.run(scenario())
    assert len(sent) == 1 and sent[0] is member.req
    assert revision == 11


def test_group_commit_members_arriving_during_a_commit_share_the_next_one() -> None:
    async def scenario() -> tuple[list[rpc.TxnRequest], list[TxnResult]]:
        etcd = _FakeEtcd()
        gc = GroupCommit(store=cast(EtcdStore, etcd))
        gc.start()
        first = asyncio.create_task(gc.submit(_member("a")))
        await asyncio.sleep(0)  # the first commit is now in flight
        later = [asyncio.create_task(gc.submit(_member(k, contended=k == "c"))) for k in "bcd"]
        await asyncio.sleep(0)
        etcd.gate.set()
        results = await asyncio.gather(first, *later)
        await gc.stop()
        return etcd.sent, results

    sent, results = asyncio.run(scenario())
    assert len(sent) == 2  # one commit for the lone member, one for the three that queued behind it
    assert [op.request_txn.success[0].request_put.key for op in sent[1].success] == [b"b", b"c", b"d"]
    # Each member keeps its own outcome; all share the batch's revision (their fencing token).
    assert [r.succeeded for r in results] == [True, True, False, True]
    assert [r.revision for r in results[1:]] == [12, 12, 12]


def test_group_commit_fails_every_member_of_a_batch_when_etcd_is_unavailable() -> None:
    async def scenario() -> list[BaseException | TxnResult]:
        etcd = _FakeEtcd()
        gc = GroupCommit(store=cast(EtcdStore, etcd))
        gc.start()
        first = asyncio.create_task(gc.submit(_member("a")))
        await asyncio.sleep(0)
        later = [asyncio.create_task(gc.submit(_member(k))) for k in "bc"]
        await asyncio.sleep(0)
        etcd.fail = True
        etcd.gate.set()
        out = await asyncio.gather(first, *later, return_exceptions=True)
        await gc.stop()
        return out

    out = asyncio.run(scenario())
    assert all(isinstance(r, StoreUnavailable) for r in out)


def test_group_commit_under_load_waits_a_few_loop_passes_for_more_members() -> None:
    async def scenario() -> list[rpc.TxnRequest]:
        etcd = _FakeEtcd()
        etcd.gate.set()
        gc = GroupCommit(store=cast(EtcdStore, etcd))
        gc._quiet = False  # the last batch had company
        gc.start()

        async def submit_after(passes: int, key: str) -> TxnResult:
            for _ in range(passes):
                await asyncio.sleep(0)
            return await gc.submit(_member(key))

        await asyncio.gather(submit_after(0, "a"), submit_after(2, "b"), submit_after(5, "c"))
        await gc.stop()
        return etcd.sent

    sent = asyncio.run(scenario())
    assert len(sent) == 1
    assert [op.request_txn.success[0].request_put.key for op in sent[0].success] == [b"a", b"b", b"c"]
