"""What commands print: tables for people, JSON, YAML, JSON lines or CSV for scripts."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from gpufed.terminal import escaped
from gpufed.v1 import common_pb2


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def emit(
    args: argparse.Namespace, data: Message | Sequence[Message], table: Callable[[], list[list[str]]]
) -> None:
    if args.output == "json":
        payload = to_dict(data) if isinstance(data, Message) else [to_dict(m) for m in data]
        print(json.dumps(payload, indent=2))
    elif args.output == "jsonl":
        for m in [data] if isinstance(data, Message) else data:
            print(json.dumps(to_dict(m), separators=(",", ":")))
    elif args.output == "csv":
        rows = [[escaped(c) for c in r] for r in table()]
        writer = csv.writer(sys.stdout)
        writer.writerows(r for r in rows if any(r))
    elif args.output == "yaml":
        payload = to_dict(data) if isinstance(data, Message) else [to_dict(m) for m in data]
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


def health(h: int) -> str:
    return common_pb2.GpuHealth.Name(h).removeprefix("GPU_HEALTH_")  # type: ignore[arg-type]


def gib(b: int) -> str:
    return f"{b / 1024**3:.0f}GiB"
