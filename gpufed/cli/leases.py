"""`gpufed lease`: create (now, or waiting in the queue), follow, renew, release, log in."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gpufed.cli.common import EXIT_ERROR, EXIT_OK, Subparsers, add_filter_flags, duration_s, filter_kwargs
from gpufed.cli.output import emit, to_dict
from gpufed.client import Client
from gpufed.login import parse_ssh
from gpufed.terminal import escaped
from gpufed.v1 import lease_pb2


def lease_rows(leases: Sequence[lease_pb2.Lease]) -> list[list[str]]:
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


def access_rows(lease: lease_pb2.Lease) -> list[list[str]]:
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


def ssh_keys(paths: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for path in paths:
        p = Path(path).expanduser()
        if p.suffix != ".pub" and p.with_suffix(p.suffix + ".pub").exists():
            p = p.with_suffix(p.suffix + ".pub")  # --ssh-key ~/.ssh/id_ed25519 means its public half
        keys.extend(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    return keys


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
        ssh_keys=ssh_keys(args.ssh_key),
        provider_options=options,
        pool=args.pool,
        allow_mixed=args.allow_mixed,
        max_wait_s=args.wait or 0,
        interruptible=args.interruptible,
        **filter_kwargs(args),
    )
    if lease.state == lease_pb2.LEASE_STATE_QUEUED:
        lease = _wait_in_queue(c, lease)
    if args.wait is not None and lease.state == lease_pb2.LEASE_STATE_PROVISIONING:
        print(f"{lease.name} granted; waiting for the provider to set up access", file=sys.stderr)
        lease = c.wait_active(lease.name, args.wait_timeout)
    emit(
        args,
        lease,
        lambda: lease_rows([lease]) + ([[""], *access_rows(lease)] if access_rows(lease) else []),
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
    emit(
        args,
        lease,
        lambda: (
            lease_rows([lease])
            + ([[""], *access_rows(lease)] if access_rows(lease) else [])
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
    emit(args, leases, lambda: lease_rows(leases))
    return EXIT_OK


def cmd_lease_renew(c: Client, args: argparse.Namespace) -> int:
    lease = c.renew_lease(args.name)
    emit(args, lease, lambda: lease_rows([lease]))
    return EXIT_OK


def cmd_lease_release(c: Client, args: argparse.Namespace) -> int:
    lease = c.release_lease(args.name)
    emit(args, lease, lambda: lease_rows([lease]))
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
            print(json.dumps(to_dict(ev)), flush=True)
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    lease = sub.add_parser("lease", help="reserve GPUs").add_subparsers(dest="sub", required=True)
    lc = lease.add_parser("create", parents=[common])
    add_filter_flags(lc)
    lc.add_argument("--count", type=int, required=True, help="number of GPUs")
    lc.add_argument("--ttl", type=int, default=60, help="seconds; renew before it runs out")
    lc.add_argument("--spread", action="store_true", help="allow several nodes (fewest first)")
    lc.add_argument(
        "--allow-mixed", action="store_true", help="with --spread: own-pool and federation GPUs in one lease"
    )
    lc.add_argument(
        "--interruptible",
        action="store_true",
        help="interruptible capacity: cheaper, preempted with notice (see docs/api.md)",
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
