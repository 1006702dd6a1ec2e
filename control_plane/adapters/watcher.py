"""List-then-watch: load the keyspace at revision R, then watch from R+1; re-list when the watch
start was compacted (the index then tells its subscribers RESYNC); resume from the last revision
seen when the stream merely broke."""

from __future__ import annotations

import asyncio

from control_plane.adapters.index import Inventory
from control_plane.adapters.store import EtcdStore, StoreUnavailable, WatchCompacted
from gpufed.logs import get_logger

log = get_logger(__name__)


class Watcher:
    def __init__(self, store: EtcdStore, inventory: Inventory) -> None:
        self.store = store
        self.inventory = inventory
        self.synced = asyncio.Event()

    async def list(self) -> int:
        kvs, revision = await self.store.get_prefix(self.store.keys.root)
        self.inventory.load(kvs, revision)
        self.synced.set()
        return revision

    async def run(self, listed: bool = False) -> None:
        """Forever: list (unless the index already holds a listing: `listed`), then watch."""
        need_list = not listed
        while True:
            try:
                if need_list:
                    await self.list()
                    need_list = False
                async for revision, events in self.store.watch_prefix(
                    self.store.keys.root, self.inventory.revision + 1, prev_kv=False
                ):
                    for ev in events:
                        self.inventory.apply(ev.key, ev.value, ev.mod_revision, ev.create_revision)
                    self.inventory.advance(revision)
            except WatchCompacted as e:
                log.warning("watch start compacted; listing again", compact_revision=e.compact_revision)
                need_list = True
            except StoreUnavailable as e:
                log.warning("watch broke; resuming", error=str(e), revision=self.inventory.revision)
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watch loop failed; listing again")
                need_list = True
                await asyncio.sleep(0.5)
