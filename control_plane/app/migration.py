"""The leader's schema migration: the steps of control_plane.domain.schema, against etcd.

Every write is fenced by the leader's term (control_plane.app.leader), so a deposed leader
changes nothing; every record write compares the record unchanged since it was read, so a
writer between the read and the write wins and the next pass looks at it again.
"""

from __future__ import annotations

from collections.abc import Callable

from etcd3.etcdrpc import rpc_pb2 as rpc

from control_plane.adapters.index import Inventory
from control_plane.adapters.store import EtcdStore, KeyValue, TxnBuilder
from control_plane.domain import schema
from control_plane.domain.schema import DONE, MIGRATING, SCHEMA, SchemaState
from gpufed import __version__
from gpufed.clock import SYSTEM, Clock
from gpufed.logs import get_logger

log = get_logger(__name__)
audit = get_logger("gpufed.audit")
# The directories of JSON records, the ones schema 2 stamps with their own version.
JSON_DIRS = ("tokens", "quotas", "burst")


class SchemaMigration:
    def __init__(
        self,
        store: EtcdStore,
        inventory: Inventory,
        fenced: Callable[[], TxnBuilder],
        check_term: Callable[[rpc.TxnResponse], None],
        clock: Clock = SYSTEM,
        batch: int = schema.MIGRATION_BATCH,
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.inv = inventory
        self._fenced = fenced
        self._check_term = check_term
        self.clock = clock
        self.batch = batch
        self.migrated = 0  # records rewritten by this replica's passes (tests, logs)

    async def step(self) -> str:
        """One look: "started" (the schema key moved to SCHEMA, migrating), "done" (a pass left
        nothing to rewrite and the key says so), "pass" (a pass that met concurrent writes:
        the next looks again) or "" (nothing to do: done already, or a replica still lags)."""
        if self._done_already():
            return ""  # the usual case: no etcd read every few seconds once migrated
        kv = await self.store.get(self.keys.schema)
        try:
            state = schema.parse_state(kv.value if kv is not None else None)
        except schema.SchemaUnreadable:
            return ""  # this replica refuses writes meanwhile (control_plane.replica)
        replicas, members, revision = await self._replicas()
        step = schema.next_step(state, replicas, members)
        if step == "start":
            to = schema.target(replicas, members)
            if not await self._set(kv, to, MIGRATING, replicas_at=revision):
                return ""
            audit.info(
                "schema migration started",
                principal="leader",
                target=f"schema/{to}",
                replicas=sorted(replicas),
                code="OK",
            )
            return "started"
        if step != "migrate":
            if state.version < SCHEMA and replicas:  # a replica of an older release still runs
                log.debug("schema migration waits", laggards=schema.laggards(replicas, members, SCHEMA))
            return ""
        found, read_at = 0, {}
        for name in JSON_DIRS:
            found_here, read_at[name] = await self._migrate_dir(name)
            found += found_here
        # Done only after a pass that found nothing to rewrite, and only if no record was put
        # since it read (a writer that still wrote the old shape: the next pass rewrites it).
        if found or not await self._set(kv, state.version, DONE, unchanged_since=read_at):
            return "pass"
        audit.info("schema migration done", principal="leader", target=f"schema/{state.version}", code="OK")
        return "done"

    def _done_already(self) -> bool:
        """The watched index says the migration to SCHEMA is done (a stale index only delays
        the look to etcd: a newer key makes the next watch event, a missing one means 1)."""
        try:
            state = schema.parse_state(self.inv.schema)
        except schema.SchemaUnreadable:
            return False
        return state.version >= SCHEMA and state.state == DONE

    async def _replicas(self) -> tuple[dict[str, bytes], dict[str, bytes], int]:
        """The live replicas and their member keys, read from etcd (not the index): the start
        Txn compares that no replica key was put since."""
        replica_kvs, revision = await self.store.get_prefix(self.keys.dir("replicas"))
        member_kvs, _ = await self.store.get_prefix(self.keys.dir("members"), revision)
        replicas = {kv.key.decode().rsplit("/", 1)[1]: kv.value for kv in replica_kvs}
        members = {kv.key.decode().rsplit("/", 1)[1]: kv.value for kv in member_kvs}
        return replicas, members, revision

    async def _set(
        self,
        current: KeyValue | None,
        version: int,
        state: str,
        replicas_at: int = 0,
        unchanged_since: dict[str, int] | None = None,
    ) -> bool:
        """Move the schema key (compared unchanged since `current`); at the start, also that
        no replica (of any release) joined since `replicas_at`; at the end, that no record of
        the migrated directories was put since the pass read it."""
        key = self.keys.schema.encode()
        txn = self._fenced()
        if current is None:
            txn.absent(key)
        else:
            txn.mod_revision_is(key, current.mod_revision)
        if replicas_at:
            txn.range_unchanged_since(self.keys.dir("replicas").encode(), replicas_at)
        for name, revision in (unchanged_since or {}).items():
            txn.range_unchanged_since(self.keys.dir(name).encode(), revision)
        value = SchemaState(version, state, __version__, self.clock.time_ns()).to_json()
        txn.put(key, value)
        resp = await self.store.send_txn(txn.req)
        self._check_term(resp)
        if resp.succeeded:
            await self.inv.wait_for_revision(int(resp.header.revision), timeout=1.0)
            log.info("schema", version=version, state=state)
        return bool(resp.succeeded)

    async def _migrate_dir(self, name: str) -> tuple[int, int]:
        """Rewrite one directory's schema-1 records, `batch` to a Txn (a batch that met a
        concurrent write is left to the next pass). How many it found, and the revision it
        read the directory at."""
        found, read_at = 0, 0
        todo: list[tuple[KeyValue, bytes]] = []
        async for page, revision in self.store.prefix_pages(self.keys.dir(name)):
            read_at = revision
            for kv in page:
                new = schema.migrated_json(kv.value)
                if new is not None:
                    todo.append((kv, new))
                if len(todo) >= self.batch:
                    await self._rewrite(todo)
                    found, todo = found + len(todo), []
        if todo:
            await self._rewrite(todo)
            found += len(todo)
        return found, read_at

    async def _rewrite(self, batch: list[tuple[KeyValue, bytes]]) -> None:
        txn = self._fenced()
        for kv, new in batch:
            txn.mod_revision_is(kv.key, kv.mod_revision)
            txn.put(kv.key, new, kv.lease)
        resp = await self.store.send_txn(txn.req)
        self._check_term(resp)
        if resp.succeeded:
            self.migrated += len(batch)
            log.info("schema migration: records rewritten", records=len(batch))
