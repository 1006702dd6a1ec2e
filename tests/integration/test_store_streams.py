"""The etcd adapter's long-lived streams (watch, keep-alive) leave no task behind when they end,
also when the stream broke on etcd's side first (gRPC then no longer cancels the task that feeds
the stream its requests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from control_plane.adapters.store import EtcdStore, StoreUnavailable
from tests.harness import EtcdCluster, unique_prefix

pytestmark = pytest.mark.integration


def _request_feeders() -> list[asyncio.Task[object]]:
    return [
        t for t in asyncio.all_tasks() if not t.done() and "_consume_request_iterator" in repr(t.get_coro())
    ]


async def _eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll, yielding to the event loop: task ends and stream set-up take a moment, longer on a
    loaded machine than any fixed pause."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _run(scenario: Callable[[EtcdCluster], Coroutine[Any, Any, None]]) -> None:
    """The scenario against an etcd member of its own (it kills it)."""
    cluster = EtcdCluster.start(1)
    try:
        asyncio.run(scenario(cluster))
    finally:
        cluster.stop()


def test_a_watch_broken_by_etcd_leaves_no_request_task_behind() -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        store = EtcdStore(cluster.endpoints, unique_prefix(), timeout=2.0)
        stream = store.watch_prefix(store.keys.root, 1)
        first = asyncio.ensure_future(stream.__anext__())
        await _eventually(lambda: len(_request_feeders()) == 1)  # the watch is established
        cluster.members[0].kill()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(first, 10)
        await _eventually(lambda: _request_feeders() == [])
        await store.close()

    _run(scenario)


def test_a_keepalive_stream_broken_by_etcd_leaves_no_request_task_behind() -> None:
    async def scenario(cluster: EtcdCluster) -> None:
        store = EtcdStore(cluster.endpoints, unique_prefix(), timeout=2.0)
        lease = await store.grant(30)
        assert await store.keepalive(lease) > 0
        assert len(_request_feeders()) == 1
        cluster.members[0].kill()
        with pytest.raises(StoreUnavailable):
            await store.keepalive(lease)
        await _eventually(lambda: _request_feeders() == [])
        await store.close()

    _run(scenario)
