"""CPU lists for `--cpus`, and pinning a process's threads to them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from control_plane.affinity import parse_cpu_list, pin_process
from control_plane.config import parse_args


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("", set()), ("3", {3}), ("0,2", {0, 2}), ("4-7,9", {4, 5, 6, 7, 9}), (" 1 , 1-2 ", {1, 2})],
)
def test_cpu_lists_read_like_taskset(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["x", "1-", "3-1", "-2", "1.5"])
def test_malformed_cpu_lists_are_refused_with_the_part_named(text: str) -> None:
    with pytest.raises(ValueError, match="CPU list"):
        parse_cpu_list(text)


def test_cpus_flag_and_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPUFED_CPUS", raising=False)
    assert parse_args([]).cpus == frozenset()
    monkeypatch.setenv("GPUFED_CPUS", "0-1")
    assert parse_args([]).cpus == {0, 1}
    assert parse_args(["--cpus", "1"]).cpus == {1}
    with pytest.raises(SystemExit) as e:
        parse_args(["--cpus", "one"])
    assert e.value.code == 2 and "'one' is not a CPU number" in capsys.readouterr().err


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


_PIN_AND_REPORT = """
import os, sys, threading
from control_plane.affinity import pin_process

ready, done = threading.Event(), threading.Event()
running = threading.Thread(target=lambda: (ready.set(), done.wait()))
running.start()
ready.wait()
print(sorted(pin_process(frozenset({int(sys.argv[1])}))))
print(sorted(os.sched_getaffinity(running.native_id)))
seen = []
later = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
later.start()
later.join()
print(seen[0])
done.set()
"""


def test_pinning_moves_running_threads_and_later_ones_inherit_it() -> None:
    # In a child process: pinning this test process would slow the rest of the suite.
    first = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", _PIN_AND_REPORT, str(first)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [f"[{first}]"] * 3


def test_pinning_to_cpus_this_process_lacks_changes_nothing() -> None:
    before = os.sched_getaffinity(0)
    unavailable = frozenset({max(before) + 1000})
    with pytest.raises(ValueError, match="not available"):
        pin_process(unavailable)
    assert os.sched_getaffinity(0) == before


def test_replica_refuses_unavailable_cpus_with_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "control_plane", "--cpus", "100000"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "--cpus: CPUs [100000] are not available" in out.stderr
