"""What the web console adds to the API: latency of its pages against the gRPC calls behind
them, in the same run.

One replica process serving `--console-listen`, four daemons (fake NVML, 8 x H100 each), one
tenant. For each view, `requests` sequential page loads (a signed-in browser's cookie, over
HTTP on loopback) and as many of the SDK calls the page makes, alternating; p50 and p99 of each
and the console's share (page p50 - API p50): Jinja rendering, Starlette, uvicorn and the HTTP
round trip on top of the same gRPC calls.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from bench.common import ADMIN_TOKEN, fresh_etcd, replica_process
from gpufed.client import Client
from gpufed.v1 import discovery_pb2, lease_pb2, reservation_pb2
from tests.harness import daemon_process, free_port, wait_until

DAEMONS = 4


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": round(statistics.median(s), 2), "p99_ms": round(s[max(0, int(len(s) * 0.99) - 1)], 2)}


def run(requests: int = 200) -> dict[str, Any]:
    port = free_port()
    with (
        fresh_etcd() as etcd,
        replica_process(etcd.endpoints, "/bench-console", "--console-listen", f"127.0.0.1:{port}") as (
            _,
            addr,
        ),
    ):
        with Client(addr, ADMIN_TOKEN) as admin:
            tenant = admin.create_token("tenant", "bench").secret
            provider = admin.create_token("provider", "neo").secret
        with contextlib.ExitStack() as stack:
            for i in range(DAEMONS):
                stack.enter_context(
                    daemon_process([addr], provider, "neo", f"n{i}", "--insecure", profile="h100-sxm-8")
                )
            with Client(addr, tenant) as c:
                wait_until(lambda: sum(o.free_gpus for o in c.search_offers()) == 8 * DAEMONS, timeout=30)
                held = [c.create_lease(2, gpu_model="H100") for _ in range(3)]
                cookie = {"Cookie": f"gpufed_session={tenant}; gpufed_kind=tenant"}
                base = f"http://127.0.0.1:{port}"

                def page(path: str) -> Callable[[], None]:
                    def load() -> None:
                        req = urllib.request.Request(base + path, headers=cookie)
                        with urllib.request.urlopen(req, timeout=10) as r:
                            assert r.status == 200, path
                            r.read()

                    return load

                views: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
                    "offers": (
                        page("/offers?model=H100&count=2"),
                        lambda: c.call(
                            c.discovery.SearchOffers,
                            discovery_pb2.SearchOffersRequest(min_free_gpus=2, page_size=50),
                        ),
                    ),
                    "leases": (
                        page("/leases/table"),
                        lambda: (
                            c.call(c.leases.ListLeases, lease_pb2.ListLeasesRequest(page_size=50)),
                            c.call(
                                c.reservations.ListReservations,
                                reservation_pb2.ListReservationsRequest(page_size=50),
                            ),
                        ),
                    ),
                    "capacity": (
                        page("/capacity"),
                        lambda: c.call(
                            c.discovery.SummarizeCapacity, discovery_pb2.SummarizeCapacityRequest()
                        ),
                    ),
                }
                out: dict[str, Any] = {"requests": requests, "nodes": DAEMONS}
                for name, (console, api) in views.items():
                    for _ in range(10):  # warm-up
                        console()
                        api()
                    pages, calls = [], []
                    for _ in range(requests):
                        t = time.perf_counter()
                        console()
                        pages.append((time.perf_counter() - t) * 1000)
                        t = time.perf_counter()
                        api()
                        calls.append((time.perf_counter() - t) * 1000)
                    p, a = _ms(pages), _ms(calls)
                    out[name] = {"page": p, "api": a, "console_share_ms": round(p["p50_ms"] - a["p50_ms"], 2)}
                for lease in held:
                    c.release_lease(lease.name)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
