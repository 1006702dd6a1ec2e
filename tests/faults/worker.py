"""A client of the fault suite, in its own process (so that the suite can SIGKILL it): it
creates, renews and releases leases through the SDK over every replica and appends one JSON
line per answered call to its history file, flushed at once (a SIGKILL loses nothing already
answered). It stops by itself when the stop file appears or its deadline passes.

Modes: `cycle` leases 1-2 GPUs, holds them 0.2-2 s renewing every ttl/3, releases, again;
`hold` leases one GPU and renews it until it is killed (an abandoned lease).

Each record: {"w", "op": create|renew|release, "t0" (sent), "t1" (answered), "ok", "lease",
"code" on failure, and for create "req" (request id; retried with the same id, so a grant whose
answer was lost is found again), "gpus", "ttl", "expire"; for renew "expire"}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any, TextIO

from gpufed.client import Client, GpufedError, new_request_id

# Outcomes a client retries: the call may or may not have happened. (INTERNAL and UNKNOWN are
# bugs, which the checker reports; the client goes on meanwhile.)
UNKNOWN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL", "UNKNOWN"}
NO_CAPACITY = {"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}


class Worker:
    def __init__(
        self, client: Client, out: TextIO, name: str, ttl: int, stop_file: str, deadline: float
    ) -> None:
        self.c = client
        self.out = out
        self.name = name
        self.ttl = ttl
        self.stop_file = stop_file
        self.deadline = deadline
        self.rng = random.Random(name)

    def stopping(self) -> bool:
        return time.time() > self.deadline or os.path.exists(self.stop_file)

    def record(self, **r: Any) -> None:
        self.out.write(json.dumps({"w": self.name, **r}) + "\n")
        self.out.flush()

    def create(self, count: int) -> tuple[str, float] | None:
        req = new_request_id()
        while not self.stopping():
            t0 = time.time()
            try:
                lease = self.c.create_lease(count, ttl_s=self.ttl, request_id=req)
            except GpufedError as e:
                self.record(
                    op="create", t0=t0, t1=time.time(), ok=False, req=req, code=e.code.name, reason=e.reason
                )
                if e.code.name in NO_CAPACITY:
                    return None  # a definite answer
                if e.code.name not in UNKNOWN:
                    raise  # the suite is misconfigured: fail loudly, not quietly idle
                time.sleep(0.1)
                continue
            expire = lease.expire_time.ToNanoseconds() / 1e9
            gpus = [g.uuid for g in lease.gpus]
            self.record(
                op="create",
                t0=t0,
                t1=time.time(),
                ok=True,
                req=req,
                lease=lease.name,
                gpus=gpus,
                ttl=self.ttl,
                expire=expire,
            )
            return lease.name, expire
        return None

    def renew(self, name: str) -> bool:
        """False once the lease has ended."""
        t0 = time.time()
        try:
            lease = self.c.renew_lease(name)
        except GpufedError as e:
            self.record(op="renew", t0=t0, t1=time.time(), ok=False, lease=name, code=e.code.name)
            return e.code.name in UNKNOWN
        expire = lease.expire_time.ToNanoseconds() / 1e9
        self.record(op="renew", t0=t0, t1=time.time(), ok=True, lease=name, expire=expire)
        return True

    def release(self, name: str) -> None:
        # Until a definite answer: the suite settles only when every lease has ended.
        while True:
            t0 = time.time()
            try:
                self.c.release_lease(name)
            except GpufedError as e:
                self.record(op="release", t0=t0, t1=time.time(), ok=False, lease=name, code=e.code.name)
                if e.code.name not in UNKNOWN:
                    return
                time.sleep(0.1)
                continue
            self.record(op="release", t0=t0, t1=time.time(), ok=True, lease=name)
            return

    def hold(self, name: str, seconds: float) -> None:
        """Renew every ttl/3 for `seconds` (forever: until killed or stopped)."""
        until = time.time() + seconds
        while time.time() < until and not self.stopping():
            time.sleep(min(self.ttl / 3, max(0.0, until - time.time())))
            if time.time() < until and not self.renew(name):
                return

    def run(self, mode: str) -> None:
        while not self.stopping():
            got = self.create(1 if mode == "hold" else self.rng.choice((1, 1, 2)))
            if got is None:
                time.sleep(0.2)
                continue
            name, _ = got
            self.hold(name, float("inf") if mode == "hold" else self.rng.uniform(0.2, 2.0))
            self.release(name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoints", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--mode", choices=("cycle", "hold"), default="cycle")
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--max-seconds", type=float, default=600)
    a = p.parse_args()
    with open(a.out, "a", encoding="utf-8") as out, Client(a.endpoints, a.token, timeout=3, retries=2) as c:
        Worker(c, out, a.name, a.ttl, a.stop_file, time.time() + a.max_seconds).run(a.mode)


if __name__ == "__main__":
    main()
