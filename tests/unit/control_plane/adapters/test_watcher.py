"""List-then-watch with a scripted store: a compacted start re-lists (one RESYNC each time),
a broken stream resumes from the last revision without listing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from control_plane.adapters.index import Change, ChangeKind, Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import EtcdStore, Event, KeyValue, StoreUnavailable, WatchCompacted
from control_plane.adapters.watcher import Watcher
from gpufed.v1 import common_pb2

P = "/w"
NODE = common_pb2.Node(provider="p", node_id="a").SerializeToString()


@dataclass
class ScriptedStore:
    """Each watch_prefix call plays the next script: events to yield, then an exception."""

    scripts: list[tuple[list[tuple[int, list[Event]]], BaseException]]
    listing: list[KeyValue] = field(default_factory=list)
    list_revision: int = 10
    keys: Keyspace = field(default_factory=lambda: Keyspace(P))
    lists: int = 0
    watched_from: list[int] = field(default_factory=list)

    async def prefix_pages(self, prefix: str) -> AsyncIterator[tuple[list[KeyValue], int]]:
        self.lists += 1
        yield self.listing, self.list_revision

    async def watch_prefix(self, prefix: str, start: int, prev_kv: bool = True) -> AsyncIterator[Any]:
        self.watched_from.append(start)
        if not self.scripts:
            await asyncio.Event().wait()  # nothing more: a quiet watch
        batches, exc = self.scripts.pop(0)
        for batch in batches:
            yield batch
        raise exc


def _run(store: ScriptedStore, inv: Inventory, until: Any) -> None:
    async def go() -> None:
        w = Watcher(cast(EtcdStore, store), inv)
        task = asyncio.create_task(w.run())
        for _ in range(400):
            if until():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())


def test_a_compacted_watch_start_lists_again_and_subscribers_get_resync() -> None:
    node_key = f"{P}/nodes/p/a".encode()
    store = ScriptedStore(
        scripts=[([], WatchCompacted(12))],
        listing=[KeyValue(node_key, NODE, 9, 9, 0)],
    )
    inv = Inventory(store.keys)
    seen: list[Change] = []
    inv.subscribe(seen.append)
    _run(store, inv, lambda: store.lists == 2 and len(store.watched_from) == 2)
    assert [c.kind for c in seen] == [ChangeKind.RESYNC, ChangeKind.RESYNC]
    assert store.watched_from == [11, 11] and "providers/p/nodes/a" in inv.nodes


def test_a_broken_stream_resumes_after_the_last_revision_it_applied() -> None:
    ev = Event(f"{P}/nodes/p/a".encode(), NODE, 15, 15, 0)
    store = ScriptedStore(scripts=[([(15, [ev])], StoreUnavailable("broken"))])
    inv = Inventory(store.keys)
    seen: list[Change] = []
    inv.subscribe(seen.append)
    _run(store, inv, lambda: len(store.watched_from) == 2)
    assert store.lists == 1 and store.watched_from == [11, 16]
    assert [c.kind for c in seen] == [ChangeKind.RESYNC, ChangeKind.NODE] and inv.revision == 15
