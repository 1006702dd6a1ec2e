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
        """The keyspace at one revision, page by page into a fresh index that replaces the
        live one's contents at the end: searches never see half a listing, and at 100,000
        nodes the parsing gives the event loop back between pages (the session keep-alive and
        health must not starve)."""
        fresh = Inventory(self.store.keys, bulk=True)
        at = 0
        async for page, page_revision in self.store.prefix_pages(self.store.keys.root):
            at = page_revision
            for kv in page:
                fresh.apply(kv.key, kv.value, kv.mod_revision, kv.create_revision, notify=False)
            await asyncio.sleep(0)
        self.inventory.adopt(fresh, at)
        self.synced.set()
        return at

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
