"""The reference lease hooks in hooks/, run as the daemon runs them (JSON on stdin), dry-run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

HOOKS = Path(__file__).parents[3] / "hooks"
KEY = (Path(__file__).parents[2] / "data" / "ssh_keys" / "ed25519.pub").read_text(encoding="utf-8").strip()


def doc(action: str, **options: str) -> dict[str, Any]:
    return {
        "version": 1,
        "action": action,
        "lease": "leases/00ff00ff00ff00ff",
        "tenant": "dev",
        "provider": "neo",
        "node_id": "n1",
        "gpus": [{"uuid": "GPU-a", "index": 2}, {"uuid": "GPU-b", "index": 3}],
        "cuda_visible_devices": "2,3",
        "fencing_token": 42,
        "expire_time": "2026-12-02T00:00:00Z",
        "access": {"ssh_public_keys": [KEY], "provider_options": options},
    }


def run(hook: str, d: dict[str, Any], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOOKS / hook)],
        input=json.dumps(d),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GPUFED_HOOK_DRY_RUN": "1", "GPUFED_HOOK_SSH_HOST": "n1.example.net", **env},
    )


def test_the_linux_user_hook_creates_a_user_with_the_keys_and_the_gpus_and_removes_it() -> None:
    start = run("linux_user.py", doc("start"))
    assert start.returncode == 0, start.stderr
    assert json.loads(start.stdout)["ssh"] == "ssh gpufed-00ff00ff00ff00ff@n1.example.net"
    assert "useradd --create-home" in start.stderr and "gpufed-00ff00ff00ff00ff" in start.stderr
    assert "authorized_keys" in start.stderr and ".gpufed_env" in start.stderr
    end = run("linux_user.py", doc("end"))
    assert end.returncode == 0 and end.stdout == ""
    assert "userdel --remove gpufed-00ff00ff00ff00ff" in end.stderr


def test_the_docker_hook_runs_one_container_with_exactly_the_leases_gpus() -> None:
    start = run("docker_gpu.py", doc("start"))
    assert start.returncode == 0, start.stderr
    assert "--gpus '\"device=GPU-a,GPU-b\"'" in start.stderr
    assert json.loads(start.stdout)["ssh"] == "ssh -p 32768 gpufed@n1.example.net"
    assert "docker rm --force gpufed-00ff00ff00ff00ff" in run("docker_gpu.py", doc("end")).stderr


def test_the_docker_hook_refuses_an_image_the_provider_does_not_offer() -> None:
    refused = run("docker_gpu.py", doc("start", image="evil/miner"))
    assert refused.returncode == 2 and "not offered" in refused.stderr
    allowed = run(
        "docker_gpu.py",
        doc("start", image="nvcr.io/nvidia/pytorch:24.10-py3"),
        GPUFED_HOOK_IMAGES="a,nvcr.io/nvidia/pytorch:24.10-py3",
    )
    assert allowed.returncode == 0


def test_the_demo_hook_answers_plausible_details_and_touches_nothing() -> None:
    start = run("demo.py", doc("start"))
    details = json.loads(start.stdout)
    assert details["ssh"].startswith("ssh lease-00ff00ff@n1.neo.")
    assert "CUDA_VISIBLE_DEVICES=2,3" in details["instructions"]
    assert run("demo.py", doc("end")).stdout == ""
