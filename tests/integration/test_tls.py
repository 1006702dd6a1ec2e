"""TLS on the replica's listeners, with certificates the tests make (never committed keys):
SDK and CLI over TLS, plaintext refused, a daemon's certificate bound to its provider, plaintext
refused on a non-loopback address, certificates rotated under an open daemon stream."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from control_plane.adapters.store import EtcdStore
from control_plane.config import Config
from gpufed import __version__
from gpufed.client import Client, GpufedError, Unavailable
from gpufed.v1 import common_pb2, node_pb2, node_pb2_grpc
from node_daemon.fake_nvml import FakeNvml
from scripts.dev_certs import Authority, Issued, issue, make_ca, provider_cert, replica_cert, write
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    free_port,
    metadata,
    replica_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration


@dataclass
class Pki:
    dir: Path
    ca: Authority

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def provider(self, name: str) -> tuple[str, str]:
        write(self.dir, f"provider-{name}", provider_cert(self.ca, name))
        return self.path(f"provider-{name}.pem"), self.path(f"provider-{name}-key.pem")

    def daemon(self, replica: ReplicaThread, provider: str) -> DaemonThread:
        """A daemon of `provider` on the replica's mTLS listener, with a certificate naming it."""
        with Client(replica.address, ADMIN_TOKEN, credentials=_tls(self)) as admin:
            token = admin.create_token("provider", provider).secret
        cert, key = self.provider(provider)
        cfg = daemon_config(
            [replica.config.node_listen],
            token,
            provider,
            "n1",
            ca_cert=self.path("ca.pem"),
            client_cert=cert,
            client_key=key,
        )
        return DaemonThread(cfg, FakeNvml("l40s-4")).start()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca()
    write(tmp_path, "ca", Issued(ca.pem, ca.key_pem))
    write(tmp_path, "replica", replica_cert(ca))
    return Pki(tmp_path, ca)


@pytest.fixture
def tls_replica(etcd: EtcdCluster, pki: Pki) -> Iterator[ReplicaThread]:
    cfg = replica_config(
        etcd.endpoints,
        unique_prefix(),
        tls_cert=pki.path("replica.pem"),
        tls_key=pki.path("replica-key.pem"),
        client_ca=pki.path("ca.pem"),
        node_listen=f"127.0.0.1:{free_port()}",
    )
    rt = ReplicaThread(cfg).start()
    yield rt
    rt.stop()


def _tls(pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=(pki.dir / "ca.pem").read_bytes())


def test_sdk_and_cli_work_over_tls_and_a_plaintext_client_is_refused(
    tls_replica: ReplicaThread, pki: Pki
) -> None:
    with Client(tls_replica.address, ADMIN_TOKEN, credentials=_tls(pki)) as c:
        assert c.list_nodes() == []
        tenant = c.create_token("tenant", "dev").secret
    env = {
        **os.environ,
        "GPUFED_ENDPOINT": tls_replica.address,
        "GPUFED_TOKEN": tenant,
        "GPUFED_CONFIG": "/none",
    }
    out = subprocess.run(
        [sys.executable, "-m", "gpufed", "--ca-cert", pki.path("ca.pem"), "capacity", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    with (
        Client(tls_replica.address, tenant, retries=0, timeout=3) as plain,
        pytest.raises(Unavailable, match="a replica serving TLS needs --ca-cert or --tls"),
    ):
        plain.list_nodes()


def _connect(address: str, creds: grpc.ChannelCredentials, token: str, provider: str) -> grpc.RpcError:
    hello = node_pb2.NodeHello(
        provider=provider,
        daemon_version=__version__,
        node_id="n1",
        location=common_pb2.Location(country_code="DE"),
        price_per_gpu_hour=1.0,
    )
    hello.gpus.add(uuid="GPU-1", index=0, model="NVIDIA H100 80GB HBM3")
    with grpc.secure_channel(address, creds) as ch:
        stream = node_pb2_grpc.NodeServiceStub(ch).Connect(
            iter([node_pb2.NodeMessage(hello=hello)]), metadata=metadata(token), timeout=10
        )
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
    return e.value


def test_a_daemon_registers_only_with_a_certificate_naming_its_tokens_provider(
    etcd: EtcdCluster, tls_replica: ReplicaThread, pki: Pki
) -> None:
    with Client(tls_replica.address, ADMIN_TOKEN, credentials=_tls(pki)) as admin:
        token_a = admin.create_token("provider", "prov-a").secret
    cert_a, key_a = pki.provider("prov-a")
    cert_b, key_b = pki.provider("prov-b")
    node_address = tls_replica.config.node_listen
    ca = (pki.dir / "ca.pem").read_bytes()

    async def revision() -> int:
        # What a registration writes (not etcd's revision: other tests' replicas move that).
        store = EtcdStore(etcd.endpoints, tls_replica.config.etcd_prefix)
        try:
            written = [
                kv.mod_revision
                for top in (store.keys.dir("nodes"), store.keys.dir("alive"), store.keys.records_dir("nodes"))
                for kv in (await store.get_prefix(top))[0]
            ]
            return max(written, default=0)
        finally:
            await store.close()

    before = asyncio.run(revision())
    b_creds = grpc.ssl_channel_credentials(ca, Path(key_b).read_bytes(), Path(cert_b).read_bytes())
    err = _connect(node_address, b_creds, token_a, "prov-a")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "CERTIFICATE_PROVIDER_MISMATCH" in str(
        err.trailing_metadata()
    )
    # Without a client certificate the node listener's handshake fails; the main listener
    # serves the stream but NodeService refuses it.
    assert _connect(tls_replica.address, grpc.ssl_channel_credentials(ca), token_a, "prov-a").code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert asyncio.run(revision()) == before, "a refused daemon wrote nothing"

    cfg = daemon_config(
        [node_address],
        token_a,
        "prov-a",
        "n1",
        ca_cert=pki.path("ca.pem"),
        client_cert=cert_a,
        client_key=key_a,
    )
    daemon = DaemonThread(cfg, FakeNvml("l40s-4")).start()
    try:
        with Client(tls_replica.address, ADMIN_TOKEN, credentials=_tls(pki)) as admin:
            wait_until(
                lambda: [n.node_id for n in admin.list_nodes(state=common_pb2.NODE_STATE_READY)] == ["n1"]
            )
    finally:
        daemon.stop()


def test_certificates_rotate_without_a_restart_and_open_streams_stay(
    tls_replica: ReplicaThread, pki: Pki
) -> None:
    daemon = pki.daemon(tls_replica, "prov-r")
    try:
        assert tls_replica.replica is not None
        nodes = tls_replica.replica.nodes
        wait_until(lambda: "providers/prov-r/nodes/n1" in nodes.sessions)
        session = nodes.sessions["providers/prov-r/nodes/n1"]
        new = issue(pki.ca, "gpufed replica, rotated", dns=("localhost",), ips=("127.0.0.1",))
        (pki.dir / "replica-key.pem").write_bytes(new.key_pem)  # the key first, then the chain
        (pki.dir / "replica.pem").write_bytes(new.cert_pem)
        os.utime(pki.dir / "replica.pem")
        host, port = tls_replica.address.rsplit(":", 1)
        served = ssl.get_server_certificate((host, int(port)))
        assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(new.cert_pem.decode())
        with Client(tls_replica.address, ADMIN_TOKEN, credentials=_tls(pki)) as admin:
            assert [n.node_id for n in admin.list_nodes()] == ["n1"]
        seen = session.last_seen
        wait_until(lambda: session.last_seen > seen)  # reports still flow on the old connection
        assert nodes.sessions["providers/prov-r/nodes/n1"] is session and not session.ended.is_set()
    finally:
        daemon.stop()


def test_a_replica_refuses_plaintext_on_a_non_loopback_address(etcd: EtcdCluster) -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "control_plane", "--listen", f"0.0.0.0:{free_port()}"),
            *("--etcd-endpoints", ",".join(etcd.endpoints), "--etcd-prefix", unique_prefix()),
        ],
        env={**os.environ, "GPUFED_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "refusing plaintext on 0.0.0.0" in out.stderr


def test_replicas_forward_telemetry_to_each_other_over_tls_with_their_own_credential(
    etcd: EtcdCluster, pki: Pki
) -> None:
    prefix = unique_prefix()

    def tls_config() -> Config:
        return replica_config(
            etcd.endpoints,
            prefix,
            tls_cert=pki.path("replica.pem"),
            tls_key=pki.path("replica-key.pem"),
            client_ca=pki.path("ca.pem"),
            node_listen=f"127.0.0.1:{free_port()}",
        )

    a, b = ReplicaThread(tls_config()).start(), ReplicaThread(tls_config()).start()
    try:
        daemon = pki.daemon(a, "prov-t")
        try:
            with Client(b.address, ADMIN_TOKEN, credentials=_tls(pki)) as via_b:
                wait_until(lambda: len(via_b.list_nodes(state=common_pb2.NODE_STATE_READY)) == 1)

                def forwarded() -> bool:
                    try:
                        return bool(via_b.node_telemetry("providers/prov-t/nodes/n1").recent)
                    except GpufedError:
                        return False  # no report yet

                wait_until(forwarded)
                telemetry = via_b.node_telemetry("providers/prov-t/nodes/n1")
            assert telemetry.replica == a.config.replica_id  # answered by A, asked through B
        finally:
            daemon.stop()
    finally:
        a.stop()
        b.stop()


def test_the_console_serves_https_with_the_replicas_certificate_and_reaches_its_api_over_tls(
    etcd: EtcdCluster, pki: Pki
) -> None:
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    from control_plane.tls import TlsConfigError, check_console_listen
    from tests.harness import ADMIN_TOKEN

    cfg = replica_config(
        etcd.endpoints,
        unique_prefix(),
        tls_cert=pki.path("replica.pem"),
        tls_key=pki.path("replica-key.pem"),
        client_ca=pki.path("ca.pem"),
        node_listen=f"127.0.0.1:{free_port()}",
        console_listen="127.0.0.1:0",
    )
    rt = ReplicaThread(cfg).start()
    try:
        assert rt.replica is not None and rt.replica.console is not None
        url = rt.replica.console.url
        assert url.startswith("https://")
        ctx = ssl.create_default_context(cafile=pki.path("ca.pem"))
        with urllib.request.urlopen(url + "/signin", context=ctx, timeout=10) as r:
            assert r.status == 200

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a: object, **k: object) -> None:
                return None

        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
        form = urllib.parse.urlencode({"token": ADMIN_TOKEN}).encode()
        with pytest.raises(urllib.error.HTTPError) as signed_in:  # GetCaller answered over TLS
            opener.open(url + "/signin", data=form, timeout=10)
        assert signed_in.value.code == 303 and "Secure" in signed_in.value.headers["Set-Cookie"]
    finally:
        rt.stop()
    with pytest.raises(TlsConfigError):
        check_console_listen("0.0.0.0:8080", "")
    check_console_listen(":8080", "")  # a bare port is loopback
    check_console_listen("0.0.0.0:8443", pki.path("replica.pem"))
