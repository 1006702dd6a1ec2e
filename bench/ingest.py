"""Telemetry ingest: how many node reports (8 GPUs each) one replica takes per second, and its
CPU per report. Senders in a separate process flood pre-encoded reports over many streams.
Target: 5,000 reports/s."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import urllib.request
from typing import Any

import grpc

from bench.common import ADMIN_TOKEN, cpu_seconds, fresh_etcd, replica_process
from gpufed import __version__
from gpufed.client import Client
from gpufed.v1 import common_pb2, node_pb2
from node_daemon.collector import Collector
from node_daemon.fake_nvml import FakeNvml
from tests.harness import free_port

METHOD = "/gpufed.v1.NodeService/Connect"


def _messages(provider: str, node_id: str) -> tuple[bytes, bytes]:
    c = Collector(FakeNvml("h100-sxm-8", host=node_id))
    c.start()
    hello = node_pb2.NodeHello(
        provider=provider,
        daemon_version=__version__,
        node_id=node_id,
        gpus=c.inventory(),
        price_per_gpu_hour=2.0,
        location=common_pb2.Location(region="eu", country_code="DE", latitude=50.1, longitude=8.7),
    )
    report = node_pb2.NodeMessage(report=c.sample())
    return node_pb2.NodeMessage(hello=hello).SerializeToString(), report.SerializeToString()


async def _stream(address: str, token: str, hello: bytes, report: bytes, stop_at: float) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream(METHOD)(metadata=(("authorization", f"Bearer {token}"),))
        await call.write(hello)
        await call.read()  # welcome
        sent = 0
        while time.monotonic() < stop_at:
            await call.write(report)
            sent += 1
        await call.done_writing()
        return sent


def _sender(address: str, token: str, first: int, streams: int, duration: float, out: Any) -> None:
    msgs = [_messages("bench", f"s{first + i:04d}") for i in range(streams)]

    async def main() -> int:
        stop_at = time.monotonic() + duration
        counts = await asyncio.gather(*(_stream(address, token, h, r, stop_at) for h, r in msgs))
        return sum(counts)

    out.put(asyncio.run(main()))


def _reports_ingested(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("gpufed_node_reports_total "):
                return float(line.split()[1])
    return 0.0


def run(streams: int = 200, duration: float = 10.0) -> dict[str, Any]:
    prefix = "/bench-ingest"
    metrics_port = free_port()
    with (
        fresh_etcd() as etcd,
        replica_process(
            etcd.endpoints,
            prefix,
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--report-interval",
            "60",
            env={"GPUFED_LOG_LEVEL": "WARNING"},
        ) as (proc, address),
    ):
        with Client(address, ADMIN_TOKEN) as admin:
            token = admin.create_token("provider", "bench").secret
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue[int] = ctx.Queue()
        sender = ctx.Process(target=_sender, args=(address, token, 0, streams, duration + 3, out))
        sender.start()
        time.sleep(3)  # connected and warm
        r0, c0, t0 = _reports_ingested(url), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(duration)
        r1, c1, t1 = _reports_ingested(url), cpu_seconds(proc.pid), time.monotonic()
        sent = out.get(timeout=60)
        sender.join(30)
    reports = r1 - r0
    cpu = c1 - c0
    return {
        "streams": streams,
        "gpus_per_report": 8,
        "reports_per_s": round(reports / (t1 - t0), 1),
        "replica_cpu_ms_per_report": round(cpu / reports * 1000, 4) if reports else None,
        "replica_cpu_share_pct": round(cpu / (t1 - t0) * 100, 1),
        "reports_per_s_per_replica_core": round(reports / cpu, 1) if cpu else None,
        "sent_total": sent,
    }
