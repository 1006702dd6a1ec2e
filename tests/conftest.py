"""Shared fixtures: a real etcd on free loopback ports, a 3-member cluster, replicas."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.harness import (
    ADMIN_TOKEN,
    EtcdCluster,
    ReplicaThread,
    channel,
    metadata,
    replica_config,
    unique_prefix,
)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdCluster]:
    """One real etcd member for the session; tests isolate themselves with a key prefix."""
    cluster = EtcdCluster.start(1)
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster on loopback, for tests that kill members."""
    cluster = EtcdCluster.start(3)
    yield cluster
    cluster.stop()


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


@pytest.fixture
def replica(etcd: EtcdCluster, prefix: str) -> Iterator[ReplicaThread]:
    r = ReplicaThread(replica_config(etcd.endpoints, prefix, report_interval=0.5)).start()
    yield r
    r.stop()


@pytest.fixture
def admin_md() -> tuple[tuple[str, str]]:
    return metadata(ADMIN_TOKEN)


@pytest.fixture
def replica_channel(replica: ReplicaThread) -> Iterator[grpc.Channel]:
    ch = channel(replica.address)
    yield ch
    ch.close()


def pytest_configure(config: pytest.Config) -> None:
    # Replicas in tests log like deployed ones: through the one structlog configuration.
    import logging

    from gpufed.logs import configure_logging

    configure_logging(level="INFO")
    # In-process replicas and daemons log from their own threads, also between two tests, while
    # pytest prints progress with its capture of stderr suspended: their lines went to the
    # terminal. They go to a file instead (pytest's own log capture still reports the records
    # of a failing test, as "Captured log").
    log_file = config.rootpath / ".pytest_cache" / "gpufed-tests.log"
    log_file.parent.mkdir(exist_ok=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(log_file, "w", encoding="utf-8"))  # noqa: SIM115 (open for the session)
