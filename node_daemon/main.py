"""`gpufed-node-daemon` / `python -m node_daemon`: stream this host's GPUs until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pynvml

from gpufed.clock import SYSTEM, Clock
from gpufed.logs import configure_logging, get_logger
from gpufed.transport import channel_credentials
from node_daemon.collector import Collector, XidWatcher
from node_daemon.config import DaemonConfig, parse_args
from node_daemon.fake_nvml import FakeNvml, load_scenario, parse_event
from node_daemon.metrics import GpuView, Host, MetricsServer, escape_label, render
from node_daemon.provisioning import Unended
from node_daemon.session import DaemonSession

log = get_logger(__name__)


def make_nvml(cfg: DaemonConfig, clock: Clock = SYSTEM) -> Any:
    if not cfg.fake_nvml:
        return pynvml
    events = load_scenario(cfg.fake_scenario) if cfg.fake_scenario else []
    events += [parse_event(e) for e in cfg.fake_events]
    host = f"{cfg.provider}/{cfg.node_id}"
    return FakeNvml(cfg.fake_nvml, seed=cfg.fake_seed, host=host, scenario=events, clock=clock)


def credentials(cfg: DaemonConfig) -> grpc.ChannelCredentials | None:
    """TLS (the given CA, else the system roots; the client certificate for mTLS), or None for
    plaintext, only with --insecure (gpufed.transport)."""

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return channel_credentials(
        ca_cert=read(cfg.ca_cert),
        tls=cfg.tls,
        client_cert=read(cfg.client_cert),
        client_key=read(cfg.client_key),
        insecure=cfg.insecure,
        endpoints=cfg.control_planes,
    )


async def run(cfg: DaemonConfig, clock: Clock = SYSTEM) -> None:
    collector = Collector(make_nvml(cfg, clock), clock)
    collector.start()
    log.info(
        "NVML ready",
        gpus=len(collector.gpus),
        driver=collector.driver_version,
        models=sorted({g.model for g in collector.gpus}),
        fake=cfg.fake_nvml or None,
    )
    session = DaemonSession(cfg, collector, credentials(cfg))
    loop = asyncio.get_running_loop()
    watcher = XidWatcher(collector, lambda ev: session.event_from_thread(loop, ev))
    watcher.start()
    metrics = None
    if cfg.metrics_listen:
        metrics = MetricsServer(cfg.metrics_listen, lambda: metrics_page(cfg, collector, session))
        metrics.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, session.stop)
    try:
        await session.run()
    finally:
        if metrics is not None:
            metrics.stop()
        watcher.stop()
        collector.shutdown()
        log.info("stopped")


def metrics_page(cfg: DaemonConfig, collector: Collector, session: DaemonSession) -> str:
    """The dcgm-exporter page from the last report, each GPU labelled with its lease."""
    report = collector.last_report
    if report is None:
        report = collector.sample()
    holders = {u: name for name, a in list(session.assignments.active.items()) for u in a.gpu_uuids}
    views = []
    for s in report.gpus:
        info = collector.by_uuid.get(s.uuid)
        views.append(
            GpuView(
                sample=s,
                model=info.model if info else "",
                last_xid=info.last_xid if info else 0,
                lease=holders.get(s.uuid, ""),
                mig_leases={m.uuid: holders[m.uuid] for m in s.mig_devices if m.uuid in holders},
            )
        )
    host = Host(
        cfg.node_id,
        collector.driver_version,
        cfg.provider,
        f"providers/{cfg.provider}/nodes/{cfg.node_id}",
        hostname_label=cfg.metrics_hostname_label,
    )
    page = render(host, views)
    if session.provisioner is not None:
        page += leftovers_page(session.provisioner.unended)
    return page


def leftovers_page(unended: dict[str, Unended]) -> str:
    """Leases whose end has not yet succeeded on this host: alert on any."""
    lines = [
        "# HELP gpufed_node_lease_ends_unfinished Leases whose hook end has not yet succeeded here.",
        "# TYPE gpufed_node_lease_ends_unfinished gauge",
        f"gpufed_node_lease_ends_unfinished {len(unended)}",
        "# HELP gpufed_node_lease_end_failures Failed hook ends of each unfinished lease.",
        "# TYPE gpufed_node_lease_end_failures gauge",
        *(
            f'gpufed_node_lease_end_failures{{lease="{escape_label(n)}"}} {u.attempts}'
            for n, u in sorted(unended.items())
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    cfg = parse_args(argv)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(cfg))
    except pynvml.NVMLError as e:
        # No driver, no GPU, no permission: say so in one line instead of a traceback.
        log.error(
            "NVML is not usable on this host; on a machine without a GPU use --fake-nvml PROFILE",
            error=str(e),
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
