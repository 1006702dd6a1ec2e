"""`gpufed offers`, `capacity`, `nodes` and `pool`: what the federation has."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from gpufed.cli.common import EXIT_OK, Subparsers, add_filter_flags, country_codes, filter_kwargs
from gpufed.cli.output import emit, gib, health
from gpufed.cli.reservations import add_window_flags, window_kwargs
from gpufed.client import Client
from gpufed.v1 import common_pb2


def cmd_offers_search(c: Client, args: argparse.Namespace) -> int:
    order = {"price": 1, "distance": 2, "free": 3}[args.order_by]
    found = list(
        c.search_offers(
            min_free_gpus=args.count,
            order_by=order,
            limit=args.limit,
            pool=args.pool,
            **filter_kwargs(args),
            **window_kwargs(args),
        )
    )
    emit(args, found, lambda: offer_rows(found))
    return EXIT_OK


OFFER_HEADER = ["NODE", "MODEL", "MEM", "FREE", "PRICE/GPU-H", "COUNTRY", "REGION", "DIST_KM", "POOL"]


def offer_rows(found: Sequence[Any]) -> list[list[str]]:
    """The offers table, header first (the console shows the same cells)."""
    return [OFFER_HEADER] + [
        [
            o.node,
            f"{o.gpu_model} MIG {o.mig_profile}" if o.mig_profile else o.gpu_model,
            gib(o.gpu_memory_bytes),
            str(o.free_gpus),
            f"{o.price_per_gpu_hour:.2f} {o.currency_code}",
            o.location.country_code,
            o.location.region,
            f"{o.distance_km:.0f}" if o.HasField("distance_km") else "-",
            "own" if o.pool == common_pb2.POOL_KIND_OWN else "federation",
        ]
        for o in found
    ]


def cmd_capacity(c: Client, args: argparse.Namespace) -> int:
    resp = c.summarize_capacity(**filter_kwargs(args), **window_kwargs(args))
    emit(
        args,
        resp,
        lambda: (
            [["MODEL", "COUNTRY", "HEALTH", "TOTAL", "FREE"]]
            + [
                [b.gpu_model, b.country_code, health(b.health), str(b.total_gpus), str(b.free_gpus)]
                for b in resp.buckets
            ]
            + [["TOTAL", "", "", str(resp.total_gpus), str(resp.free_gpus)]]
        ),
    )
    return EXIT_OK


def node_rows(nodes: Sequence[common_pb2.Node]) -> list[list[str]]:
    return [["NODE", "STATE", "GPUS", "FREE", "MODEL", "COUNTRY", "PRICE/GPU-H"]] + [
        [
            n.name,
            common_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_"),
            str(len(n.gpus)),
            str(n.free_gpu_count),
            n.gpus[0].model if n.gpus else "-",
            n.location.country_code,
            f"{n.price_per_gpu_hour:.2f}",
        ]
        for n in nodes
    ]


def cmd_nodes_list(c: Client, args: argparse.Namespace) -> int:
    state = 0 if not args.state else common_pb2.NodeState.Value("NODE_STATE_" + args.state.upper())
    nodes = c.list_nodes(provider=args.provider, state=state)
    emit(args, nodes, lambda: node_rows(nodes))
    return EXIT_OK


def cmd_pool_list(c: Client, args: argparse.Namespace) -> int:
    """The caller's private pool (an admin: every pool), as `nodes list` shows nodes."""
    nodes = [n for n in c.list_nodes() if n.pool_tenant]
    emit(args, nodes, lambda: node_rows(nodes))
    return EXIT_OK


def cmd_pool_burst(c: Client, args: argparse.Namespace) -> int:
    """Show a tenant's burst policy, or set it with --max-price / --country (0 and none: no limit)."""
    if args.max_price is None and args.country is None:
        policy = c.get_burst_policy(args.tenant)
    else:
        policy = c.set_burst_policy(args.tenant, args.max_price or 0.0, args.country or [])
    emit(
        args,
        policy,
        lambda: [
            ["POLICY", "MAX PRICE/GPU-H", "COUNTRIES"],
            [policy.name, f"{policy.max_price_per_gpu_hour:g}" or "-", ",".join(policy.countries) or "any"],
        ],
    )
    return EXIT_OK


def cmd_nodes_get(c: Client, args: argparse.Namespace) -> int:
    node = c.get_node(args.name)
    emit(
        args,
        node,
        lambda: (
            node_rows([node])
            + [[""], ["GPU", "INDEX", "MODEL", "MEM", "HEALTH", "REPAIR", "LEASE", "REASONS"]]
            + [
                [
                    g.uuid,
                    str(g.index),
                    f"{g.model} MIG {g.mig_profile}" if g.mig_profile else g.model,
                    gib(g.memory_total_bytes),
                    health(g.health),
                    repair(g),
                    g.lease or "-",
                    ",".join(r.code for r in g.health_reasons) or "-",
                ]
                for g in node.gpus
            ]
        ),
    )
    return EXIT_OK


def cmd_nodes_telemetry(c: Client, args: argparse.Namespace) -> int:
    """The node's latest report, a row per GPU (and MIG instance); --samples N: the last N
    reports' averages of engine activity, as a trend."""
    resp = c.node_telemetry(args.name, max_samples=args.samples)
    emit(args, resp, lambda: telemetry_rows(resp.latest, list(resp.recent)))
    return EXIT_OK


def _pct(sample: common_pb2.GpuSample | common_pb2.MigSample, name: str, scale: float = 100.0) -> str:
    if not sample.HasField(name):  # type: ignore[arg-type]
        return "-"
    v = float(getattr(sample, name)) * scale
    return f"{v:.0f}" if math.isfinite(v) else "-"


def _rate(sample: common_pb2.GpuSample, name: str) -> str:
    if not sample.HasField(name):  # type: ignore[arg-type]
        return "-"
    v = float(getattr(sample, name)) / 1e9
    return f"{v:.2f}" if math.isfinite(v) else "-"


def _trend(points: list[str]) -> str:
    return " ".join(points) if any(p != "-" for p in points) else "-"


def telemetry_rows(latest: common_pb2.NodeReport, recent: list[common_pb2.NodeReport]) -> list[list[str]]:
    """UTIL is NVML's utilization; ENGINE, TENSOR and DRAM the profiling shares (NVML GPM,
    Hopper and newer; "-" elsewhere); PCIE TX/RX in GB/s; TREND the engine share over the
    recent reports."""
    trend: dict[str, list[str]] = {}
    for report in recent:
        for g in report.gpus:
            trend.setdefault(g.uuid, []).append(_pct(g, "gr_engine_active"))
    rows = [
        [
            "GPU",
            "HEALTH",
            "UTIL%",
            "ENGINE%",
            "TENSOR%",
            "DRAM%",
            "PCIE TX/RX GB/s",
            "TEMP",
            "POWER W",
            "TREND",
        ]
    ]
    for g in latest.gpus:
        rows.append(
            [
                f"{g.index} {g.uuid}",
                health(g.health),
                _pct(g, "utilization_gpu_percent", 1.0),
                _pct(g, "gr_engine_active"),
                _pct(g, "tensor_active"),
                _pct(g, "dram_active"),
                f"{_rate(g, 'pcie_tx_bytes_per_second')}/{_rate(g, 'pcie_rx_bytes_per_second')}",
                f"{g.temperature_celsius}" if g.HasField("temperature_celsius") else "-",
                f"{g.power_watts:.0f}" if g.HasField("power_watts") and math.isfinite(g.power_watts) else "-",
                _trend(trend.get(g.uuid, [])[-8:]),
            ]
        )
        for m in g.mig_devices:
            rows.append(
                [
                    f"  {m.mig_profile} {m.uuid}",
                    "",
                    "-",
                    _pct(m, "gr_engine_active"),
                    _pct(m, "tensor_active"),
                    _pct(m, "dram_active"),
                    "-",
                    "",
                    "",
                    "",
                ]
            )
    return rows


def repair(g: common_pb2.Gpu) -> str:
    """The pending repair action ("-" when none), as the API names it without its prefix."""
    if g.HasField("repair") and g.repair.action > common_pb2.REPAIR_ACTION_RESTART_APP:
        return common_pb2.RepairAction.Name(g.repair.action).removeprefix("REPAIR_ACTION_")
    return "-"


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    offers = sub.add_parser("offers", help="free GPUs on offer").add_subparsers(dest="sub", required=True)
    s = offers.add_parser("search", parents=[common], help="search offers")
    add_filter_flags(s)
    s.add_argument("--count", type=int, default=0, help="only nodes with at least this many free GPUs")
    s.add_argument("--order-by", choices=["price", "distance", "free"], default="price")
    s.add_argument("--limit", type=int, default=None)
    add_window_flags(s)
    s.set_defaults(fn=cmd_offers_search)

    cap = sub.add_parser("capacity", parents=[common], help="totals by model x country x health")
    add_filter_flags(cap)
    add_window_flags(cap)
    cap.set_defaults(fn=cmd_capacity)

    pool = sub.add_parser("pool", help="your private pool").add_subparsers(dest="sub", required=True)
    pool.add_parser("list", parents=[common], help="the nodes of your private pool").set_defaults(
        fn=cmd_pool_list
    )
    pb = pool.add_parser(
        "burst", parents=[common], help="show or set how far a tenant bursts into the federation"
    )
    pb.add_argument("--tenant", required=True, help="your tenant name (an admin: any)")
    pb.add_argument(
        "--max-price", type=float, default=None, help="highest price per GPU-hour for federation GPUs"
    )
    pb.add_argument(
        "--country", type=country_codes, default=None, help="countries federation GPUs may be in: DE,FR"
    )
    pb.set_defaults(fn=cmd_pool_burst)
    nodes = sub.add_parser("nodes", help="provider nodes").add_subparsers(dest="sub", required=True)
    nl = nodes.add_parser("list", parents=[common])
    nl.add_argument("--provider", default="")
    nl.add_argument("--state", choices=["", "ready", "offline", "cordoned", "draining"], default="")
    nl.set_defaults(fn=cmd_nodes_list)
    ng = nodes.add_parser("get", parents=[common])
    ng.add_argument("name", help="providers/P/nodes/N")
    ng.set_defaults(fn=cmd_nodes_get)
    nt = nodes.add_parser("telemetry", parents=[common], help="a node's latest report per GPU")
    nt.add_argument("name", help="providers/P/nodes/N")
    nt.add_argument("--samples", type=int, default=8, help="recent reports for the trend (0..600; 8)")
    nt.set_defaults(fn=cmd_nodes_telemetry)
