"""What a hostile provider sends: every field of a hello or report at its bound."""

from __future__ import annotations

from control_plane.domain import registration as R
from gpufed import __version__
from gpufed.v1 import common_pb2, node_pb2


def maximal_hello(provider: str = "p" * 63, node_id: str = "n" * 63) -> node_pb2.NodeHello:
    h = node_pb2.NodeHello(provider=provider, node_id=node_id)
    h.location.country_code = "DE"
    h.location.region, h.location.zone = "r" * 63, "z" * 63
    h.location.latitude, h.location.longitude = -89.123456, -179.123456
    h.price_per_gpu_hour, h.currency_code = 999_999.99, "USD"
    h.interruptible_price_per_gpu_hour, h.reservable_fraction = 999_999.99, 0.75
    for i in range(R.MAX_LABELS):
        h.labels["k" * 61 + f"{i:02d}"] = "v" * R.MAX_LABEL_VALUE
    h.driver_version = h.cuda_driver_version = "v" * R.MAX_VERSION
    # The longest daemon version the skew policy takes: this release with a build suffix.
    h.daemon_version = f"{__version__}+" + "v" * (R.MAX_VERSION - len(__version__) - 1)
    for i in range(R.MAX_GPUS_PER_NODE):
        g = h.gpus.add(
            uuid=gpu_uuid(node_id, i), index=2**32 - 1, model="m" * 128, memory_total_bytes=2**64 - 1
        )
        g.health, g.mig_enabled = common_pb2.GPU_HEALTH_DEGRADED, True
        g.health_reasons.extend(maximal_reasons())
    return h


def gpu_uuid(node_id: str, i: int) -> str:
    return f"GPU-{node_id[:60]}-{i:0{91 - len(node_id[:60])}d}"


def maximal_reasons() -> list[common_pb2.HealthReason]:
    return [
        common_pb2.HealthReason(code="c" * R.MAX_REASON_CODE, message="m" * R.MAX_REASON_MESSAGE)
        for _ in range(R.MAX_REASONS)
    ]


def flipping_report(node_id: str, n: int, healthy: bool) -> node_pb2.NodeMessage:
    """A report of every GPU, all HEALTHY or all DEGRADED with maximal reasons."""
    report = common_pb2.NodeReport()
    for i in range(n):
        s = report.gpus.add(uuid=gpu_uuid(node_id, i))
        if healthy:
            s.health = common_pb2.GPU_HEALTH_HEALTHY
        else:
            s.health = common_pb2.GPU_HEALTH_DEGRADED
            s.health_reasons.extend(maximal_reasons())
    return node_pb2.NodeMessage(report=report)
