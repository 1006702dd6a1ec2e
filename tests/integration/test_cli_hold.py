"""`gpufed lease create --hold` keeps the lease alive until Ctrl-C, then releases it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpufed.client import Client
from gpufed.v1 import lease_pb2
from tests.harness import ReplicaThread, one_node, wait_until

pytestmark = pytest.mark.integration


def test_hold_renews_past_the_ttl_and_releases_on_ctrl_c(replica: ReplicaThread) -> None:
    with one_node(replica.address, "holder") as tenant, Client(replica.address, tenant) as c:
        env = {
            **os.environ,
            "GPUFED_ENDPOINT": replica.address,
            "GPUFED_TOKEN": tenant,
            "GPUFED_CONFIG": "/nonexistent",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpufed",
                "-o",
                "json",
                "lease",
                "create",
                "--count",
                "2",
                "--ttl",
                "5",
                "--hold",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: len(c.list_leases(lease_pb2.LEASE_STATE_ACTIVE)) == 1, timeout=20)
        time.sleep(8)  # beyond the ttl: --hold renews
        assert len(c.list_leases(lease_pb2.LEASE_STATE_ACTIVE)) == 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        name = json.loads(out)["name"]
        assert c.get_lease(name).end_reason == lease_pb2.LEASE_END_REASON_RELEASED
        assert f"released {name}" in err
