"""List-then-watch against a real etcd: a watch whose start was compacted re-lists, and every
subscriber is told RESYNC (WatchCapacity sends a fresh snapshot)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from control_plane.adapters.store import EtcdStore, delete
from gpufed.v1 import common_pb2, discovery_pb2, discovery_pb2_grpc
from tests.harness import ADMIN_TOKEN, EtcdCluster, ReplicaThread, metadata, replica_config, unique_prefix

pytestmark = pytest.mark.integration
Ev = discovery_pb2.WatchCapacityResponse


def _node(node_id: str) -> bytes:
    node = common_pb2.Node(
        provider="p", node_id=node_id, location=common_pb2.Location(country_code="DE"), price_per_gpu_hour=1.0
    )
    node.gpus.add(uuid=f"{node_id}-g0", model="NVIDIA H100 80GB HBM3", health=common_pb2.GPU_HEALTH_HEALTHY)
    return node.SerializeToString()


async def _write(
    endpoints: list[str], prefix: str, puts: dict[str, bytes], deletes: list[str], compact: bool
) -> None:
    store = EtcdStore(endpoints, prefix)
    try:
        for key, value in puts.items():
            await store.put(key, value)
        for key in deletes:
            await store.txn([], [delete(key)])
        if compact:
            await store.compact(await store.revision())
    finally:
        await store.close()


@pytest.fixture
def replica(etcd: EtcdCluster) -> Iterator[tuple[ReplicaThread, str]]:
    prefix = unique_prefix()
    rt = ReplicaThread(replica_config(etcd.endpoints, prefix)).start()
    yield rt, prefix
    rt.stop()


def _snapshot(stream: Iterator[Ev]) -> list[str]:
    names: list[str] = []
    for ev in stream:
        if ev.type == Ev.EVENT_TYPE_SNAPSHOT_END:
            return names
        assert ev.type == Ev.EVENT_TYPE_SNAPSHOT, Ev.EventType.Name(ev.type)
        names.append(ev.node.node_id)
    raise AssertionError("stream ended before SNAPSHOT_END")


def test_watch_capacity_sends_a_fresh_snapshot_after_a_compacted_watch_relists(
    etcd: EtcdCluster, replica: tuple[ReplicaThread, str]
) -> None:
    rt, prefix = replica
    keys = f"{prefix}/nodes/p/"
    asyncio.run(_write(etcd.endpoints, prefix, {keys + "a": _node("a"), keys + "b": _node("b")}, [], False))
    assert rt.replica is not None
    watcher = rt.replica.watcher

    with grpc.insecure_channel(rt.address) as ch:
        stream = discovery_pb2_grpc.DiscoveryServiceStub(ch).WatchCapacity(
            discovery_pb2.WatchCapacityRequest(), metadata=metadata(ADMIN_TOKEN), timeout=30
        )
        # The replica may still apply the two puts: read until both are in a snapshot or a change.
        assert set(_snapshot(stream)) <= {"a", "b"}

        async def stop_watching() -> None:
            task = rt.replica._tasks[0]  # type: ignore[union-attr]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        async def watch_again() -> None:
            rt.replica._tasks[0] = asyncio.create_task(watcher.run(listed=True))  # type: ignore[union-attr]

        rt.call(stop_watching())
        # In the gap: b goes, c comes, and the history of both is compacted away.
        asyncio.run(_write(etcd.endpoints, prefix, {keys + "c": _node("c")}, [keys + "b"], True))
        rt.call(watch_again())
        first = next(ev for ev in stream if ev.type == Ev.EVENT_TYPE_SNAPSHOT)  # the fresh snapshot
        rest = _snapshot(stream)
        stream.cancel()
    assert sorted([first.node.node_id, *rest]) == ["a", "c"]
