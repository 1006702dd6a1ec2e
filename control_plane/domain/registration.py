"""Node registration: validating a daemon's hello and merging it into the node record.

The record holds what others must see (inventory, health, place, price, operator state); the
daemon's liveness lives elsewhere (the alive key), and telemetry never reaches etcd.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from control_plane.domain import errors, mig, repair
from control_plane.domain.countries import is_country_code
from control_plane.domain.errors import shown
from control_plane.domain.geo import valid_coordinates
from control_plane.domain.names import node_name, valid_id
from control_plane.domain.text import printable
from gpufed.v1 import common_pb2, node_pb2

MAX_GPUS_PER_NODE = 64
MAX_LABELS = 32
MAX_LABEL_VALUE = 128
MAX_PRICE = 1_000_000.0
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
_UUID = re.compile(r"^[A-Za-z0-9-]{1,96}$")

UNHEALTHY = common_pb2.GPU_HEALTH_UNHEALTHY
# Bounds on what a daemon's messages copy into the node record (every replica's index holds it,
# etcd stores it): one provider token must not be able to fill either.
MAX_VERSION = 64
MAX_REASONS = 8
MAX_REASON_CODE = 32
MAX_REASON_MESSAGE = 128
# What one node record may take in etcd: a provider's worst case is its node quota times this
# (docs/operations.md). Every field at its bound makes 109,547 bytes, operator state included
# (tests/unit/control_plane/domain/test_registration.py builds it); 8 real GPUs make ~2 KB.
MAX_NODE_RECORD_BYTES = 128 * 1024
# A report of 64 GPUs with every health reason at its bound is ~100 KB; 8 real GPUs ~1 KB.
MAX_REPORT_BYTES = 128 * 1024
_HEALTH_VALUES = frozenset(common_pb2.GpuHealth.values())
_ACTIONS = frozenset(common_pb2.RepairAction.values())


def validate_health(health: int, reasons: Sequence[common_pb2.HealthReason], where: str, field: str) -> None:
    """A GPU's health as a daemon reports it: a known value and a bounded list of reasons."""
    if health not in _HEALTH_VALUES:
        raise errors.invalid(
            "INVALID_HEALTH", f"{where}: health {health} is not a GpuHealth value", field=field
        )
    if len(reasons) > MAX_REASONS:
        raise errors.invalid("INVALID_HEALTH", f"{where}: at most {MAX_REASONS} health reasons", field=field)
    for r in reasons:
        if r.action not in _ACTIONS:
            raise errors.invalid(
                "INVALID_HEALTH",
                f"{where}: repair action {r.action} is not a RepairAction value",
                field=field,
            )
        if len(r.code) > MAX_REASON_CODE or len(r.message) > MAX_REASON_MESSAGE:
            raise errors.invalid(
                "INVALID_HEALTH",
                f"{where}: a health reason's code is at most {MAX_REASON_CODE} characters, "
                f"its message {MAX_REASON_MESSAGE}",
                field=field,
            )
        if not (printable(r.code) and printable(r.message)):
            raise errors.invalid(
                "INVALID_HEALTH",
                f"{where}: a health reason holds control or format characters: {shown(r.message or r.code)}",
                field=field,
            )


def reported_health(
    report: common_pb2.NodeReport, size: int | None = None
) -> dict[str, tuple[int, list[common_pb2.HealthReason]]]:
    """GPU uuid -> (health, reasons) of a report, validated: at most one sample per GPU a node may
    have, each with a bounded health. Every report of every daemon passes here, so the fields
    are read once (repeated-field access costs ~0.6 us on upb) and the checks run on what was
    read; a message is built only for a report that fails. `size`: its ByteSize, if known."""
    if (report.ByteSize() if size is None else size) > MAX_REPORT_BYTES:
        raise errors.invalid(
            "INVALID_REPORT", f"a report is at most {MAX_REPORT_BYTES} bytes", field="report"
        )
    gpus = report.gpus
    if len(gpus) > MAX_GPUS_PER_NODE:
        raise errors.invalid(
            "INVALID_REPORT", f"a report carries at most {MAX_GPUS_PER_NODE} GPU samples", field="report.gpus"
        )
    out: dict[str, tuple[int, list[common_pb2.HealthReason]]] = {
        g.uuid: (int(g.health), list(g.health_reasons)) for g in gpus
    }
    for uuid, (health, reasons) in out.items():
        if health not in _HEALTH_VALUES or reasons:  # reasons are rare: check them in full
            validate_health(health, reasons, f"GPU {shown(uuid)}", "report.gpus.health")
    return out


def validate_hello(hello: node_pb2.NodeHello, provider: str) -> None:
    if hello.provider != provider:
        raise errors.permission_denied(
            "PROVIDER_MISMATCH",
            f"token of provider {shown(provider)} cannot register nodes of provider {shown(hello.provider)}",
        )
    if not valid_id(hello.node_id):
        raise errors.invalid(
            "INVALID_NODE_ID",
            f"node_id {shown(hello.node_id)} must be a DNS label (a-z, 0-9, . and -)",
            field="hello.node_id",
        )
    loc = hello.location
    if not is_country_code(loc.country_code):
        raise errors.invalid(
            "INVALID_COUNTRY_CODE",
            f"location.country_code {shown(loc.country_code)} is not ISO 3166-1 alpha-2",
            field="hello.location.country_code",
        )
    if not valid_coordinates(loc.latitude, loc.longitude):
        raise errors.invalid(
            "INVALID_COORDINATES",
            "latitude must be in [-90, 90] and longitude in [-180, 180]",
            field="hello.location",
        )
    if len(loc.region) > 63 or len(loc.zone) > 63:
        raise errors.invalid(
            "INVALID_LOCATION", "region and zone are at most 63 characters", field="hello.location"
        )
    if not (printable(loc.region) and printable(loc.zone)):
        raise errors.invalid(
            "INVALID_LOCATION",
            f"region {shown(loc.region)} or zone {shown(loc.zone)} holds control or format characters",
            field="hello.location",
        )
    if not (math.isfinite(hello.price_per_gpu_hour) and 0 <= hello.price_per_gpu_hour <= MAX_PRICE):
        raise errors.invalid(
            "INVALID_PRICE",
            "price_per_gpu_hour must be a number in [0, 1e6]",
            field="hello.price_per_gpu_hour",
        )
    spot = hello.interruptible_price_per_gpu_hour
    if not (math.isfinite(spot) and 0 <= spot <= hello.price_per_gpu_hour):
        raise errors.invalid(
            "INVALID_PRICE",
            "interruptible_price_per_gpu_hour must be a number in [0, price_per_gpu_hour]",
            field="hello.interruptible_price_per_gpu_hour",
        )
    if hello.HasField("reservable_fraction") and not (
        math.isfinite(hello.reservable_fraction) and 0 <= hello.reservable_fraction <= 1
    ):
        raise errors.invalid(
            "INVALID_RESERVABLE_FRACTION",
            "reservable_fraction must be a number in [0, 1]",
            field="hello.reservable_fraction",
        )
    if hello.currency_code and not _CURRENCY.fullmatch(hello.currency_code):
        raise errors.invalid(
            "INVALID_CURRENCY",
            "currency_code must be an ISO 4217 code such as USD",
            field="hello.currency_code",
        )
    if not 1 <= whole_gpus(hello.gpus) <= MAX_GPUS_PER_NODE:
        raise errors.invalid(
            "INVALID_INVENTORY", f"a node must report 1..{MAX_GPUS_PER_NODE} GPUs", field="hello.gpus"
        )
    _validate_mig(hello.gpus)
    seen: set[str] = set()
    for gpu in hello.gpus:
        if not _UUID.fullmatch(gpu.uuid) or gpu.uuid in seen:
            raise errors.invalid(
                "INVALID_INVENTORY",
                f"GPU uuid {shown(gpu.uuid)} is malformed or repeated",
                field="hello.gpus.uuid",
            )
        seen.add(gpu.uuid)
        if not gpu.model or len(gpu.model) > 128:
            raise errors.invalid(
                "INVALID_INVENTORY", f"GPU {gpu.uuid} has no model name", field="hello.gpus.model"
            )
        if not printable(gpu.model):
            raise errors.invalid(
                "INVALID_INVENTORY",
                f"GPU {gpu.uuid}'s model {shown(gpu.model)} holds control or format characters",
                field="hello.gpus.model",
            )
        validate_health(gpu.health, gpu.health_reasons, f"GPU {gpu.uuid}", "hello.gpus.health")
    for field in ("daemon_version", "driver_version", "cuda_driver_version", "boot_id"):
        value = getattr(hello, field)
        if len(value) > MAX_VERSION or not printable(value):
            raise errors.invalid(
                "INVALID_HELLO", f"{field} is at most {MAX_VERSION} printable characters", field=field
            )
    if len(hello.labels) > MAX_LABELS:
        raise errors.invalid("INVALID_LABELS", f"at most {MAX_LABELS} labels", field="hello.labels")
    for k, v in hello.labels.items():
        if not _LABEL_KEY.fullmatch(k) or len(v) > MAX_LABEL_VALUE or not printable(v):
            raise errors.invalid("INVALID_LABELS", f"label {shown(k)} is malformed", field="hello.labels")


def whole_gpus(gpus: Sequence[common_pb2.Gpu]) -> int:
    """GPUs, not counting MIG instances (what GPU quotas and bounds count)."""
    return sum(1 for g in gpus if not g.parent_uuid)


def _validate_mig(gpus: Sequence[common_pb2.Gpu]) -> None:
    """Each MIG instance names a MIG-enabled GPU of the same inventory and a valid profile; at
    most seven per GPU."""
    parents = {g.uuid for g in gpus if not g.parent_uuid and g.mig_enabled}
    per_parent: dict[str, int] = {}
    for g in gpus:
        if not g.parent_uuid:
            if g.mig_profile:
                raise errors.invalid(
                    "INVALID_INVENTORY",
                    f"GPU {shown(g.uuid)} has a MIG profile but no parent",
                    field="hello.gpus",
                )
            continue
        if g.parent_uuid not in parents:
            raise errors.invalid(
                "INVALID_INVENTORY",
                f"MIG instance {shown(g.uuid)} names {shown(g.parent_uuid)}, "
                "not a MIG-enabled GPU of this node",
                field="hello.gpus.parent_uuid",
            )
        if not mig.valid_profile(g.mig_profile):
            raise errors.invalid(
                "INVALID_INVENTORY",
                f"MIG instance {shown(g.uuid)}: profile {shown(g.mig_profile)} is not like 1g.10gb",
                field="hello.gpus.mig_profile",
            )
        per_parent[g.parent_uuid] = n = per_parent.get(g.parent_uuid, 0) + 1
        if n > mig.MAX_INSTANCES_PER_GPU:
            raise errors.invalid(
                "INVALID_INVENTORY",
                f"GPU {shown(g.parent_uuid)} has more than {mig.MAX_INSTANCES_PER_GPU} MIG instances",
                field="hello.gpus",
            )


def follow_parents(node: common_pb2.Node) -> None:
    """A MIG instance's health is its GPU's (NVML reports health per GPU)."""
    health = {g.uuid: g.health for g in node.gpus if not g.parent_uuid}
    for g in node.gpus:
        if g.parent_uuid and g.parent_uuid in health:
            g.health = health[g.parent_uuid]
            del g.health_reasons[:]


def check_certificate(provider: str, uris: list[str], trust_domain: str) -> None:
    """With mTLS on, the daemon's certificate must name the provider of its token, as the URI
    SAN spiffe://{trust_domain}/provider/{provider}; PERMISSION_DENIED otherwise."""
    if not uris:
        raise errors.permission_denied(
            "CLIENT_CERTIFICATE_REQUIRED",
            "NodeService needs a client certificate: connect to the node listener",
        )
    prefix = f"spiffe://{trust_domain}/provider/"
    named = [u.removeprefix(prefix) for u in uris if u.startswith(prefix)]
    if provider not in named:
        shown = ", ".join(u[:200] for u in uris[:4])
        raise errors.permission_denied(
            "CERTIFICATE_PROVIDER_MISMATCH",
            f"the client certificate names {shown}, not {prefix}{provider} (the provider of the token)",
        )


def record_from_hello(
    hello: node_pb2.NodeHello,
    existing: common_pb2.Node | None,
    now: timestamp_pb2.Timestamp,
    pool_tenant: str = "",
) -> common_pb2.Node:
    """The node record after this hello: the daemon's view of inventory and health (a restarted
    daemon that shows a clean GPU is how health recovers), the operator's state kept."""
    node = common_pb2.Node(
        name=node_name(hello.provider, hello.node_id),
        provider=hello.provider,
        node_id=hello.node_id,
        location=hello.location,
        price_per_gpu_hour=hello.price_per_gpu_hour,
        interruptible_price_per_gpu_hour=hello.interruptible_price_per_gpu_hour or hello.price_per_gpu_hour,
        currency_code=hello.currency_code or "USD",
        labels=dict(hello.labels),
        daemon_version=hello.daemon_version,
        driver_version=hello.driver_version,
        cuda_driver_version=hello.cuda_driver_version,
        lease_hook=hello.lease_hook,
        pool_tenant=pool_tenant,  # from the token, never from the hello
        boot_id=hello.boot_id,
    )
    if hello.HasField("reservable_fraction"):
        node.reservable_fraction = hello.reservable_fraction
    # A reboot: a boot id the record has not seen (none known: never taken for a reboot).
    new_boot = bool(hello.boot_id) and (existing is None or existing.boot_id != hello.boot_id)
    repairs = {g.uuid: g.repair for g in existing.gpus if g.HasField("repair")} if existing else {}
    # In NVML index order, each GPU before its MIG instances: readers rely on it.
    for g in sorted(hello.gpus, key=lambda g: (g.index, bool(g.parent_uuid))):
        gpu = node.gpus.add()
        gpu.CopyFrom(g)
        gpu.lease = ""
        gpu.ClearField("repair")  # the control plane's, never the daemon's
        if gpu.health == common_pb2.GPU_HEALTH_UNSPECIFIED:
            gpu.health = common_pb2.GPU_HEALTH_HEALTHY
        if not gpu.parent_uuid:
            if gpu.uuid in repairs:
                gpu.repair.CopyFrom(repairs[gpu.uuid])
            repair.observe(gpu, gpu.health, list(gpu.health_reasons), hello.boot_id, now, new_boot)
    follow_parents(node)
    if existing is not None:
        node.state = existing.state
        node.state_reason = existing.state_reason
        if existing.HasField("drain_deadline"):
            node.drain_deadline.CopyFrom(existing.drain_deadline)
        node.register_time.CopyFrom(existing.register_time)
        node.update_time.CopyFrom(existing.update_time)
    else:
        node.register_time.CopyFrom(now)
        node.update_time.CopyFrom(now)
    if existing is None or not same_record(existing, node):
        node.update_time.CopyFrom(now)
    # Only the fields the API defines: unknown ones a daemon sent must not ride into etcd.
    node.DiscardUnknownFields()
    if node.ByteSize() > MAX_NODE_RECORD_BYTES:
        raise errors.invalid(
            "NODE_RECORD_TOO_LARGE",
            f"the node record would be {node.ByteSize()} bytes, at most {MAX_NODE_RECORD_BYTES}",
            field="hello",
        )
    return node


def same_record(a: common_pb2.Node, b: common_pb2.Node) -> bool:
    """Equal apart from update_time (what decides whether etcd must be written)."""
    a2, b2 = common_pb2.Node(), common_pb2.Node()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.ClearField("update_time")
    b2.ClearField("update_time")
    return a2 == b2


# The reason node_daemon/provisioning.py reports while a lease's hook end is being retried.
CLEANUP_PENDING = "LEASE_CLEANUP_PENDING"


def cleanup_only(reasons: Sequence[common_pb2.HealthReason]) -> bool:
    return bool(reasons) and all(r.code == CLEANUP_PENDING for r in reasons)


def apply_health(
    node: common_pb2.Node,
    reported: dict[str, tuple[int, list[common_pb2.HealthReason]]],
    now: timestamp_pb2.Timestamp | None = None,
) -> bool:
    """Fold a report's per-GPU health into the record, and its faults into each GPU's repair
    (control_plane.domain.repair); True if anything changed.

    Within one daemon session an UNHEALTHY GPU stays so; what clears it is the repair
    lifecycle (a reboot that shows it clean, or an operator). Except a GPU unhealthy only
    because a lease's end has not finished on the host (CLEANUP_PENDING): it follows the
    reports, and is offered again once the daemon's retried end succeeds."""
    now = now or timestamp_pb2.Timestamp()
    changed = False
    for gpu in node.gpus:
        got = reported.get(gpu.uuid)
        if got is None or gpu.parent_uuid:
            continue
        health, reasons = got
        if health == common_pb2.GPU_HEALTH_UNSPECIFIED or health == gpu.health:
            continue
        if gpu.health == UNHEALTHY and not cleanup_only(gpu.health_reasons):
            continue
        before = gpu.SerializeToString()
        repair.observe(gpu, health, reasons, node.boot_id, now, new_boot=False)
        changed = changed or gpu.SerializeToString() != before
    if changed:
        follow_parents(node)
    return changed
