"""The reference lease hooks in hooks/, run as the daemon runs them (JSON on stdin), dry-run."""

from __future__ import annotations

import importlib.util
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


def test_the_docker_hook_gives_the_container_exactly_the_leases_gpus_by_cdi_name_or_gpus() -> None:
    cdi = run("docker_gpu.py", doc("start"), GPUFED_HOOK_GPU_MODE="cdi")
    assert cdi.returncode == 0, cdi.stderr
    assert "--device nvidia.com/gpu=GPU-a --device nvidia.com/gpu=GPU-b" in cdi.stderr
    assert "--gpus" not in cdi.stderr
    gpus = run("docker_gpu.py", doc("start"), GPUFED_HOOK_GPU_MODE="gpus")
    assert "--gpus '\"device=GPU-a,GPU-b\"'" in gpus.stderr and "nvidia.com/gpu" not in gpus.stderr
    assert json.loads(cdi.stdout)["ssh"] == "ssh -p 32768 gpufed@n1.example.net"
    assert "docker rm --force gpufed-00ff00ff00ff00ff" in run("docker_gpu.py", doc("end")).stderr


def test_the_docker_hooks_container_adds_no_capability_and_is_bounded() -> None:
    started = run("docker_gpu.py", doc("start"), GPUFED_HOOK_GPU_MODE="cdi")
    line = next(x for x in started.stderr.splitlines() if x.startswith("+ docker run"))
    assert "--cap-drop ALL" in line and "--security-opt no-new-privileges:true" in line
    words = line.split()
    caps = {words[i + 1] for i, w in enumerate(words) if w == "--cap-add"}
    assert caps <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "KILL"}
    assert "--privileged" not in line and "SYS_ADMIN" not in line
    assert f"--memory {64 << 30} --memory-swap {64 << 30}" in line and "--pids-limit 4096" in line
    assert "--read-only" not in line  # the default image's init writes to its root


def test_the_docker_hook_takes_the_tenants_limits_only_within_the_providers_bounds() -> None:
    bounds = {"GPUFED_HOOK_MAX_MEMORY": "32g", "GPUFED_HOOK_MAX_PIDS": "1000", "GPUFED_HOOK_GPU_MODE": "cdi"}
    smaller = run("docker_gpu.py", doc("start", memory="8g", pids="500"), **bounds)
    assert smaller.returncode == 0, smaller.stderr
    assert f"--memory {8 << 30} " in smaller.stderr and "--pids-limit 500" in smaller.stderr
    for options in ({"memory": "33g"}, {"memory": "lots"}, {"pids": "1001"}, {"pids": "-1"}):
        refused = run("docker_gpu.py", doc("start", **options), **bounds)
        assert refused.returncode == 2, refused.stderr
        assert "bounds" in refused.stderr or "not a size" in refused.stderr
        assert "docker run" not in refused.stderr


def test_the_docker_hook_runs_an_image_read_only_unless_the_provider_says_it_needs_writing() -> None:
    image = "nvcr.io/nvidia/pytorch:24.10-py3"
    env = {"GPUFED_HOOK_IMAGES": f"{image}", "GPUFED_HOOK_GPU_MODE": "cdi"}
    ro = run("docker_gpu.py", doc("start"), **env)
    assert "--read-only --tmpfs /tmp:rw,nosuid,nodev --tmpfs /run:rw,nosuid,nodev" in ro.stderr
    rw = run("docker_gpu.py", doc("start"), GPUFED_HOOK_WRITABLE_IMAGES=image, **env)
    assert rw.returncode == 0 and "--read-only" not in rw.stderr
    extra = run("docker_gpu.py", doc("start"), GPUFED_HOOK_CAPS="CHOWN,SYS_ADMIN", **env)
    assert extra.returncode == 1 and "SYS_ADMIN" in extra.stderr and "docker run" not in extra.stderr


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


def test_the_linux_user_hooks_device_allow_list_opens_only_the_leases_gpus() -> None:
    spec = importlib.util.spec_from_file_location("linux_user", HOOKS / "linux_user.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    dropin = hook.gpu_dropin(doc("start")).splitlines()
    assert "DevicePolicy=closed" in dropin
    allowed = {line.removeprefix("DeviceAllow=") for line in dropin if line.startswith("DeviceAllow=")}
    assert {"/dev/nvidia2 rw", "/dev/nvidia3 rw", "/dev/nvidiactl rw", "char-pts rw"} <= allowed
    assert not any(a.startswith(("/dev/nvidia0", "/dev/nvidia1 ")) for a in allowed)
