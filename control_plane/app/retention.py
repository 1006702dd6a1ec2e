"""Usage retention: the leader exports usage records older than the retention and deletes them,
so etcd's keyspace stays bounded (docs/operations.md gives the bound).

Each provider's records sit in end-time order (control_plane.adapters.keyspace), so the expired
ones are a key range per provider. A batch is written to its export file first (a temporary
file, fsynced, renamed), then deleted by one fenced Txn. The file is named after the batch's
first key: a leader that dies between the two, or a deposed one, leaves a file that the next
sweep writes again under the same name with the same records, never a second copy. So every
record is exported exactly once, then deleted.

The by-tenant copy of each record goes in the same Txn. Ended leases need no sweep: their
history lives on hourly etcd leases and expires by itself (control_plane.app.leases).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf import json_format

from control_plane.adapters.store import EtcdStore, TxnBuilder, prefix_end
from gpufed.clock import Clock
from gpufed.logs import get_logger
from gpufed.v1 import admin_pb2

log = get_logger(__name__)
# Records per Txn: a compare and two deletes each, within etcd's 128 operations per branch
# (the leader's fence takes three).
BATCH = 60
DAY_S = 86400


class UsageRetention:
    def __init__(
        self,
        store: EtcdStore,
        clock: Clock,
        retention_s: float,
        export_dir: str,
        fenced: Callable[[], TxnBuilder] = TxnBuilder,
        check: Callable[[rpc.TxnResponse], None] = lambda resp: None,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.clock = clock
        self.retention_s = retention_s
        self.export_dir = Path(export_dir) if export_dir else None
        self.fenced = fenced
        self.check = check  # raises when the fence failed (the leader was deposed)
        self._warned = False

    async def sweep_once(self) -> int:
        """Export and delete every record that ended before now - retention; how many."""
        if self.export_dir is None:
            if not self._warned:
                log.warning(
                    "usage retention is off: no --usage-export-dir to export to; etcd keeps every record"
                )
                self._warned = True
            return 0
        cutoff = self.clock.time_ns() - int(self.retention_s * 1e9)
        done = 0
        async for provider in self._providers():
            done += await self._sweep_provider(provider, cutoff)
        if done:
            log.info("usage records exported and deleted", records=done, export_dir=str(self.export_dir))
        return done

    async def _providers(self) -> AsyncIterator[str]:
        """Each provider with records, one key read per provider (skip to the next one's range)."""
        top = self.keys.usage_dir()
        end = prefix_end(top.encode())
        start: bytes | str = top
        while True:
            kvs, _ = await self.store.get_range(start, end, 1, keys_only=True)
            if not kvs:
                return
            provider = kvs[0].key.decode()[len(top) :].split("/", 1)[0]
            yield provider
            start = prefix_end(self.keys.usage_dir(provider).encode())

    async def _sweep_provider(self, provider: str, cutoff_ns: int) -> int:
        top = self.keys.usage_dir(provider)
        hi = top + f"{max(0, cutoff_ns):020d}"
        done = 0
        while True:
            kvs, _ = await self.store.get_range(top, hi, BATCH)
            if not kvs:
                return done
            records = [admin_pb2.UsageRecord.FromString(kv.value) for kv in kvs]
            first = kvs[0].key.decode()[len(top) :].replace("/", "-")
            self._export(f"usage-{provider}-{first}.jsonl", records)
            txn = self.fenced()
            for kv, r in zip(kvs, records, strict=True):
                txn.mod_revision_is(kv.key, kv.mod_revision)
                txn.delete(kv.key)
                lease_id = r.lease.split("/", 1)[1]
                txn.delete(
                    self.keys.tenant_usage(
                        r.tenant, r.end_time.ToNanoseconds(), lease_id, r.provider
                    ).encode()
                )
            resp = await self.store.send_txn(txn.req)
            self.check(resp)
            if not resp.succeeded:
                return done  # changed meanwhile (nothing rewrites a record): the next sweep sees
            done += len(kvs)

    def _export(self, name: str, records: list[admin_pb2.UsageRecord]) -> None:
        """The batch as JSON lines, durably, under a name that is the same on every retry."""
        assert self.export_dir is not None
        self.export_dir.mkdir(parents=True, exist_ok=True)
        path = self.export_dir / name
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(json_format.MessageToDict(r), separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.export_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
