"""Listing pages: a page too large for the gRPC message limit (records near their 128 KiB bound)
is asked again smaller, and the listing is whole and at one revision."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.adapters.store import EtcdStore, TxnBuilder
from tests.harness import EtcdCluster, unique_prefix

pytestmark = pytest.mark.integration


def test_a_listing_of_large_records_shrinks_its_pages_and_misses_nothing(etcd: EtcdCluster) -> None:
    async def go() -> None:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        value = b"x" * (120 * 1024)  # 600 of them: 72 MB, past the 64 MiB message limit
        try:
            for i in range(0, 600, 10):
                txn = TxnBuilder()
                for j in range(i, i + 10):
                    txn.put(f"{store.keys.root}big/{j:04d}".encode(), value)
                await store.send_txn(txn.req)
            pages = [len(page) async for page, _ in store.prefix_pages(store.keys.root + "big/")]
            assert sum(pages) == 600 and len(pages) > 1
            kvs, revision = await store.get_prefix(store.keys.root + "big/")
            assert [kv.key for kv in kvs] == sorted(kv.key for kv in kvs) and len(kvs) == 600
            assert revision >= max(kv.mod_revision for kv in kvs)
        finally:
            await store.close()

    asyncio.run(go())
