"""`make run`'s demo: it comes up, answers searches with offers from every demo provider, hands
a lease over with access details, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from control_plane.demo import NODES, POOL, PROVIDERS
from gpufed.client import Client
from gpufed.v1 import common_pb2, lease_pb2
from tests.harness import free_port, wait_until

pytestmark = pytest.mark.integration


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_demo_offers_gpus_of_every_provider_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, etcd_port, peer_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    dcgm_port, console_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_plane.demo",
            "--port",
            str(port),
            "--etcd-port",
            str(etcd_port),
            "--etcd-peer-port",
            str(peer_port),
            "--metrics-port",
            str(metrics_port),
            "--dcgm-port",
            str(dcgm_port),
            "--console-port",
            str(console_port),
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(lines)
        assert "gpufed demo is up" in text, text
        assert f"http://127.0.0.1:{console_port}/" in text  # make run prints the console's address
        env = dict(
            line.removeprefix("export ").strip().split("=", 1)
            for line in (tmp_path / "demo.env").read_text().splitlines()
        )
        with Client(env["GPUFED_ENDPOINT"], env["GPUFED_TOKEN"]) as c:
            wait_until(lambda: {o.provider for o in c.search_offers()} == set(PROVIDERS), timeout=30)
            offers = list(c.search_offers())
            assert {o.location.country_code for o in offers} >= {"DE", "FI", "SE", "FR", "US", "CA"}
            assert len({o.gpu_model for o in offers}) >= 4
            assert len(c.list_nodes()) == len(NODES)
            # The demo's providers hand leases over: a lease with a key ends in access details.
            key = (Path(__file__).parents[1] / "data" / "ssh_keys" / "ed25519.pub").read_text().strip()
            with c.lease(1, ttl_s=30, ssh_keys=[key]) as held:
                assert held.lease.state == lease_pb2.LEASE_STATE_ACTIVE
                assert held.access[0].ssh.startswith("ssh lease-")
            assert not [n for n in c.list_nodes() if n.pool_tenant]  # acme's pool is not ours to see
            # MIG instances of ca-mtl-1's A100, and dcgm-exporter's metrics of de-ber-1.
            assert [o.mig_profile for o in c.search_offers(mig_profile="1g.10gb")] == ["1g.10gb"]
            with urllib.request.urlopen(f"http://127.0.0.1:{dcgm_port}/metrics", timeout=5) as r:
                assert b'DCGM_FI_DEV_GPU_TEMP{gpu="0"' in r.read()
        # The demo's tokens sign in to the console (the browser tests: test_console.py).
        for name in ("GPUFED_TOKEN", "GPUFED_ACME_TOKEN", "GPUFED_ADMIN_TOKEN"):
            form = urllib.parse.urlencode({"token": env[name]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{console_port}/signin", data=form)
            with pytest.raises(urllib.error.HTTPError) as signed_in:  # 303 to the first view
                urllib.request.build_opener(_NoRedirect).open(req, timeout=10)
            assert signed_in.value.code == 303, name
            assert "gpufed_session=" in signed_in.value.headers["Set-Cookie"]
        # acme fills its own 8 L40S first, then bursts into the federation (nordic-gpu's L40S).
        with Client(env["GPUFED_ENDPOINT"], env["GPUFED_ACME_TOKEN"]) as acme:
            wait_until(lambda: len([n for n in acme.list_nodes() if n.pool_tenant]) == len(POOL), timeout=30)
            own = [acme.create_lease(4, ttl_s=30, gpu_model="L40S") for _ in range(2)]
            assert {g.pool for lease in own for g in lease.gpus} == {common_pb2.POOL_KIND_OWN}
            burst = acme.create_lease(4, ttl_s=30, gpu_model="L40S")
            assert {g.provider for g in burst.gpus} == {"nordic-gpu"}
            for lease in [*own, burst]:
                acme.release_lease(lease.name)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "stopped." in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
