"""Leases handed to the provider's hook on this host, with the fencing rules of the handoff:

- a start never runs for a stale grant: when its turn comes the lease must still be assigned
  here with that fencing token, and the token must still be the newest for each of its GPUs;
- an end always runs for a lease whose start was run (also when the start failed: it may have
  half set up), after that start finished, also when the ENDED came in a later stream;
- what was started is kept in a state file (--state-dir), so a restarted daemon still knows;
  on each stream the control plane sends STARTED for every live lease and then
  ASSIGNMENTS_SYNCED: a kept lease started again is ensured (the hook's start runs again, it is
  idempotent) and a kept lease that was not is ended;
- an end that fails is retried with backoff (also across restarts: it stays in the state file)
  until it succeeds; meanwhile the lease's GPUs are reported UNHEALTHY with the reason
  LEASE_CLEANUP_PENDING, so no other tenant is given a GPU its last tenant may still reach.

Hook runs of one lease are serialized; different leases run concurrently.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufed.logs import get_logger
from gpufed.v1 import common_pb2, lease_pb2, node_pb2
from node_daemon.assignments import Assignments
from node_daemon.hook import HookOutcome, LeaseHook, hook_input

log = get_logger(__name__)

RETRY_START = 1.0
RETRY_MAX = 300.0
CLEANUP_REASON = "LEASE_CLEANUP_PENDING"
MAX_REASONS = 8  # per GPU, as the control plane bounds them


@dataclass
class Kept:
    """A lease whose start ran (or is running) here."""

    assignment: node_pb2.LeaseAssignment
    outcome: HookOutcome | None = None  # None while its start runs
    ensured: bool = False  # started in this process (else loaded from the state file)


@dataclass
class Unended:
    """A lease whose end has not yet succeeded here: retried until it does."""

    assignment: node_pb2.LeaseAssignment
    attempts: int = 0
    error: str = ""


class Provisioner:
    def __init__(
        self,
        hook: LeaseHook,
        assignments: Assignments,
        send: Callable[[node_pb2.NodeMessage], None],
        indexes: Callable[[], dict[str, int]],
        provider: str,
        node_id: str,
        state_dir: str = "",
    ) -> None:
        self.hook = hook
        self.assignments = assignments
        self.send = send
        self.indexes = indexes
        self.provider, self.node_id = provider, node_id
        self.state_file = Path(state_dir) / "leases.json" if state_dir else None
        self.kept: dict[str, Kept] = {}
        self.unended: dict[str, Unended] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._chains: dict[str, asyncio.Task[None]] = {}
        # The latest hook runs, (action, lease), bounded: a daemon runs for months.
        self.runs: deque[tuple[str, str]] = deque(maxlen=256)
        self._load()

    # -- inputs from the stream -------------------------------------------------------------------

    def started(self, a: node_pb2.LeaseAssignment) -> None:
        """An accepted STARTED: run the hook's start, or answer again with what it answered."""
        for name, other in list(self.kept.items()):
            if name != a.lease and set(other.assignment.gpu_uuids) & set(a.gpu_uuids):
                self.ended(name)  # superseded: a newer grant holds its GPUs
        k = self.kept.get(a.lease)
        if k is not None and k.assignment.fencing_token == a.fencing_token:
            if k.outcome is not None and k.ensured:
                self._answer(k.assignment, k.outcome)  # a new stream: the answer may have been lost
                return
            if k.outcome is None:
                return  # running: it answers when done
        self._chain(a.lease, self._start(a))

    def ended(self, lease: str) -> None:
        if lease in self.kept or lease in self._chains:
            self._chain(lease, self._end(lease))

    def synced(self, started_now: set[str]) -> None:
        """ASSIGNMENTS_SYNCED: every live lease of the node was just sent as STARTED."""
        for name in [n for n in self.kept if n not in started_now]:
            self.ended(name)

    def resume(self) -> None:
        """Retry the ends a previous process left unfinished (call once the loop runs)."""
        for lease in list(self.unended):
            if lease not in self._chains and lease not in self._retries:
                self._chain(lease, self._run_end(lease))

    def leftovers(self) -> dict[str, str]:
        """GPU (or MIG instance) uuid -> the lease whose end has not yet succeeded on it."""
        return {u: name for name, e in self.unended.items() for u in e.assignment.gpu_uuids}

    def mark_leftovers(self, report: common_pb2.NodeReport) -> None:
        """Report every GPU that holds a lease's leftovers (or one of whose MIG instances does)
        UNHEALTHY, with the lease in the reason: discovery offers it to nobody meanwhile."""
        held = self.leftovers()
        if not held:
            return
        for s in report.gpus:
            lease = held.get(s.uuid) or next((held[m.uuid] for m in s.mig_devices if m.uuid in held), "")
            if not lease:
                continue
            s.health = max(s.health, common_pb2.GPU_HEALTH_UNHEALTHY)
            del s.health_reasons[MAX_REASONS - 1 :]
            s.health_reasons.add(
                code=CLEANUP_REASON,
                message=f"the end of {lease} has not finished on this host"[:128],
                action=common_pb2.REPAIR_ACTION_NONE,
            )

    def close(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    async def drain(self) -> None:
        """Wait for every hook run queued so far (tests, and a clean stop)."""
        while self._chains:
            await asyncio.gather(*list(self._chains.values()), return_exceptions=True)

    # -- runs -----------------------------------------------------------------------------------

    def _chain(self, lease: str, job: Coroutine[Any, Any, None]) -> None:
        before = self._chains.get(lease)

        async def after() -> None:
            if before is not None:
                with contextlib.suppress(Exception):
                    await before
            try:
                await job
            except Exception:
                log.exception("lease hook run failed", lease=lease)
            finally:
                if self._chains.get(lease) is task:
                    del self._chains[lease]

        task = asyncio.create_task(after(), name=f"hook-{lease}")
        self._chains[lease] = task

    def _current(self, a: node_pb2.LeaseAssignment) -> bool:
        held = self.assignments.active.get(a.lease)
        if held is None or held.fencing_token != a.fencing_token:
            return False
        return all(self.assignments.newest.get(u, 0) == a.fencing_token for u in a.gpu_uuids)

    async def _start(self, a: node_pb2.LeaseAssignment) -> None:
        if not self._current(a):
            log.info(
                "lease start skipped: no longer the lease's grant here",
                lease=a.lease,
                fencing_token=a.fencing_token,
            )
            return
        self.kept[a.lease] = Kept(a, ensured=True)
        self._save()
        self.runs.append(("start", a.lease))
        outcome = await self.hook.run(hook_input("start", a, self.indexes(), self.provider, self.node_id))
        log.info("lease hook start", lease=a.lease, ok=outcome.ok, error=outcome.error)
        k = self.kept.get(a.lease)
        if k is None or k.assignment.fencing_token != a.fencing_token:
            return  # ended meanwhile: its end is queued behind this run
        k.outcome = outcome
        self._save()
        self._answer(a, outcome)

    async def _end(self, lease: str) -> None:
        k = self.kept.pop(lease, None)
        if k is None:
            return
        self.unended[lease] = Unended(k.assignment)  # until the hook says it is done
        self._save()
        await self._run_end(lease)

    async def _run_end(self, lease: str) -> None:
        self._retries.pop(lease, None)
        u = self.unended.get(lease)
        if u is None:
            return
        self.runs.append(("end", lease))
        outcome = await self.hook.run(
            hook_input("end", u.assignment, self.indexes(), self.provider, self.node_id)
        )
        if outcome.ok:
            del self.unended[lease]
            self._save()
            log.info("lease hook end", lease=lease, ok=True, attempts=u.attempts + 1)
            return
        u.attempts += 1
        u.error = outcome.error
        self._save()
        delay = min(RETRY_MAX, RETRY_START * 2 ** min(u.attempts - 1, 20))
        log.error(
            "lease hook end failed: the host holds the lease's leftovers; retrying",
            lease=lease,
            attempts=u.attempts,
            retry_in_s=delay,
            error=outcome.error,
        )
        loop = asyncio.get_running_loop()
        self._retries[lease] = loop.call_later(delay, lambda: self._chain(lease, self._run_end(lease)))

    def _answer(self, a: node_pb2.LeaseAssignment, outcome: HookOutcome) -> None:
        result = node_pb2.ProvisionResult(
            lease=a.lease,
            fencing_token=a.fencing_token,
            ok=outcome.ok,
            details=outcome.details,
            error=outcome.error,
        )
        self.send(node_pb2.NodeMessage(provisioned=result))

    # -- the state file -------------------------------------------------------------------------

    def _save(self) -> None:
        if self.state_file is None:
            return
        doc: dict[str, dict[str, Any]] = {
            name: {
                "assignment": base64.b64encode(k.assignment.SerializeToString()).decode(),
                "ok": None if k.outcome is None else k.outcome.ok,
                "details": None
                if k.outcome is None
                else base64.b64encode(k.outcome.details.SerializeToString()).decode(),
                "error": "" if k.outcome is None else k.outcome.error,
            }
            for name, k in self.kept.items()
        }
        for name, u in self.unended.items():
            doc[name] = {
                "assignment": base64.b64encode(u.assignment.SerializeToString()).decode(),
                "ending": True,
                "attempts": u.attempts,
                "error": u.error,
            }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, self.state_file)  # atomic: a crash leaves the old file or the new one

    def _load(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            doc = json.loads(self.state_file.read_text(encoding="utf-8"))
            for name, v in doc.items():
                a = node_pb2.LeaseAssignment.FromString(base64.b64decode(v["assignment"]))
                if v.get("ending"):
                    self.unended[name] = Unended(a, int(v.get("attempts", 0)), str(v.get("error", "")))
                    continue
                outcome = None
                if v["ok"] is not None:
                    details = lease_pb2.AccessDetails.FromString(base64.b64decode(v["details"]))
                    outcome = HookOutcome(bool(v["ok"]), details, v["error"])
                self.kept[name] = Kept(a, outcome)
                for u in a.gpu_uuids:  # a start older than what ran here is stale after a restart too
                    self.assignments.newest[u] = max(self.assignments.newest.get(u, 0), a.fencing_token)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error(
                "lease state file unreadable; starting without it", path=str(self.state_file), error=str(e)
            )
            self.kept.clear()
            self.unended.clear()
        if self.kept:
            log.info("leases kept from before", leases=sorted(self.kept))
        if self.unended:
            log.warning("lease ends unfinished from before: retrying them", leases=sorted(self.unended))
