"""`gpufed-control-plane` / `python -m control_plane`: run one replica until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from control_plane.affinity import pin_process
from control_plane.config import Config, ConfigError, parse_args
from control_plane.replica import Replica
from gpufed.logs import configure_logging, get_logger

log = get_logger(__name__)


async def serve(config: Config) -> None:
    replica = Replica(config)
    await replica.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await replica.stop()


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    config = parse_args(argv)
    if config.cpus:
        # Before gRPC starts its threads, though pin_process moves any that exist too.
        try:
            cpus = pin_process(config.cpus)
        except ValueError as e:
            print(f"gpufed-control-plane: error: --cpus: {e}", file=sys.stderr)
            sys.exit(2)  # a usage error, as argparse reports its own
        log.info("replica pinned", cpus=sorted(cpus))
    # uvloop's event loop costs less per callback than asyncio's, and a replica is mostly
    # callbacks (measured: +10-15 % lease cycles). GPUFED_EVENT_LOOP=asyncio opts out.
    if os.environ.get("GPUFED_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(serve(config))
        except ConfigError as e:
            print(f"gpufed-control-plane: error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
