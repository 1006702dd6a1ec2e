"""`gpufed reservation`: book GPUs for a future window, list (or draw) the calendar, cancel."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import string
from collections.abc import Sequence
from typing import Any

from gpufed.cli.common import EXIT_OK, Subparsers, add_filter_flags, duration_s, filter_kwargs
from gpufed.cli.leases import ssh_keys
from gpufed.cli.output import emit, to_dict
from gpufed.client import Client
from gpufed.terminal import escaped
from gpufed.v1 import reservation_pb2

R = reservation_pb2
_STATES = {
    "": 0,
    "scheduled": R.RESERVATION_STATE_SCHEDULED,
    "at-risk": R.RESERVATION_STATE_AT_RISK,
    "active": R.RESERVATION_STATE_ACTIVE,
    "ended": R.RESERVATION_STATE_ENDED,
}
# Columns of the text calendar's time axis.
CALENDAR_WIDTH = 60


def when(text: str) -> float:
    """Seconds since the epoch from RFC 3339 ("2026-12-15T09:00Z"; no zone means UTC), "now",
    or "+DURATION" from now ("+2h")."""
    t = text.strip()
    if t == "now":
        return dt.datetime.now(dt.UTC).timestamp()
    if t.startswith("+"):
        return dt.datetime.now(dt.UTC).timestamp() + duration_s(t[1:])
    try:
        parsed = dt.datetime.fromisoformat(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time such as 2026-12-15T09:00Z or +2h") from e
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def add_window_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--at", type=when, default=None, help="window start: 2026-12-15T09:00Z, +2h or now")
    p.add_argument(
        "--for", dest="for_s", type=duration_s, default=None, required=required, help="window length: 72h, 3d"
    )


def window_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.for_s is None:
        if args.at is not None:
            raise argparse.ArgumentTypeError("--at needs --for")
        return {}
    return {"available_from": args.at, "available_for_s": args.for_s}


def _state(r: reservation_pb2.Reservation) -> str:
    return R.ReservationState.Name(r.state).removeprefix("RESERVATION_STATE_")


def _short(ts_seconds: int) -> str:
    return dt.datetime.fromtimestamp(ts_seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


def reservation_rows(found: Sequence[reservation_pb2.Reservation]) -> list[list[str]]:
    rows = [["RESERVATION", "STATE", "GPUS", "START (UTC)", "END (UTC)", "PRICE/H", "LEASE/ENDED"]]
    for r in found:
        last = r.lease or "-"
        if r.state == R.RESERVATION_STATE_ENDED:
            last = R.ReservationEndReason.Name(r.end_reason).removeprefix("RESERVATION_END_REASON_")
        rows.append(
            [
                r.name,
                _state(r),
                str(len(r.gpus)),
                _short(r.start_time.seconds),
                _short(r.end_time.seconds),
                f"{r.price_per_hour:.2f} {r.currency_code}",
                last,
            ]
        )
    return rows


def calendar_lines(found: Sequence[reservation_pb2.Reservation], width: int = CALENDAR_WIDTH) -> list[str]:
    """A text calendar: one row per GPU, one letter per reservation over the time axis from the
    first start to the last end (each window covers at least one column), then the legend."""
    booked = [r for r in found if r.gpus and r.state != R.RESERVATION_STATE_ENDED]
    if not booked:
        return ["no booked reservations"]
    t0 = min(r.start_time.seconds for r in booked)
    t1 = max(r.end_time.seconds for r in booked)
    span = max(1, t1 - t0)
    letters = string.ascii_uppercase + string.ascii_lowercase + string.digits
    rows: dict[tuple[str, int, str], list[str]] = {}
    legend = []
    for i, r in enumerate(sorted(booked, key=lambda r: (r.start_time.seconds, r.name))):
        mark = letters[i % len(letters)]
        legend.append(
            f"{mark}  {r.name}  {_state(r)}  {_short(r.start_time.seconds)} .. {_short(r.end_time.seconds)}"
        )
        a = (r.start_time.seconds - t0) * width // span
        b = max(a + 1, (r.end_time.seconds - t0) * width // span)
        for g in r.gpus:
            cells = rows.setdefault((g.node, g.index, g.uuid), ["."] * width)
            for c in range(a, min(b, width)):
                cells[c] = mark
    label_width = max(len(f"{n} #{i}") for n, i, _ in rows)
    out = [f"{'':<{label_width}}  {_short(t0)}{_short(t1):>{max(0, width - 16)}}"]
    for (node, index, _), cells in sorted(rows.items()):
        out.append(f"{f'{node} #{index}':<{label_width}}  {''.join(cells)}")
    return [escaped(line) for line in [*out, "", *legend]]


def cmd_create(c: Client, args: argparse.Namespace) -> int:
    options = {}
    for item in args.option:
        k, sep, v = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--option {item!r} must be KEY=VALUE")
        options[k] = v
    r = c.create_reservation(
        args.count,
        args.at,
        args.for_s,
        spread=args.spread,
        request_id=args.request_id or None,
        ssh_keys=ssh_keys(args.ssh_key),
        provider_options=options,
        pool=args.pool,
        allow_mixed=args.allow_mixed,
        **filter_kwargs(args),
    )
    emit(args, r, lambda: [*reservation_rows([r]), [""], *_gpu_rows(r)])
    return EXIT_OK


def _gpu_rows(r: reservation_pb2.Reservation) -> list[list[str]]:
    return [["GPU", "NODE", "MODEL", "INDEX", "COUNTRY", "PRICE/H"]] + [
        [g.uuid, g.node, g.model, str(g.index), g.location.country_code, f"{g.price_per_gpu_hour:.2f}"]
        for g in r.gpus
    ]


def cmd_get(c: Client, args: argparse.Namespace) -> int:
    r = c.get_reservation(args.name)
    rows = [*reservation_rows([r]), [""], *_gpu_rows(r)]
    if r.message:
        rows += [[""], ["MESSAGE"], [r.message]]
    emit(args, r, lambda: rows)
    return EXIT_OK


def cmd_list(c: Client, args: argparse.Namespace) -> int:
    found = c.list_reservations(_STATES[args.state], node=args.node)
    if args.calendar and args.output == "table":
        for line in calendar_lines(found):
            print(line)
        return EXIT_OK
    emit(args, found, lambda: reservation_rows(found))
    return EXIT_OK


def cmd_cancel(c: Client, args: argparse.Namespace) -> int:
    r = c.cancel_reservation(args.name)
    emit(args, r, lambda: reservation_rows([r]))
    return EXIT_OK


def cmd_watch(c: Client, args: argparse.Namespace) -> int:
    for ev in c.watch_reservation(args.name):
        if args.output == "table":
            kind = R.WatchReservationResponse.EventType.Name(ev.type).removeprefix("EVENT_TYPE_")
            line = (
                f"{ev.event_time.ToJsonString()}  {kind:<8} {_state(ev.reservation)} {ev.reservation.lease}"
            )
            print(escaped(f"{line} {ev.message}".rstrip()), flush=True)
        else:
            print(json.dumps(to_dict(ev)), flush=True)
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    res = sub.add_parser("reservation", help="book GPUs for a future window").add_subparsers(
        dest="sub", required=True
    )
    rc = res.add_parser("create", parents=[common], help="book GPUs: concrete GPUs, price frozen now")
    add_filter_flags(rc)
    rc.add_argument("--count", type=int, required=True, help="number of GPUs")
    rc.add_argument("--at", type=when, required=True, help="start: 2026-12-15T09:00Z, +2h or now")
    rc.add_argument("--for", dest="for_s", type=duration_s, required=True, help="length: 72h, 3d")
    rc.add_argument("--spread", action="store_true", help="allow several nodes (fewest first)")
    rc.add_argument("--allow-mixed", action="store_true", help="with --spread: own-pool and federation GPUs")
    rc.add_argument("--request-id", default="", help="idempotency key (default: random)")
    rc.add_argument("--ssh-key", action="append", default=[], metavar="FILE", help="public key for the hook")
    rc.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="provider option")
    rc.set_defaults(fn=cmd_create)
    rl = res.add_parser("list", parents=[common], help="your reservations (--calendar: drawn per GPU)")
    rl.add_argument("--state", choices=list(_STATES), default="")
    rl.add_argument("--node", default="", help="only those on this node: providers/P/nodes/N")
    rl.add_argument("--calendar", action="store_true", help="a text calendar, one row per GPU")
    rl.set_defaults(fn=cmd_list)
    for verb, fn in (("get", cmd_get), ("cancel", cmd_cancel), ("watch", cmd_watch)):
        rp = res.add_parser(verb, parents=[common])
        rp.add_argument("name", help="reservations/ID")
        rp.set_defaults(fn=fn)
