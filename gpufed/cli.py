"""`gpufed`: the command line for developers and operators.

Tables for people, `-o json` / `-o yaml` for scripts. Configuration from flags, then the
environment (GPUFED_ENDPOINT, GPUFED_TOKEN), then a config file (~/.config/gpufed/config.toml or
GPUFED_CONFIG) with `endpoint = "..."` and `token = "..."`.

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 no capacity, 5 not allowed
(unauthenticated or permission denied), 6 unavailable, 7 invalid argument.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from gpufed import __version__
from gpufed.client import Client, GpufedError
from gpufed.login import parse_ssh
from gpufed.settings import Settings, truthy
from gpufed.terminal import escaped
from gpufed.transport import channel_credentials
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2

(
    EXIT_OK,
    EXIT_ERROR,
    EXIT_USAGE,
    EXIT_NOT_FOUND,
    EXIT_NO_CAPACITY,
    EXIT_DENIED,
    EXIT_UNAVAILABLE,
    EXIT_INVALID,
) = range(8)
_EXIT_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_NO_CAPACITY,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
}


def _settings() -> Settings:
    path = os.environ.get("GPUFED_CONFIG", str(Path.home() / ".config" / "gpufed" / "config.toml"))
    return Settings.from_file(path, required=False)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _codes(value: str) -> list[str]:
    """Country codes as people type them ("de, fr"): the API takes exact upper-case codes."""
    return [v.upper() for v in _csv(value)]


def _labels(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"label {item!r} must be KEY=VALUE")
        out[k] = v
    return out


def _to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _emit(
    args: argparse.Namespace, data: Message | Sequence[Message], table: Callable[[], list[list[str]]]
) -> None:
    if args.output == "json":
        payload = _to_dict(data) if isinstance(data, Message) else [_to_dict(m) for m in data]
        print(json.dumps(payload, indent=2))
    elif args.output == "jsonl":
        for m in [data] if isinstance(data, Message) else data:
            print(json.dumps(_to_dict(m), separators=(",", ":")))
    elif args.output == "csv":
        rows = [[escaped(c) for c in r] for r in table()]
        writer = csv.writer(sys.stdout)
        writer.writerows(r for r in rows if any(r))
    elif args.output == "yaml":
        payload = _to_dict(data) if isinstance(data, Message) else [_to_dict(m) for m in data]
        print(yaml.safe_dump(payload, sort_keys=False).rstrip())
    else:
        # A row of empty cells separates tables (a lease, then its GPUs); each gets its own widths.
        blocks: list[list[list[str]]] = [[]]
        for r in ([escaped(c) for c in row] for row in table()):
            if any(r):
                blocks[-1].append(r)
            elif blocks[-1]:
                blocks.append([])
        for i, rows in enumerate(b for b in blocks if b):
            if i:
                print()
            width = max(len(r) for r in rows)
            widths = [max(len(r[j]) for r in rows if j < len(r)) for j in range(width)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def _health(h: int) -> str:
    return common_pb2.GpuHealth.Name(h).removeprefix("GPU_HEALTH_")  # type: ignore[arg-type]


def _gib(b: int) -> str:
    return f"{b / 1024**3:.0f}GiB"


def _add_filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters")
    g.add_argument("--model", default="", help='GPU model or family, e.g. "H100"')
    g.add_argument(
        "--pool",
        choices=["own-first", "own-only", "federation-only"],
        default="",
        help="with a private pool: your own nodes first (the default), only them, or only the federation's",
    )
    g.add_argument("--min-memory-gb", type=float, default=0, help="minimum memory per GPU, GiB")
    g.add_argument("--country", type=_codes, default=[], help="allowed countries, ISO codes: DE,FR")
    g.add_argument("--exclude-country", type=_codes, default=[], help="denied countries: US,CN")
    g.add_argument("--region", type=_csv, default=[], help="regions")
    g.add_argument("--provider", type=_csv, default=[], help="providers")
    g.add_argument("--near", default="", help="LAT,LON,RADIUS_KM")
    g.add_argument("--max-price", type=float, default=0.0, help="max price per GPU-hour")
    g.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    g.add_argument("--include-degraded", action="store_true")
    g.add_argument(
        "--mig-profile", default="", help="MIG instances of this profile (1g.10gb), not whole GPUs"
    )


def _filter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    near = None
    if args.near:
        parts = _csv(args.near)
        if len(parts) != 3:
            raise argparse.ArgumentTypeError("--near must be LAT,LON,RADIUS_KM")
        near = (float(parts[0]), float(parts[1]), float(parts[2]))
    return dict(
        gpu_model=args.model,
        min_gpu_memory_gb=args.min_memory_gb,
        countries=args.country,
        exclude_countries=args.exclude_country,
        regions=args.region,
        providers=args.provider,
        near=near,
        max_price=args.max_price,
        labels=_labels(args.label),
        include_degraded=args.include_degraded,
        mig_profile=args.mig_profile,
    )


# -- commands ------------------------------------------------------------------------------------


def cmd_offers_search(c: Client, args: argparse.Namespace) -> int:
    order = {"price": 1, "distance": 2, "free": 3}[args.order_by]
    found = list(
        c.search_offers(
            min_free_gpus=args.count, order_by=order, limit=args.limit, pool=args.pool, **_filter_kwargs(args)
        )
    )
    _emit(
        args,
        found,
        lambda: (
            [["NODE", "MODEL", "MEM", "FREE", "PRICE/GPU-H", "COUNTRY", "REGION", "DIST_KM", "POOL"]]
            + [
                [
                    o.node,
                    f"{o.gpu_model} MIG {o.mig_profile}" if o.mig_profile else o.gpu_model,
                    _gib(o.gpu_memory_bytes),
                    str(o.free_gpus),
                    f"{o.price_per_gpu_hour:.2f} {o.currency_code}",
                    o.location.country_code,
                    o.location.region,
                    f"{o.distance_km:.0f}" if o.HasField("distance_km") else "-",
                    "own" if o.pool == common_pb2.POOL_KIND_OWN else "federation",
                ]
                for o in found
            ]
        ),
    )
    return EXIT_OK


def cmd_capacity(c: Client, args: argparse.Namespace) -> int:
    resp = c.summarize_capacity(**_filter_kwargs(args))
    _emit(
        args,
        resp,
        lambda: (
            [["MODEL", "COUNTRY", "HEALTH", "TOTAL", "FREE"]]
            + [
                [b.gpu_model, b.country_code, _health(b.health), str(b.total_gpus), str(b.free_gpus)]
                for b in resp.buckets
            ]
            + [["TOTAL", "", "", str(resp.total_gpus), str(resp.free_gpus)]]
        ),
    )
    return EXIT_OK


def _node_rows(nodes: Sequence[common_pb2.Node]) -> list[list[str]]:
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
    _emit(args, nodes, lambda: _node_rows(nodes))
    return EXIT_OK


def cmd_pool_list(c: Client, args: argparse.Namespace) -> int:
    """The caller's private pool (an admin: every pool), as `nodes list` shows nodes."""
    nodes = [n for n in c.list_nodes() if n.pool_tenant]
    _emit(args, nodes, lambda: _node_rows(nodes))
    return EXIT_OK


def cmd_pool_burst(c: Client, args: argparse.Namespace) -> int:
    """Show a tenant's burst policy, or set it with --max-price / --country (0 and none: no limit)."""
    if args.max_price is None and args.country is None:
        policy = c.get_burst_policy(args.tenant)
    else:
        policy = c.set_burst_policy(args.tenant, args.max_price or 0.0, args.country or [])
    _emit(
        args,
        policy,
        lambda: [
            ["POLICY", "MAX PRICE/GPU-H", "COUNTRIES"],
            [policy.name, f"{policy.max_price_per_gpu_hour:g}" or "-", ",".join(policy.countries) or "any"],
        ],
    )
    return EXIT_OK


def cmd_version(c: Client, args: argparse.Namespace) -> int:
    """This CLI's release and the replica's (as kubectl version does)."""
    print(f"client: {__version__}")
    server = c.server_version()
    print(f"server: {escaped(server) if server else 'before 0.2.0 (it does not say)'}")
    return EXIT_OK


def cmd_nodes_get(c: Client, args: argparse.Namespace) -> int:
    node = c.get_node(args.name)
    _emit(
        args,
        node,
        lambda: (
            _node_rows([node])
            + [[""], ["GPU", "INDEX", "MODEL", "MEM", "HEALTH", "REPAIR", "LEASE", "REASONS"]]
            + [
                [
                    g.uuid,
                    str(g.index),
                    f"{g.model} MIG {g.mig_profile}" if g.mig_profile else g.model,
                    _gib(g.memory_total_bytes),
                    _health(g.health),
                    _repair(g),
                    g.lease or "-",
                    ",".join(r.code for r in g.health_reasons) or "-",
                ]
                for g in node.gpus
            ]
        ),
    )
    return EXIT_OK


def _lease_rows(leases: Sequence[lease_pb2.Lease]) -> list[list[str]]:
    rows = [["LEASE", "STATE", "GPUS", "NODES", "PRICE/H", "EXPIRES/ENDED"]]
    for lease in leases:
        active = lease.state != lease_pb2.LEASE_STATE_ENDED
        when = (
            lease.expire_time.ToJsonString()
            if active
            else (
                lease.end_time.ToJsonString()
                + " "
                + lease_pb2.LeaseEndReason.Name(lease.end_reason).removeprefix("LEASE_END_REASON_")
            )
        )
        rows.append(
            [
                lease.name,
                lease_pb2.LeaseState.Name(lease.state).removeprefix("LEASE_STATE_"),
                str(len(lease.gpus)),
                ",".join(sorted({g.node for g in lease.gpus})),
                f"{lease.price_per_hour:.2f} {lease.currency_code}",
                when,
            ]
        )
    return rows


def _access_rows(lease: lease_pb2.Lease) -> list[list[str]]:
    rows = [["NODE", "SSH", "ENDPOINT", "INSTRUCTIONS"]]
    for d in lease.access_details:
        rows.append([d.node, d.ssh or "-", d.endpoint or "-", " ".join(d.instructions.split()) or "-"])
    return rows if len(rows) > 1 else []


def _private_key(path: str) -> str:
    """The private half of a --ssh-key (given as either half), "" when not beside it."""
    p = Path(path).expanduser()
    private = p.with_suffix("") if p.suffix == ".pub" else p
    return str(private) if private.exists() else ""


def _login_lines(lease: lease_pb2.Lease, key: str) -> list[str]:
    """How to log in to each node of the lease, as `gpufed lease ssh` would run it."""
    lines = []
    for d in lease.access_details:
        if not d.ssh:
            continue
        try:
            argv = parse_ssh(d.ssh).argv(key)
        except ValueError as e:
            lines.append(escaped(f"{d.node}: no login command ({e})"))
            continue
        lines.append(shlex.join(argv))
    return lines


def cmd_lease_ssh(c: Client, args: argparse.Namespace) -> int:
    lease = c.get_lease(args.name)
    details = [d for d in lease.access_details if d.ssh]
    if args.node:
        details = [d for d in details if d.node == args.node or d.node.rsplit("/", 1)[-1] == args.node]
    if not details:
        state = lease_pb2.LeaseState.Name(lease.state).removeprefix("LEASE_STATE_")
        raise ValueError(f"{lease.name} ({state}) has no ssh access{' on ' + args.node if args.node else ''}")
    if len(details) > 1:
        nodes = ", ".join(d.node for d in details)
        raise ValueError(f"{lease.name} spans several nodes: pick one with --node ({nodes})")
    key = _private_key(args.key) if args.key else ""
    if args.key and not key:
        raise ValueError(f"no private key at {args.key}")
    argv = parse_ssh(details[0].ssh).argv(key, args.ssh_option, args.command)
    if args.print:
        print(shlex.join(argv))
        return EXIT_OK
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # the terminal is ssh's from here on


def _ssh_keys(paths: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for path in paths:
        p = Path(path).expanduser()
        if p.suffix != ".pub" and p.with_suffix(p.suffix + ".pub").exists():
            p = p.with_suffix(p.suffix + ".pub")  # --ssh-key ~/.ssh/id_ed25519 means its public half
        keys.extend(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    return keys


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """Whole seconds from "90", "90s", "30m", "2h" or "1d"."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], 0)
    number = t[:-1] if unit else t
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 2h")
    return int(number) * (unit or 1)


def _clock(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _waited(lease: lease_pb2.Lease, now: float) -> str:
    """One line of a queued lease's progress: position, time waited, time left."""
    waited = now - lease.create_time.seconds
    left = lease.wait_expire_time.seconds - now
    return (
        f"{lease.name} queued: position {lease.queue_position}, waited {_clock(waited)},"
        f" gives up in {_clock(left)}"
    )


def _wait_in_queue(c: Client, lease: lease_pb2.Lease) -> lease_pb2.Lease:
    """Follow a QUEUED lease until it is granted (the granted record) or ends (ValueError).
    On a terminal one live line, redrawn every second; otherwise a line per move of the
    position. Ctrl-C cancels the request."""
    tty = sys.stderr.isatty()
    W = lease_pb2.WatchLeaseResponse
    latest = [lease]
    done = threading.Event()

    def draw() -> None:
        while not done.wait(1.0):
            print(f"\r\x1b[K{escaped(_waited(latest[0], time.time()))}", end="", file=sys.stderr, flush=True)

    ticker = threading.Thread(target=draw, daemon=True) if tty else None
    if ticker is not None:
        ticker.start()
    try:
        for ev in c.watch_lease(lease.name):
            if ev.type == W.EVENT_TYPE_QUEUED:
                latest[0] = ev.lease
                line = escaped(_waited(ev.lease, time.time()))
                if tty:
                    print(f"\r\x1b[K{line}", end="", file=sys.stderr, flush=True)
                else:
                    print(line, file=sys.stderr, flush=True)
                continue
            if ev.type not in (W.EVENT_TYPE_GRANTED, W.EVENT_TYPE_ENDED):
                continue
            done.set()
            if tty:
                print(file=sys.stderr)
            if ev.type == W.EVENT_TYPE_GRANTED:
                return ev.lease
            reason = lease_pb2.LeaseEndReason.Name(ev.lease.end_reason).removeprefix("LEASE_END_REASON_")
            raise ValueError(f"{lease.name} ended while queued ({reason}): no GPUs were granted")
    except KeyboardInterrupt:
        done.set()
        c.release_lease(lease.name)
        print(f"\ncancelled {lease.name}", file=sys.stderr)
        raise
    finally:
        done.set()
    raise ValueError(f"{lease.name}: the watch ended before a grant")


def cmd_lease_create(c: Client, args: argparse.Namespace) -> int:
    options = {}
    for item in args.option:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"gpufed: --option {item!r} must be KEY=VALUE")
        options[k] = v
    lease = c.create_lease(
        args.count,
        ttl_s=args.ttl,
        spread=args.spread,
        request_id=args.request_id or None,
        ssh_keys=_ssh_keys(args.ssh_key),
        provider_options=options,
        pool=args.pool,
        allow_mixed=args.allow_mixed,
        max_wait_s=args.wait or 0,
        **_filter_kwargs(args),
    )
    if lease.state == lease_pb2.LEASE_STATE_QUEUED:
        lease = _wait_in_queue(c, lease)
    if args.wait is not None and lease.state == lease_pb2.LEASE_STATE_PROVISIONING:
        print(f"{lease.name} granted; waiting for the provider to set up access", file=sys.stderr)
        lease = c.wait_active(lease.name, args.wait_timeout)
    _emit(
        args,
        lease,
        lambda: _lease_rows([lease]) + ([[""], *_access_rows(lease)] if _access_rows(lease) else []),
    )
    if args.wait is not None and args.output == "table":
        key = next((k for k in map(_private_key, args.ssh_key) if k), "")
        for line in _login_lines(lease, key):
            print(f"login: {line}")
        if any(d.ssh for d in lease.access_details):
            print(f"or:    gpufed lease ssh {lease.name}" + (f" --key {key}" if key else ""))
    if args.hold:
        from gpufed.client import HeldLease

        held = HeldLease(c, lease)
        stop = {"flag": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
        print(f"holding {lease.name}; Ctrl-C releases it", file=sys.stderr)
        with held:
            try:
                while not stop["flag"] and held.error is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        print(f"released {lease.name}", file=sys.stderr)
        if held.error is not None:
            print(f"error: lease lost: {held.error}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK


def cmd_lease_get(c: Client, args: argparse.Namespace) -> int:
    lease = c.get_lease(args.name)
    _emit(
        args,
        lease,
        lambda: (
            _lease_rows([lease])
            + ([[""], *_access_rows(lease)] if _access_rows(lease) else [])
            + [[""], ["GPU", "NODE", "MODEL", "INDEX", "COUNTRY", "PRICE/H"]]
            + [
                [
                    g.uuid,
                    g.node,
                    g.model,
                    str(g.index),
                    g.location.country_code,
                    f"{g.price_per_gpu_hour:.2f}",
                ]
                for g in lease.gpus
            ]
        ),
    )
    return EXIT_OK


def cmd_lease_list(c: Client, args: argparse.Namespace) -> int:
    state = {
        "": 0,
        "active": lease_pb2.LEASE_STATE_ACTIVE,
        "provisioning": lease_pb2.LEASE_STATE_PROVISIONING,
        "ended": lease_pb2.LEASE_STATE_ENDED,
    }[args.state]
    leases = c.list_leases(state)
    _emit(args, leases, lambda: _lease_rows(leases))
    return EXIT_OK


def cmd_lease_renew(c: Client, args: argparse.Namespace) -> int:
    lease = c.renew_lease(args.name)
    _emit(args, lease, lambda: _lease_rows([lease]))
    return EXIT_OK


def cmd_lease_release(c: Client, args: argparse.Namespace) -> int:
    lease = c.release_lease(args.name)
    _emit(args, lease, lambda: _lease_rows([lease]))
    return EXIT_OK


def cmd_lease_watch(c: Client, args: argparse.Namespace) -> int:
    for ev in c.watch_lease(args.name):
        if args.output == "table":
            kind = lease_pb2.WatchLeaseResponse.EventType.Name(ev.type).removeprefix("EVENT_TYPE_")
            line = f"{ev.event_time.ToJsonString()}  {kind:<13} {ev.gpu_uuid or ev.node} {ev.message}"
            print(
                escaped(line.rstrip()),
                flush=True,
            )
        else:
            print(json.dumps(_to_dict(ev)), flush=True)
    return EXIT_OK


def cmd_admin_node(c: Client, args: argparse.Namespace) -> int:
    if args.action == "cordon":
        node = c.call(
            c.admin.CordonNode, admin_pb2.CordonNodeRequest(name=args.name, reason=args.reason)
        ).node
    elif args.action == "uncordon":
        node = c.call(c.admin.UncordonNode, admin_pb2.UncordonNodeRequest(name=args.name)).node
    else:
        req = admin_pb2.DrainNodeRequest(
            name=args.name, reason=args.reason, grace=duration_pb2.Duration(seconds=args.grace)
        )
        node = c.call(c.admin.DrainNode, req).node
    _emit(args, node, lambda: _node_rows([node]))
    return EXIT_OK


def _repair(g: common_pb2.Gpu) -> str:
    """The pending repair action ("-" when none), as the API names it without its prefix."""
    if g.HasField("repair") and g.repair.action > common_pb2.REPAIR_ACTION_RESTART_APP:
        return common_pb2.RepairAction.Name(g.repair.action).removeprefix("REPAIR_ACTION_")
    return "-"


def cmd_admin_gpu_healthy(c: Client, args: argparse.Namespace) -> int:
    node = c.set_gpu_healthy(args.node, args.uuid, args.reason)
    gpu = next((g for g in node.gpus if g.uuid == args.uuid), None)
    _emit(
        args,
        node,
        lambda: (
            [["GPU", "HEALTH", "REPAIR", "CLEARED BY"]]
            + ([[gpu.uuid, _health(gpu.health), _repair(gpu), gpu.repair.cleared_by]] if gpu else [])
        ),
    )
    return EXIT_OK


def cmd_admin_revoke(c: Client, args: argparse.Namespace) -> int:
    lease = c.call(
        c.admin.RevokeLease, admin_pb2.RevokeLeaseRequest(name=args.name, reason=args.reason)
    ).lease
    _emit(args, lease, lambda: _lease_rows([lease]))
    return EXIT_OK


def _when(text: str) -> timestamp_pb2.Timestamp | None:
    """RFC 3339 (2026-09-01T00:00:00Z) or a date (2026-09-01, midnight UTC)."""
    if not text:
        return None
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromJsonString(text if "T" in text else f"{text}T00:00:00Z")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date or an RFC 3339 time") from e
    return ts


def cmd_admin_usage(c: Client, args: argparse.Namespace) -> int:
    since, until = _when(args.since), _when(args.until)
    if args.action == "export":
        return _export_usage(c, args, since, until)
    records = list(c.usage_records(args.provider, args.tenant, since, until))
    _emit(
        args,
        records,
        lambda: (
            [["RECORD", "PROVIDER", "TENANT", "GPUS", "GPU-SECONDS", "COST", "END", "REASON"]]
            + [
                [
                    r.name,
                    r.provider,
                    r.tenant,
                    str(len(r.gpus)),
                    f"{r.gpu_seconds:.0f}",
                    f"{r.quoted_cost:.4f} {r.currency_code}",
                    r.end_time.ToJsonString(),
                    lease_pb2.LeaseEndReason.Name(r.end_reason).removeprefix("LEASE_END_REASON_"),
                ]
                for r in records
            ]
        ),
    )
    return EXIT_OK


EXPORT_COLUMNS = [
    "name", "lease", "provider", "tenant", "gpus", "start_time", "end_time", "gpu_seconds",
    "quoted_cost", "currency_code", "end_reason", "pool",
]  # fmt: skip


def _export_usage(
    c: Client,
    args: argparse.Namespace,
    since: timestamp_pb2.Timestamp | None,
    until: timestamp_pb2.Timestamp | None,
) -> int:
    """Every record of the window, streamed page by page (never all in memory): JSON lines (the
    records as the API writes them) or CSV with one row per record."""
    out = open(args.file, "w", newline="") if args.file else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out) if args.output == "csv" else None
        if writer is not None:
            writer.writerow(EXPORT_COLUMNS)
        n = 0
        for r in c.usage_records(args.provider, args.tenant, since, until):
            n += 1
            if writer is None:
                out.write(json.dumps(_to_dict(r), separators=(",", ":")) + "\n")
                continue
            writer.writerow(
                [
                    r.name, r.lease, r.provider, r.tenant, " ".join(g.uuid for g in r.gpus),
                    r.start_time.ToJsonString(), r.end_time.ToJsonString(), f"{r.gpu_seconds:g}",
                    f"{r.quoted_cost:.6f}", r.currency_code,
                    lease_pb2.LeaseEndReason.Name(r.end_reason).removeprefix("LEASE_END_REASON_"),
                    common_pb2.PoolKind.Name(r.pool).removeprefix("POOL_KIND_"),
                ]
            )  # fmt: skip
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {n} usage records", file=sys.stderr)
    return EXIT_OK


_TENANT_LIMITS = (
    *("max_gpus", "max_leases", "create_leases_per_second", "create_leases_burst", "max_streams"),
    "max_queued",
)
_PROVIDER_LIMITS = (
    "max_nodes",
    "max_gpus_per_node",
    "reports_per_second",
    "report_burst",
    "connects_per_minute",
)


def _quota_name(args: argparse.Namespace) -> str:
    return f"quotas/tenants/{args.tenant}" if args.tenant else f"quotas/providers/{args.provider}"


def _quota_rows(quota: admin_pb2.Quota) -> list[list[str]]:
    part: Message = quota.tenant if quota.HasField("tenant") else quota.provider
    return [["LIMIT", "VALUE"]] + [[f.name, f"{v:g}"] for f, v in part.ListFields()]


def cmd_quota_set(c: Client, args: argparse.Namespace) -> int:
    names = _TENANT_LIMITS if args.tenant else _PROVIDER_LIMITS
    limits = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    other = [n for n in (_PROVIDER_LIMITS if args.tenant else _TENANT_LIMITS) if getattr(args, n) is not None]
    if other:
        print(f"gpufed: --{other[0].replace('_', '-')} is not a limit of this kind of quota", file=sys.stderr)
        return EXIT_USAGE
    quota = c.set_quota(_quota_name(args), **limits)
    _emit(args, quota, lambda: _quota_rows(quota))
    return EXIT_OK


def cmd_quota_get(c: Client, args: argparse.Namespace) -> int:
    resp = c.get_quota(_quota_name(args))

    def rows() -> list[list[str]]:
        use = (
            [["in use: active_leases", str(resp.active_leases)], ["in use: held_gpus", str(resp.held_gpus)]]
            if resp.quota.HasField("tenant")
            else [["in use: nodes", str(resp.nodes)]]
        )
        return _quota_rows(resp.quota) + use

    _emit(args, resp, rows)
    return EXIT_OK


def cmd_tokens_create(c: Client, args: argparse.Namespace) -> int:
    resp = c.create_token(args.kind, args.name, args.private_to)
    if args.output == "table":
        print(
            f"created {resp.token.name} ({args.kind} {resp.token.principal}); the secret is shown once:",
            file=sys.stderr,
        )
        print(resp.secret)
    else:
        _emit(args, resp, list)
    return EXIT_OK


def cmd_tokens_list(c: Client, args: argparse.Namespace) -> int:
    tokens = c.list_tokens()
    _emit(
        args,
        tokens,
        lambda: (
            [["TOKEN", "KIND", "PRINCIPAL", "PRIVATE TO", "CREATED"]]
            + [
                [
                    t.name,
                    admin_pb2.TokenKind.Name(t.kind).removeprefix("TOKEN_KIND_").lower(),
                    t.principal,
                    t.private_to or "-",
                    t.create_time.ToJsonString(),
                ]
                for t in tokens
            ]
        ),
    )
    return EXIT_OK


def cmd_tokens_delete(c: Client, args: argparse.Namespace) -> int:
    c.call(c.admin.DeleteToken, admin_pb2.DeleteTokenRequest(name=args.name), retry=False)
    print(f"deleted {args.name}", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    def connection_flags(suppress: bool) -> argparse.ArgumentParser:
        # The same flags before or after the subcommand; after it they must not reset what was
        # given before it, so there they default to "not given".
        def d(value: object) -> object:
            return argparse.SUPPRESS if suppress else value

        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--endpoint", default=d(None), help="control plane HOST:PORT (GPUFED_ENDPOINT)")
        parser.add_argument("--token", default=d(None), help="bearer token (GPUFED_TOKEN)")
        parser.add_argument(
            "--tls", action="store_true", default=d(False), help="use TLS with the system roots"
        )
        parser.add_argument(
            "--ca-cert", default=d(None), help="PEM of the CA that signed the server certificate"
        )
        parser.add_argument(
            "--insecure",
            action="store_true",
            default=d(None),
            help="plaintext, for a replica on loopback (GPUFED_INSECURE=1); TLS otherwise",
        )
        parser.add_argument("--timeout", type=float, default=d(10.0), help="per-call deadline, seconds")
        parser.add_argument(
            "-o",
            "--output",
            choices=["table", "json", "yaml", "jsonl", "csv"],
            default=d("table"),
            help="jsonl and csv: one line per record (lists; `admin usage export`)",
        )
        return parser

    common = connection_flags(suppress=True)
    p = argparse.ArgumentParser(
        prog="gpufed",
        description="Find and lease GPUs across the gpufed federation.",
        parents=[connection_flags(suppress=False)],
    )
    p.add_argument("--version", action="version", version=f"gpufed {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("version", parents=[common], help="this CLI's release and the replica's").set_defaults(
        fn=cmd_version
    )

    offers = sub.add_parser("offers", help="free GPUs on offer").add_subparsers(dest="sub", required=True)
    s = offers.add_parser("search", parents=[common], help="search offers")
    _add_filter_flags(s)
    s.add_argument("--count", type=int, default=0, help="only nodes with at least this many free GPUs")
    s.add_argument("--order-by", choices=["price", "distance", "free"], default="price")
    s.add_argument("--limit", type=int, default=None)
    s.set_defaults(fn=cmd_offers_search)

    cap = sub.add_parser("capacity", parents=[common], help="totals by model x country x health")
    _add_filter_flags(cap)
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
    pb.add_argument("--country", type=_codes, default=None, help="countries federation GPUs may be in: DE,FR")
    pb.set_defaults(fn=cmd_pool_burst)
    nodes = sub.add_parser("nodes", help="provider nodes").add_subparsers(dest="sub", required=True)
    nl = nodes.add_parser("list", parents=[common])
    nl.add_argument("--provider", default="")
    nl.add_argument("--state", choices=["", "ready", "offline", "cordoned", "draining"], default="")
    nl.set_defaults(fn=cmd_nodes_list)
    ng = nodes.add_parser("get", parents=[common])
    ng.add_argument("name", help="providers/P/nodes/N")
    ng.set_defaults(fn=cmd_nodes_get)

    lease = sub.add_parser("lease", help="reserve GPUs").add_subparsers(dest="sub", required=True)
    lc = lease.add_parser("create", parents=[common])
    _add_filter_flags(lc)
    lc.add_argument("--count", type=int, required=True, help="number of GPUs")
    lc.add_argument("--ttl", type=int, default=60, help="seconds; renew before it runs out")
    lc.add_argument("--spread", action="store_true", help="allow several nodes (fewest first)")
    lc.add_argument(
        "--allow-mixed", action="store_true", help="with --spread: own-pool and federation GPUs in one lease"
    )
    lc.add_argument("--request-id", default="", help="idempotency key (default: random)")
    lc.add_argument("--hold", action="store_true", help="keep the lease alive until Ctrl-C, then release it")
    lc.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        metavar="FILE",
        help="OpenSSH public key file for the provider to install (repeatable), e.g. ~/.ssh/id_ed25519.pub",
    )
    lc.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="provider option (repeatable)"
    )
    lc.add_argument(
        "--wait",
        nargs="?",
        const=0,
        type=duration_s,
        metavar="MAX_WAIT",
        help="wait until the lease is ACTIVE and print how to reach it; with MAX_WAIT (e.g. 30m),"
        " a request the federation cannot serve now waits in the queue for up to that long",
    )
    lc.add_argument("--wait-timeout", type=float, default=300, help="seconds --wait waits (default 300)")
    lc.set_defaults(fn=cmd_lease_create)
    for verb, fn in (
        ("get", cmd_lease_get),
        ("renew", cmd_lease_renew),
        ("release", cmd_lease_release),
        ("watch", cmd_lease_watch),
    ):
        lp = lease.add_parser(verb, parents=[common])
        lp.add_argument("name", help="leases/ID")
        lp.set_defaults(fn=fn)
    ls = lease.add_parser(
        "ssh", parents=[common], help="log in to a lease's node with ssh (its provider's login, checked)"
    )
    ls.add_argument("name", help="leases/ID")
    ls.add_argument("--key", "-i", default="", metavar="FILE", help="private key (default: ssh's own)")
    ls.add_argument("--node", default="", help="the node to log in to, when the lease spans several")
    ls.add_argument(
        "--ssh-option", action="append", default=[], metavar="OPTION", help="ssh -o option (repeatable)"
    )
    ls.add_argument("--print", action="store_true", help="print the ssh command instead of running it")
    ls.set_defaults(fn=cmd_lease_ssh, remote=True)  # a remote command may follow --
    ll = lease.add_parser("list", parents=[common])
    ll.add_argument("--state", choices=["", "active", "provisioning", "ended"], default="")
    ll.set_defaults(fn=cmd_lease_list)

    admin = sub.add_parser("admin", help="operator commands").add_subparsers(dest="sub", required=True)
    for action in ("cordon", "uncordon", "drain"):
        ap = admin.add_parser(action, parents=[common])
        ap.add_argument("name", help="providers/P/nodes/N")
        ap.add_argument("--reason", default="")
        if action == "drain":
            ap.add_argument("--grace", type=int, default=0, help="seconds before its leases end")
        ap.set_defaults(fn=cmd_admin_node, action=action)
    gpus = admin.add_parser("gpus", help="GPU repairs").add_subparsers(dest="action", required=True)
    gh = gpus.add_parser(
        "set-healthy", parents=[common], help="clear a GPU's repair after inspection (audited)"
    )
    gh.add_argument("node", help="providers/P/nodes/N")
    gh.add_argument("uuid", help="the GPU's uuid (GPU-...)")
    gh.add_argument("--reason", required=True, help="what was done, for the audit log")
    gh.set_defaults(fn=cmd_admin_gpu_healthy)
    rv = admin.add_parser("revoke", parents=[common])
    rv.add_argument("name", help="leases/ID")
    rv.add_argument("--reason", default="")
    rv.set_defaults(fn=cmd_admin_revoke)
    us = admin.add_parser(
        "usage", parents=[common], help="usage records; `export` streams them (-o jsonl or csv)"
    )
    us.add_argument("action", nargs="?", choices=["list", "export"], default="list")
    us.add_argument("--provider", default="")
    us.add_argument("--tenant", default="")
    us.add_argument("--since", default="", help="records ending at or after (2026-09-01 or RFC 3339)")
    us.add_argument("--until", default="", help="records ending before")
    us.add_argument("--file", default="", help="export: write here instead of stdout")
    us.set_defaults(fn=cmd_admin_usage)
    quota = admin.add_parser("quota", help="tenant and provider quotas").add_subparsers(
        dest="action", required=True
    )
    for action, fn in (("set", cmd_quota_set), ("get", cmd_quota_get)):
        qp = quota.add_parser(action, parents=[common])
        who = qp.add_mutually_exclusive_group(required=True)
        who.add_argument("--tenant", help="the tenant whose quota")
        who.add_argument("--provider", help="the provider whose quota")
        if action == "set":
            for name in _TENANT_LIMITS + _PROVIDER_LIMITS:
                kind = float if name.endswith("per_second") else int
                qp.add_argument(f"--{name.replace('_', '-')}", type=kind, help="unset: the default")
        qp.set_defaults(fn=fn)
    tokens = admin.add_parser("tokens", help="access tokens").add_subparsers(dest="action", required=True)
    tc = tokens.add_parser("create", parents=[common])
    tc.add_argument("--kind", choices=["tenant", "provider", "admin"], required=True)
    tc.add_argument("--name", required=True, help="tenant, provider or operator name")
    tc.add_argument(
        "--private-to",
        default="",
        metavar="TENANT",
        help="provider tokens: the nodes it registers are this tenant's private pool",
    )
    tc.set_defaults(fn=cmd_tokens_create)
    tokens.add_parser("list", parents=[common]).set_defaults(fn=cmd_tokens_list)
    td = tokens.add_parser("delete", parents=[common])
    td.add_argument("name", help="tokens/ID")
    td.set_defaults(fn=cmd_tokens_delete)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    remote: list[str] = []
    if "--" in words:  # `gpufed lease ssh NAME [flags] -- COMMAND...`: the rest is ssh's
        at = words.index("--")
        words, remote = words[:at], words[at + 1 :]
    args = parser.parse_args(words)
    if remote and not getattr(args, "remote", False):
        parser.error("only `lease ssh` takes a command after --")
    args.command = remote
    cfg = _settings()
    endpoint = cfg.get(args.endpoint, "GPUFED_ENDPOINT", "endpoint", "127.0.0.1:50051")
    token = cfg.get(args.token, "GPUFED_TOKEN", "token", "")
    insecure = cfg.get(args.insecure, "GPUFED_INSECURE", "insecure", False, truthy)
    try:
        ca = Path(args.ca_cert).read_bytes() if args.ca_cert else None
        creds = channel_credentials(ca_cert=ca, tls=args.tls, insecure=insecure, endpoints=endpoint)
        with Client(endpoint, token, timeout=args.timeout, credentials=creds, insecure=insecure) as client:
            code: int = args.fn(client, args)
            return code
    except GpufedError as e:
        print(
            escaped(f"error: {e.code.name}{' ' + e.reason if e.reason else ''}: {e.message}"), file=sys.stderr
        )
        if e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "NO_MATCHING_CAPACITY":
            return EXIT_NO_CAPACITY
        return _EXIT_BY_CODE.get(e.code, EXIT_ERROR)
    except (argparse.ArgumentTypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
