"""What TLS costs against plaintext, in the same run: a replica serving plaintext and one serving
TLS (both on loopback, one etcd) answer the same calls.

- handshake: a new channel until its first answered health Check, median of `connects`;
- per RPC: 8 closed-loop clients calling health Check, the cheapest RPC there is, so the
  figure is the transport's share; three rounds of each, alternating which goes first.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import closed_loop, fresh_etcd, replica_process
from scripts.dev_certs import Issued, make_ca, replica_cert, write

CLIENTS = 8


def _channel(address: str, creds: grpc.ChannelCredentials | None) -> grpc.Channel:
    return grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)


def _check(ch: grpc.Channel) -> None:
    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


def _handshake_ms(address: str, creds: grpc.ChannelCredentials | None, connects: int) -> float:
    times = []
    for _ in range(connects):
        started = time.perf_counter()
        with _channel(address, creds) as ch:
            _check(ch)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(duration: float = 4.0, rounds: int = 3, connects: int = 100) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, fresh_etcd() as etcd:
        pki = Path(tmp)
        ca = make_ca()
        write(pki, "ca", Issued(ca.pem, ca.key_pem))
        write(pki, "replica", replica_cert(ca))
        tls_args = ("--tls-cert", str(pki / "replica.pem"), "--tls-key", str(pki / "replica-key.pem"))
        creds = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        env = {"GPUFED_LOG_LEVEL": "WARNING"}
        with (
            replica_process(etcd.endpoints, "/tls-bench", env=env) as (_, plain),
            replica_process(etcd.endpoints, "/tls-bench", *tls_args, env=env) as (_, secure),
        ):
            sides: dict[str, tuple[str, grpc.ChannelCredentials | None]] = {
                "plaintext": (plain, None),
                "tls": (secure, creds),
            }

            def rpc_op(
                address: str, c: grpc.ChannelCredentials | None
            ) -> Callable[[int], Callable[[], None]]:
                def make(i: int) -> Callable[[], None]:
                    ch = _channel(address, c)
                    return lambda: _check(ch)

                return make

            for address, c in sides.values():
                closed_loop(CLIENTS, 1.0, rpc_op(address, c))  # warm-up
            handshake = {name: round(_handshake_ms(a, c, connects), 2) for name, (a, c) in sides.items()}
            rates: dict[str, list[float]] = {name: [] for name in sides}
            p50: dict[str, list[float]] = {name: [] for name in sides}
            for r in range(rounds):
                for name in list(sides) if r % 2 == 0 else list(reversed(sides)):
                    address, c = sides[name]
                    result = closed_loop(CLIENTS, duration, rpc_op(address, c))
                    rates[name].append(result.rate)
                    p50[name].append(result.pct(50))
    per_rpc = {name: round(1000 / statistics.median(rates[name]) * CLIENTS, 3) for name in sides}
    return {
        "handshake_ms_median": handshake,
        "health_check_qps_median": {name: round(statistics.median(v), 1) for name, v in rates.items()},
        "health_check_p50_ms_median": {name: round(statistics.median(v), 2) for name, v in p50.items()},
        "tls_qps_ratio": round(statistics.median(rates["tls"]) / statistics.median(rates["plaintext"]), 3),
        "ms_per_rpc_at_8_clients": per_rpc,
        "clients": CLIENTS,
    }
