"""Usage retention against a real etcd and a fake clock: records past the retention are exported
then deleted, exactly once, also when the sweep dies between the export and the delete."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.store import EtcdStore, StoreUnavailable, TxnBuilder
from control_plane.app.lease_txns import put_usage
from control_plane.app.retention import BATCH, DAY_S, UsageRetention
from gpufed.clock import NS, FakeClock
from gpufed.v1 import admin_pb2, lease_pb2
from tests.harness import EtcdCluster, unique_prefix

pytestmark = pytest.mark.integration
NOW = 1_800_000_000 * NS


def record(i: int, provider: str, tenant: str, age_days: float) -> admin_pb2.UsageRecord:
    r = admin_pb2.UsageRecord(
        name=f"usageRecords/{i:016x}-{provider}",
        lease=f"leases/{i:016x}",
        provider=provider,
        tenant=tenant,
        gpu_seconds=60.0,
        end_reason=lease_pb2.LEASE_END_REASON_RELEASED,
    )
    r.end_time.FromNanoseconds(NOW - int(age_days * DAY_S * NS))
    r.start_time.FromNanoseconds(NOW - int(age_days * DAY_S * NS) - 60 * NS)
    return r


async def write(store: EtcdStore, records: list[admin_pb2.UsageRecord]) -> None:
    for i in range(0, len(records), 30):
        txn = TxnBuilder()
        put_usage(txn, store.keys, records[i : i + 30])
        await store.send_txn(txn.req)


async def keys_left(store: EtcdStore) -> tuple[set[str], set[str]]:
    by_provider, _ = await store.get_prefix(store.keys.usage_dir())
    by_tenant, _ = await store.get_prefix(store.keys.records_dir("tenant-usage"))
    return (
        {admin_pb2.UsageRecord.FromString(kv.value).name for kv in by_provider},
        {admin_pb2.UsageRecord.FromString(kv.value).name for kv in by_tenant},
    )


def exported(d: Path) -> list[str]:
    return [
        json.loads(line)["name"] for f in sorted(d.glob("*.jsonl")) for line in f.read_text().splitlines()
    ]


def test_records_past_the_retention_are_exported_then_deleted_exactly_once(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    old = [record(i, f"p{i % 3}", f"t{i % 4}", 91 + i % 30) for i in range(200)]
    young = [record(1000 + i, f"p{i % 3}", f"t{i % 4}", 89 - i % 80) for i in range(50)]

    async def go() -> None:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        try:
            await write(store, old + young)
            sweeper = UsageRetention(store, FakeClock(NOW), 90 * DAY_S, str(tmp_path))
            assert await sweeper.sweep_once() == 200
            assert sorted(exported(tmp_path)) == sorted(r.name for r in old)
            left = {r.name for r in young}
            assert await keys_left(store) == (left, left)  # both copies of every old record gone
            assert await sweeper.sweep_once() == 0  # nothing twice
            assert sorted(exported(tmp_path)) == sorted(r.name for r in old)
            # Ninety days on, the young ones go too, into files of their own.
            later = UsageRetention(store, FakeClock(NOW + 90 * DAY_S * NS), 90 * DAY_S, str(tmp_path))
            assert await later.sweep_once() == 50
            assert sorted(exported(tmp_path)) == sorted(r.name for r in old + young)
        finally:
            await store.close()

    asyncio.run(go())


def test_a_sweep_that_dies_between_export_and_delete_exports_nothing_twice(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    old = [record(i, "neo", "dev", 100) for i in range(BATCH + 10)]

    async def go() -> None:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        try:
            await write(store, old)
            sweeper = UsageRetention(store, FakeClock(NOW), 90 * DAY_S, str(tmp_path))
            real = store.send_txn
            calls = [0]

            async def dies_once(req: rpc.TxnRequest, liveness: bool = False) -> rpc.TxnResponse:
                calls[0] += 1
                if calls[0] == 1:
                    raise StoreUnavailable("etcd went away after the export")
                return await real(req, liveness)

            store.send_txn = dies_once  # type: ignore[method-assign]
            with pytest.raises(StoreUnavailable):
                await sweeper.sweep_once()
            assert len(exported(tmp_path)) == BATCH  # the first batch's file, nothing deleted
            assert len((await keys_left(store))[0]) == len(old)
            assert await sweeper.sweep_once() == len(old)  # the next leader's sweep
            names = exported(tmp_path)
            assert sorted(names) == sorted(r.name for r in old) and len(set(names)) == len(names)
            assert await keys_left(store) == (set(), set())
        finally:
            await store.close()

    asyncio.run(go())


def test_without_an_export_dir_nothing_is_deleted(etcd: EtcdCluster) -> None:
    async def go() -> None:
        store = EtcdStore(etcd.endpoints, unique_prefix())
        try:
            await write(store, [record(1, "neo", "dev", 400)])
            assert await UsageRetention(store, FakeClock(NOW), 90 * DAY_S, "").sweep_once() == 0
            assert len((await keys_left(store))[0]) == 1
        finally:
            await store.close()

    asyncio.run(go())
