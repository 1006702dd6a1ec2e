"""Parsing shared by the command groups: exit codes, durations, times, filter flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from gpufed.settings import Settings

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

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
EXIT_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_NO_CAPACITY,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
}


def settings() -> Settings:
    path = os.environ.get("GPUFED_CONFIG", str(Path.home() / ".config" / "gpufed" / "config.toml"))
    return Settings.from_file(path, required=False)


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def country_codes(value: str) -> list[str]:
    """Country codes as people type them ("de, fr"): the API takes exact upper-case codes."""
    return [v.upper() for v in csv_list(value)]


def parse_labels(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"label {item!r} must be KEY=VALUE")
        out[k] = v
    return out


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """Whole seconds from "90", "90s", "30m", "2h" or "1d"."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], 0)
    number = t[:-1] if unit else t
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 2h")
    return int(number) * (unit or 1)


def when(text: str) -> timestamp_pb2.Timestamp | None:
    """RFC 3339 (2026-09-01T00:00:00Z) or a date (2026-09-01, midnight UTC)."""
    if not text:
        return None
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromJsonString(text if "T" in text else f"{text}T00:00:00Z")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date or an RFC 3339 time") from e
    return ts


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters")
    g.add_argument("--model", default="", help='GPU model or family, e.g. "H100"')
    g.add_argument(
        "--pool",
        choices=["own-first", "own-only", "federation-only"],
        default="",
        help="with a private pool: your own nodes first (the default), only them, or only the federation's",
    )
    g.add_argument("--min-memory-gb", type=float, default=0, help="minimum memory per GPU, GiB")
    g.add_argument("--country", type=country_codes, default=[], help="allowed countries, ISO codes: DE,FR")
    g.add_argument("--exclude-country", type=country_codes, default=[], help="denied countries: US,CN")
    g.add_argument("--region", type=csv_list, default=[], help="regions")
    g.add_argument("--provider", type=csv_list, default=[], help="providers")
    g.add_argument("--near", default="", help="LAT,LON,RADIUS_KM")
    g.add_argument("--max-price", type=float, default=0.0, help="max price per GPU-hour")
    g.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    g.add_argument("--include-degraded", action="store_true")
    g.add_argument(
        "--mig-profile", default="", help="MIG instances of this profile (1g.10gb), not whole GPUs"
    )


def filter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    near = None
    if args.near:
        parts = csv_list(args.near)
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
        labels=parse_labels(args.label),
        include_degraded=args.include_degraded,
        mig_profile=args.mig_profile,
    )
