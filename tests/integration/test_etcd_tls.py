"""A replica against an etcd cluster that serves TLS on client and peer URLs and checks client
certificates; an https:// endpoint without a CA is refused, never downgraded."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from gpufed.client import Client
from gpufed.v1 import admin_pb2
from scripts.dev_certs import Issued, make_ca, replica_cert, write
from tests.harness import (
    ADMIN_TOKEN,
    PEER_TOKEN,
    EtcdCluster,
    EtcdTlsFiles,
    ReplicaThread,
    free_port,
    replica_config,
    unique_prefix,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, EtcdTlsFiles]]:
    pki = tmp_path_factory.mktemp("etcd-pki")
    ca = make_ca()
    write(pki, "ca", Issued(ca.pem, ca.key_pem))
    write(pki, "etcd", replica_cert(ca))  # server and client usage, SAN 127.0.0.1
    files = EtcdTlsFiles(pki / "ca.pem", pki / "etcd.pem", pki / "etcd-key.pem")
    cluster = EtcdCluster.start(3, tls=files)
    yield cluster, files
    cluster.stop()


def test_a_replica_works_against_an_etcd_that_checks_client_certificates(
    tls_etcd: tuple[EtcdCluster, EtcdTlsFiles],
) -> None:
    cluster, files = tls_etcd
    assert all(e.startswith("https://") for e in cluster.endpoints)
    cfg = replica_config(
        cluster.endpoints,
        unique_prefix(),
        etcd_ca=str(files.ca),
        etcd_cert=str(files.cert),
        etcd_key=str(files.key),
    )
    rt = ReplicaThread(cfg).start()
    try:
        with Client(rt.address, ADMIN_TOKEN) as admin:
            created = admin.create_token("tenant", "over-tls")
            listed = admin.call(admin.admin.ListTokens, admin_pb2.ListTokensRequest()).tokens
            assert [t.name for t in listed] == [created.token.name]
    finally:
        rt.stop()


def test_an_https_endpoint_without_a_ca_is_refused_not_downgraded(
    tls_etcd: tuple[EtcdCluster, EtcdTlsFiles],
) -> None:
    cluster, _ = tls_etcd
    out = subprocess.run(
        [
            *(sys.executable, "-m", "control_plane", "--listen", f"127.0.0.1:{free_port()}"),
            *("--etcd-endpoints", ",".join(cluster.endpoints), "--etcd-prefix", unique_prefix()),
        ],
        env={**os.environ, "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN, "GPUFED_PEER_TOKEN": PEER_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "never downgraded" in out.stderr
