"""EtcdStore.update, the one compare-and-swap helper, against a real etcd: concurrent writers
never lose an update, a function that changes nothing writes nothing, a stale guess costs one
retry, and a record that keeps changing gives up with ABORTED and the caller's reason."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.adapters.store import EtcdStore, KeyValue
from control_plane.domain.errors import Code, DomainError
from tests.harness import EtcdCluster, unique_prefix

pytestmark = pytest.mark.integration


def _increment(kv: KeyValue | None) -> bytes:
    return str(int(kv.value) + 1 if kv else 1).encode()


def test_concurrent_read_modify_writes_all_land(etcd: EtcdCluster) -> None:
    async def go() -> int:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        key = store.keys.root + "counter"
        try:
            await asyncio.gather(*(store.update(key, _increment, attempts=50) for _ in range(20)))
            kv = await store.get(key)
            assert kv is not None
            return int(kv.value)
        finally:
            await store.close()

    assert asyncio.run(go()) == 20


def test_no_change_writes_nothing_and_a_stale_guess_is_read_back(etcd: EtcdCluster) -> None:
    async def go() -> None:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        key = store.keys.root + "k"
        try:
            first = await store.update(key, _increment)
            assert first.value == b"1" and first.revision > 0
            unchanged = await store.update(key, lambda kv: None)
            assert unchanged == type(unchanged)(b"1", 0)
            stale = KeyValue(key.encode(), b"0", 1, 1, 0)  # an index that lags behind
            second = await store.update(key, _increment, known=stale)
            assert second.value == b"2"
        finally:
            await store.close()

    asyncio.run(go())


def test_endless_contention_gives_up_with_aborted_and_the_reason(etcd: EtcdCluster) -> None:
    async def go() -> DomainError:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        key = store.keys.root + "hot"
        await store.put(key, b"0")

        try:
            with pytest.raises(DomainError) as e:
                # One attempt on a guess that is out of date: its compare fails, nothing is left.
                stale = KeyValue(key.encode(), b"0", 1, 1, 0)
                await store.update(key, _increment, known=stale, attempts=1, reason="NODE_CHANGING")
            kv = await store.get(key)
            assert kv is not None and kv.value == b"0"  # nothing written
            return e.value
        finally:
            await store.close()

    err = asyncio.run(go())
    assert err.code is Code.ABORTED and err.reason == "NODE_CHANGING"
