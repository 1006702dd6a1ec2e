"""`gpufed admin`: operator commands (nodes, GPU repairs, revocation, usage, quotas, tokens)."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from gpufed.cli.common import EXIT_OK, EXIT_USAGE, Subparsers, when
from gpufed.cli.leases import lease_rows
from gpufed.cli.nodes import node_rows, repair
from gpufed.cli.output import emit, health, to_dict
from gpufed.client import Client
from gpufed.v1 import admin_pb2, common_pb2, lease_pb2


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
    emit(args, node, lambda: node_rows([node]))
    return EXIT_OK


def cmd_admin_gpu_healthy(c: Client, args: argparse.Namespace) -> int:
    node = c.set_gpu_healthy(args.node, args.uuid, args.reason)
    gpu = next((g for g in node.gpus if g.uuid == args.uuid), None)
    emit(
        args,
        node,
        lambda: (
            [["GPU", "HEALTH", "REPAIR", "CLEARED BY"]]
            + ([[gpu.uuid, health(gpu.health), repair(gpu), gpu.repair.cleared_by]] if gpu else [])
        ),
    )
    return EXIT_OK


def cmd_admin_revoke(c: Client, args: argparse.Namespace) -> int:
    lease = c.call(
        c.admin.RevokeLease, admin_pb2.RevokeLeaseRequest(name=args.name, reason=args.reason)
    ).lease
    emit(args, lease, lambda: lease_rows([lease]))
    return EXIT_OK


def cmd_admin_usage(c: Client, args: argparse.Namespace) -> int:
    since, until = when(args.since), when(args.until)
    if args.action == "export":
        return _export_usage(c, args, since, until)
    records = list(c.usage_records(args.provider, args.tenant, since, until))
    emit(
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
                out.write(json.dumps(to_dict(r), separators=(",", ":")) + "\n")
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
    "max_reserved_gpu_hours",
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
    emit(args, quota, lambda: _quota_rows(quota))
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

    emit(args, resp, rows)
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
        emit(args, resp, list)
    return EXIT_OK


def cmd_tokens_list(c: Client, args: argparse.Namespace) -> int:
    tokens = c.list_tokens()
    emit(
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


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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
