"""The handoff's fencing on the host: a stale grant never starts, an end always follows a start,
and a restarted daemon knows what it started."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpufed.v1 import common_pb2, lease_pb2, node_pb2
from node_daemon import provisioning
from node_daemon.assignments import ENDED, STARTED, Assignments
from node_daemon.hook import HookOutcome, LeaseHook, hook_input, parse_details
from node_daemon.provisioning import Provisioner


class FakeHook(LeaseHook):
    def __init__(self, fail: bool = False, failing_ends: int = 0) -> None:
        super().__init__("/nonexistent", 1.0)
        self.docs: list[dict[str, Any]] = []
        self.fail = fail
        self.failing_ends = failing_ends  # how many ends fail before one succeeds

    async def run(self, doc: dict[str, Any]) -> HookOutcome:
        self.docs.append(doc)
        await asyncio.sleep(0.05)
        if doc["action"] == "end" and self.failing_ends > 0:
            self.failing_ends -= 1
            return HookOutcome(False, lease_pb2.AccessDetails(), "the lease hook exited with status 1")
        if self.fail:
            return HookOutcome(False, lease_pb2.AccessDetails(), "boom")
        return HookOutcome(True, lease_pb2.AccessDetails(ssh=f"ssh {doc['lease']}"))


def assignment(
    lease: str, token: int, action: int = STARTED, gpus: tuple[str, ...] = ("g0",)
) -> node_pb2.LeaseAssignment:
    return node_pb2.LeaseAssignment(lease=lease, fencing_token=token, action=action, gpu_uuids=list(gpus))  # type: ignore[arg-type]


def setup(
    state_dir: str = "", fail: bool = False, failing_ends: int = 0
) -> tuple[Provisioner, FakeHook, Assignments, list[node_pb2.NodeMessage]]:
    hook, assignments = FakeHook(fail, failing_ends), Assignments()
    sent: list[node_pb2.NodeMessage] = []
    p = Provisioner(hook, assignments, sent.append, lambda: {"g0": 0, "g1": 1}, "neo", "n1", state_dir)
    return p, hook, assignments, sent


def deliver(p: Provisioner, s: Assignments, a: node_pb2.LeaseAssignment) -> None:
    ok, _ = s.apply(a)
    if ok and a.action == STARTED:
        p.started(a)
    elif ok:
        p.ended(a.lease)


def test_a_lease_ended_before_its_start_ran_is_never_started() -> None:
    async def go() -> None:
        p, _, s, sent = setup()
        deliver(p, s, assignment("leases/a", 10))
        deliver(p, s, assignment("leases/a", 10, ENDED))
        await p.drain()
        assert list(p.runs) == [] and sent == []

    asyncio.run(go())


def test_a_start_superseded_before_its_turn_never_runs() -> None:
    async def go() -> None:
        p, _hook, s, sent = setup()
        deliver(p, s, assignment("leases/a", 10))
        deliver(p, s, assignment("leases/b", 20))  # a newer grant of the same GPU, before a's turn
        await p.drain()
        assert list(p.runs) == [("start", "leases/b")]
        assert [m.provisioned.lease for m in sent] == ["leases/b"]

    asyncio.run(go())


def test_a_stale_start_is_refused_before_it_reaches_the_hook() -> None:
    async def go() -> None:
        p, _hook, s, _ = setup()
        deliver(p, s, assignment("leases/b", 20))
        await p.drain()
        deliver(p, s, assignment("leases/a", 10))  # older token: Assignments refuses it
        await p.drain()
        assert list(p.runs) == [("start", "leases/b")]

    asyncio.run(go())


def test_an_end_runs_after_its_start_even_when_the_start_failed() -> None:
    async def go() -> None:
        p, _hook, s, sent = setup(fail=True)
        deliver(p, s, assignment("leases/a", 10))
        await asyncio.sleep(0.01)
        deliver(p, s, assignment("leases/a", 10, ENDED))  # while the start runs
        await p.drain()
        assert list(p.runs) == [("start", "leases/a"), ("end", "leases/a")]
        assert sent[0].provisioned.ok is False and sent[0].provisioned.error == "boom"

    asyncio.run(go())


def test_a_restarted_daemon_ensures_what_is_still_live_and_ends_the_rest(tmp_path: Path) -> None:
    async def first() -> None:
        p, _, s, _ = setup(str(tmp_path))
        deliver(p, s, assignment("leases/a", 10, gpus=("g0",)))
        deliver(p, s, assignment("leases/b", 11, gpus=("g1",)))
        await p.drain()

    async def second() -> None:
        p, _hook, s, sent = setup(str(tmp_path))
        assert set(p.kept) == {"leases/a", "leases/b"}
        # The new stream: a is live again, b is not; then ASSIGNMENTS_SYNCED.
        deliver(p, s, assignment("leases/a", 10, gpus=("g0",)))
        p.synced({"leases/a"})
        await p.drain()
        assert sorted(p.runs) == [("end", "leases/b"), ("start", "leases/a")]
        assert [m.provisioned.lease for m in sent] == ["leases/a"]
        # A later stream of the same process answers again without running the hook.
        deliver(p, s, assignment("leases/a", 10, gpus=("g0",)))
        await p.drain()
        assert len(p.runs) == 2 and len(sent) == 2
        # A start older than what ran before the restart is stale after it too.
        assert s.apply(assignment("leases/old", 5, gpus=("g0",))) == (False, "STALE_FENCING_TOKEN")

    asyncio.run(first())
    asyncio.run(second())


def report_of(*uuids: str) -> common_pb2.NodeReport:
    return common_pb2.NodeReport(
        gpus=[common_pb2.GpuSample(uuid=u, health=common_pb2.GPU_HEALTH_HEALTHY) for u in uuids]
    )


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within the timeout")


def test_a_failed_end_is_retried_with_backoff_and_its_gpus_are_unhealthy_until_it_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(provisioning, "RETRY_START", 0.05)

    async def go() -> None:
        p, hook, s, _ = setup(failing_ends=2)
        deliver(p, s, assignment("leases/a", 10))
        await p.drain()
        deliver(p, s, assignment("leases/a", 10, ENDED))
        await p.drain()
        assert p.leftovers() == {"g0": "leases/a"} and p.unended["leases/a"].attempts == 1
        report = report_of("g0", "g1")
        p.mark_leftovers(report)
        held, free = report.gpus
        assert held.health == common_pb2.GPU_HEALTH_UNHEALTHY
        assert [r.code for r in held.health_reasons] == ["LEASE_CLEANUP_PENDING"]
        assert "leases/a" in held.health_reasons[0].message
        assert free.health == common_pb2.GPU_HEALTH_HEALTHY and not free.health_reasons

        await until(lambda: not p.unended)  # two failures, then success: 0.05 s, then 0.1 s later

        assert [d["action"] for d in hook.docs] == ["start", "end", "end", "end"]
        after = report_of("g0")
        p.mark_leftovers(after)
        assert after.gpus[0].health == common_pb2.GPU_HEALTH_HEALTHY

    asyncio.run(go())


def test_an_unfinished_end_is_kept_in_the_state_file_and_retried_by_the_next_process(tmp_path: Path) -> None:
    async def first() -> None:
        p, _, s, _ = setup(str(tmp_path), failing_ends=1)
        deliver(p, s, assignment("leases/a", 10))
        await p.drain()
        deliver(p, s, assignment("leases/a", 10, ENDED))
        await p.drain()
        assert "leases/a" in p.unended
        p.close()  # the daemon stops before its retry

    async def second() -> None:
        p, hook, _, _ = setup(str(tmp_path))
        assert p.unended["leases/a"].attempts == 1 and p.leftovers() == {"g0": "leases/a"}
        p.resume()
        await p.drain()
        assert [d["action"] for d in hook.docs] == ["end"] and not p.unended
        third, _, _, _ = setup(str(tmp_path))
        assert not third.unended and not third.kept

    asyncio.run(first())
    asyncio.run(second())


def test_the_hook_gets_gpus_indexes_token_and_access_and_answers_bounded_json() -> None:
    a = assignment("leases/a", 7, gpus=("g1", "g0"))
    a.access.ssh_public_keys.append("ssh-ed25519 AAAA k")
    doc = hook_input("start", a, {"g0": 0, "g1": 1}, "neo", "n1")
    assert doc["cuda_visible_devices"] == "1,0"
    assert doc["fencing_token"] == 7 and doc["access"]["ssh_public_keys"] == ["ssh-ed25519 AAAA k"]
    assert parse_details(b'{"ssh": "ssh u@h", "other": 1}').ssh == "ssh u@h"
    assert parse_details(b"").ssh == ""


def test_a_mig_instance_is_handed_to_the_hook_by_its_uuid_not_its_gpus_index() -> None:
    a = assignment("leases/m", 3, gpus=("MIG-aa", "g1"))
    doc = hook_input("start", a, {"MIG-aa": 0, "g1": 1}, "neo", "n1")
    assert doc["cuda_visible_devices"] == "MIG-aa,1"
    for bad in (b"[1]", b'{"ssh": 5}', b"not json", b"x" * 70_000):
        try:
            parse_details(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad[:20]!r}")
