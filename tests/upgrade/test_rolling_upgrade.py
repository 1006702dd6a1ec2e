"""A rolling upgrade from the previous release, for real: a replica of the last release tag (its
own worktree and virtual environment) beside one of this tree on one etcd, daemons of both
releases; the lease lifecycle through both; the old replica upgraded in place; the migration;
then a replica of the previous release started again (the downgrade docs/operations.md says is
safe)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import etcd3
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.domain.schema import DONE, SCHEMA
from gpufed import __version__
from gpufed.client import Client, GpufedError
from gpufed.v1 import discovery_pb2, lease_pb2
from tests.harness import ADMIN_TOKEN, EtcdCluster, channel, free_port, wait_until
from tests.upgrade import previous
from tests.upgrade.previous import REPLICA_ENV, Release, daemon_args, process, replica_args

pytestmark = pytest.mark.timeout(300)
THIS = Path(__file__).resolve().parents[2]
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
ENDED = lease_pb2.LEASE_STATE_ENDED


@pytest.fixture(scope="module")
def old() -> Release:
    return previous.checkout(previous.previous_tag())


@pytest.fixture
def kv(etcd: EtcdCluster) -> Iterator[etcd3.Etcd3Client]:
    client = etcd3.client("127.0.0.1", etcd.members[0].client_port, timeout=5)
    yield client
    client.close()


def _schema(kv: etcd3.Etcd3Client, prefix: str) -> dict[str, object] | None:
    value, _ = kv.get(f"{prefix}/schema")
    return None if value is None else dict(json.loads(value))


def _migrated(kv: etcd3.Etcd3Client, prefix: str) -> bool:
    state = _schema(kv, prefix) or {}
    return state.get("version") == SCHEMA and state.get("state") == DONE


def _tokens(kv: etcd3.Etcd3Client, prefix: str) -> list[dict[str, object]]:
    return [json.loads(v) for v, _ in kv.get_prefix(f"{prefix}/tokens/")]


def _free(c: Client, country: str) -> int:
    return sum(o.free_gpus for o in c.search_offers(countries=[country]))


def _understood(kv: etcd3.Etcd3Client, prefix: str, replica_id: str) -> int:
    """The newest schema a live replica understands: its member key says (0.2.0 on); a replica
    with none is of 0.1.0, which knows schema 1 only."""
    value, _ = kv.get(f"{prefix}/members/{replica_id}")
    return 1 if value is None else int(json.loads(value)["schema"])


def _answered_by(c: Client) -> str:
    """The release of the replica behind `c` (ListProviders says it since 0.2.0)."""
    resp = c.call(c.discovery.ListProviders, discovery_pb2.ListProvidersRequest())
    return str(resp.replica_version)


def _lifecycle(grant: Client, renew: Client, release: Client, country: str) -> lease_pb2.Lease:
    """Grant on one replica, renew on another, release on a third (or the first)."""
    lease = grant.create_lease(2, ttl_s=30, countries=[country])
    assert lease.state == ACTIVE and lease.fencing_token > 0
    renewed = renew.renew_lease(lease.name)
    assert renewed.fencing_token == lease.fencing_token
    assert renewed.expire_time.ToNanoseconds() >= lease.expire_time.ToNanoseconds()
    ended = release.release_lease(lease.name)
    assert ended.state == ENDED
    return ended


def test_a_rolling_upgrade_from_the_previous_release_loses_nothing_and_a_downgrade_stays_safe(
    old: Release, etcd: EtcdCluster, prefix: str, kv: etcd3.Etcd3Client, tmp_path: Path
) -> None:
    new_python = Path(THIS, ".venv", "bin", "python")
    if not new_python.exists():
        import sys

        new_python = Path(sys.executable)
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    a_addr, b_addr, c_addr = (f"127.0.0.1:{p}" for p in (port_a, port_b, port_c))
    eps = etcd.endpoints

    with ExitStack() as stack:

        def start_replica(release_python: Path, cwd: Path, port: int, rid: str, name: str) -> object:
            args = replica_args(release_python, eps, prefix, port, rid)
            return stack.enter_context(process(args, cwd, REPLICA_ENV, tmp_path / f"{name}.log", port))

        a_old = start_replica(old.python, old.tree, port_a, "a", "a-old")
        start_replica(new_python, THIS, port_b, "b", "b-new")
        with Client(a_addr, ADMIN_TOKEN) as admin:  # tokens written by the previous release
            tenant = admin.create_token("tenant", "acme").secret
            neo = admin.create_token("provider", "neo").secret
            nova = admin.create_token("provider", "nova").secret
        # A daemon of the previous release streams to either replica; one of this release
        # streams to this release's replica (daemons upgrade after the replicas).
        stack.enter_context(
            process(
                daemon_args(old.python, [a_addr, b_addr], "neo", "old-1", "DE"),
                old.tree,
                {"GPUFED_TOKEN": neo},
                tmp_path / "daemon-old.log",
            )
        )
        stack.enter_context(
            process(
                daemon_args(new_python, [b_addr], "nova", "new-1", "FR"),
                THIS,
                {"GPUFED_TOKEN": nova},
                tmp_path / "daemon-new.log",
            )
        )
        a, b = stack.enter_context(Client(a_addr, tenant)), stack.enter_context(Client(b_addr, tenant))
        for c in (a, b):
            wait_until(lambda c=c: _free(c, "DE") == 4 and _free(c, "FR") == 4, timeout=30)
        old_node = b.get_node("providers/neo/nodes/old-1")
        assert old_node.daemon_version == old.version
        assert b.get_node("providers/nova/nodes/new-1").daemon_version == __version__

        # `a` runs the previous release's code (0.1.0's answers lack the field 0.2.0 added).
        says_version = old.version if old.version != "0.1.0" else ""
        assert _answered_by(a) == says_version and _answered_by(b) == __version__

        # While the previous release runs, nothing moves the schema past what it understands.
        old_schema = _understood(kv, prefix, "a")
        assert old_schema <= SCHEMA
        if old_schema < SCHEMA:  # the leader may move it up to the old release's, no further
            assert int(str((_schema(kv, prefix) or {"version": 1})["version"])) <= old_schema
            if old_schema == 1:  # and records keep the shape 0.1.0 wrote
                assert all("v" not in t for t in _tokens(kv, prefix))
        else:  # the same schema: the leader (of either release) marks it done meanwhile
            wait_until(lambda: (_schema(kv, prefix) or {}).get("state") == DONE, timeout=30)

        # The lease lifecycle through both releases, on the old daemon's node and the new one's.
        ended = [_lifecycle(a, b, a, country) for country in ("DE", "FR")]
        held = a.create_lease(1, ttl_s=30, countries=["DE"])  # lives through the upgrade

        # Upgrade `a` in place: the same id and address, this release.
        a_old.terminate()  # type: ignore[attr-defined]
        a_old.wait(20)  # type: ignore[attr-defined]
        start_replica(new_python, THIS, port_a, "a", "a-new")
        wait_until(lambda: _migrated(kv, prefix), timeout=60)
        assert _answered_by(a) == __version__
        state = _schema(kv, prefix)
        assert state is not None and state["version"] == SCHEMA
        if old_schema < SCHEMA:  # this release's leader ran the migration
            assert state["release"] == __version__
        tokens = _tokens(kv, prefix)
        assert len(tokens) == 3 and all(t["v"] == 2 for t in tokens)

        # Nothing was lost: the held lease renews on the upgraded replica, its fencing token
        # unchanged; the tokens of the previous release authenticate; the daemons stream.
        renewed = a.renew_lease(held.name)
        assert renewed.state == ACTIVE and renewed.fencing_token == held.fencing_token
        wait_until(lambda: _free(a, "DE") == 3 and _free(a, "FR") == 4, timeout=30)
        assert a.get_lease(ended[0].name).state == ENDED
        with Client(a_addr, ADMIN_TOKEN) as admin:
            usage: dict[str, int] = {}
            for r in admin.usage_records():
                usage[r.lease] = usage.get(r.lease, 0) + 1
        assert {e.name: 1 for e in ended}.items() <= usage.items(), usage

        # Downgrade: a replica of the previous release on the migrated etcd. 0.1.0 knows no
        # schema key and schema 2 only added what it ignores: it serves. A later release that
        # finds a schema newer than it understands refuses every write and says why
        # (docs/operations.md, "Upgrading").
        start_replica(old.python, old.tree, port_c, "c", "c-old")
        c = stack.enter_context(Client(c_addr, tenant))
        if 1 < old_schema < SCHEMA:
            wait_until(lambda: _health(c_addr) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
            with pytest.raises(GpufedError) as refused:
                c.create_lease(1, ttl_s=30, countries=["FR"])
            assert refused.value.reason == "SCHEMA_TOO_NEW"
            again = _lifecycle(b, a, b, "FR")
        else:
            wait_until(lambda: _free(c, "FR") == 4, timeout=30)
            again = _lifecycle(c, b, c, "FR")
        a.release_lease(held.name)
        assert a.get_lease(again.name).state == ENDED
        # This release's replicas keep serving beside it; the schema stays where it was.
        assert _answered_by(c) == says_version and _answered_by(b) == __version__
        assert (_schema(kv, prefix) or {}).get("state") == DONE
        assert (_schema(kv, prefix) or {}).get("version") == SCHEMA


def _health(address: str) -> int:
    with channel(address) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="")).status)
