"""What the domain reads of the federation's inventory: node entries, per-node summaries for
searches, candidates for placement, and the read-only view the index adapter provides.

The index (control_plane.adapters.index) keeps these up to date from etcd; the domain only
reads them, so searches and placement are pure functions of a view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gpufed.v1 import common_pb2


@dataclass(slots=True)
class NodeEntry:
    node: common_pb2.Node
    mod_revision: int
    # Derived once per record, reused by every summary of it (allocations change far more often):
    # (model, health, memory, gpu) in NVML index order, and the node's unit vector.
    gpus: list[tuple[str, int, int, common_pb2.Gpu]] = field(default_factory=list)
    xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # GPU counts by (model, health, MIG profile, memory), made by the first SummarizeCapacity
    # that needs them (control_plane.domain.offers) and kept with the record.
    counts: list[tuple[tuple[str, int, str, int], int]] | None = None


@dataclass(slots=True)
class GpuGroup:
    """Free GPUs (or MIG instances of one profile) of one model and health on one node (the
    unit searches look at)."""

    model: str
    health: int
    memory_bytes: int
    gpus: list[common_pb2.Gpu]
    mig_profile: str = ""


@dataclass(slots=True)
class NodeSummary:
    """What a search needs of a node, kept up to date on every change of the node, its liveness
    or its allocations, so searches read plain attributes instead of protobufs."""

    name: str
    node: common_pb2.Node
    mod_revision: int
    schedulable: bool
    groups: list[GpuGroup]
    price: float
    xyz: tuple[float, float, float]


def gpu_counts(entry: NodeEntry) -> list[tuple[tuple[str, int, str, int], int]]:
    """The record's GPUs by (model, health, MIG profile, memory), counted once per record."""
    if entry.counts is None:
        tally: dict[tuple[str, int, str, int], int] = {}
        for model, health, memory, gpu in entry.gpus:
            key = (model, health, gpu.mig_profile, memory)
            tally[key] = tally.get(key, 0) + 1
        entry.counts = list(tally.items())
    return entry.counts


@dataclass(slots=True)
class Candidate:
    """Free GPUs of one model on one node that match a filter."""

    name: str
    node: common_pb2.Node
    gpus: list[common_pb2.Gpu]
    distance_km: float | None
    mod_revision: int


class InventoryView(Protocol):
    """The inventory as searches and placement read it (the index adapter implements it)."""

    @property
    def nodes(self) -> Mapping[str, NodeEntry]: ...

    @property
    def summaries(self) -> Mapping[str, NodeSummary]: ...

    @property
    def allocs(self) -> Mapping[str, Mapping[str, str]]:
        """node name -> GPU uuid -> lease id of every allocated GPU."""
        ...

    @property
    def capacity(self) -> Mapping[str, Mapping[tuple[str, str, int, str, int], list[int]]]:
        """Pool ("" the federation) -> (model, country, health, MIG profile, memory) ->
        [total, free] GPUs of READY nodes (control_plane.domain.capacity)."""
        ...

    @property
    def by_price(self) -> Sequence[tuple[float, str]]:
        """(price, node name) of every node, cheapest first."""
        ...

    @property
    def by_country(self) -> Mapping[str, Sequence[tuple[float, str]]]: ...

    @property
    def models(self) -> Mapping[str, int]:
        """GPU model name -> number of nodes with it."""
        ...

    @property
    def facets(self) -> Mapping[str, int]:
        """ "region:R", "label:K=V" -> number of nodes with it."""
        ...

    @property
    def node_counts(self) -> Mapping[str, int]:
        """provider -> number of its nodes."""
        ...

    def is_schedulable(self, name: str) -> bool: ...
