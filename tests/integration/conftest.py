"""Fixtures of the integration tests that share one live federation per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import EtcdCluster, unique_prefix
from tests.integration.federation import Federation, start_federation


@pytest.fixture(scope="module")
def fed(etcd: EtcdCluster) -> Iterator[Federation]:
    """Two replicas and five daemons in five countries (tests/integration/federation.py)."""
    f = start_federation(etcd, unique_prefix())
    yield f
    f.stop()
