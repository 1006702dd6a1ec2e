"""The `gpufed` program: connection flags, the command groups' parsers, exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from gpufed import __version__
from gpufed.cli import admin, leases, nodes, reservations
from gpufed.cli.common import EXIT_BY_CODE, EXIT_ERROR, EXIT_NO_CAPACITY, EXIT_OK, EXIT_USAGE, settings
from gpufed.client import Client, GpufedError
from gpufed.settings import truthy
from gpufed.terminal import escaped
from gpufed.transport import channel_credentials


def cmd_version(c: Client, args: argparse.Namespace) -> int:
    """This CLI's release and the replica's (as kubectl version does)."""
    print(f"client: {__version__}")
    server = c.server_version()
    print(f"server: {escaped(server) if server else 'before 0.2.0 (it does not say)'}")
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
    for group in (nodes, leases, reservations, admin):
        group.register(sub, common)
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
    cfg = settings()
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
        return EXIT_BY_CODE.get(e.code, EXIT_ERROR)
    except (argparse.ArgumentTypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def entrypoint() -> None:
    sys.exit(main())
