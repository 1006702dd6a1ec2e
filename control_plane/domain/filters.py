"""GPU filters shared by SearchOffers, SummarizeCapacity and CreateLease: validated once, then
matched against nodes and GPUs. Data sovereignty (countries) is a hard filter."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from control_plane.domain import errors, mig
from control_plane.domain.countries import is_country_code
from control_plane.domain.errors import shown
from control_plane.domain.geo import haversine_km, valid_coordinates
from control_plane.domain.names import valid_id
from gpufed.v1 import common_pb2

MAX_FILTER_VALUES = 300
MAX_FILTER_LABELS = 32
MAX_FILTER_BYTES = 16 * 1024  # x 2,048 compiled filters cached: at most 32 MiB


@lru_cache(maxsize=4096)
def model_words(model: str) -> frozenset[str]:
    return frozenset(w for w in re.split(r"[^a-z0-9]+", model.lower()) if w)


@lru_cache(maxsize=4096)
def model_matches(wanted: str, model: str) -> bool:
    """Exact name, or a family: every word of `wanted` is a word of the model name
    ("H100" matches "NVIDIA H100 80GB HBM3", "a100 80gb" matches "NVIDIA A100-SXM4-80GB")."""
    if not wanted:
        return True
    if wanted.lower() == model.lower():
        return True
    words = model_words(wanted)
    return bool(words) and words <= model_words(model)


@dataclass(frozen=True, slots=True)
class Near:
    latitude: float
    longitude: float
    radius_km: float


@dataclass(frozen=True, slots=True)
class Filter:
    gpu_model: str = ""
    min_gpu_memory_bytes: int = 0
    countries: frozenset[str] | None = None
    exclude_countries: frozenset[str] = frozenset()
    regions: frozenset[str] | None = None
    providers: frozenset[str] | None = None
    near: Near | None = None
    max_price: float = 0.0
    labels: tuple[tuple[str, str], ...] = ()
    include_degraded: bool = False
    # Whose private pool the caller may see besides the federation: a tenant's name, or None
    # for an operator (every pool). The default "" sees no private pool: a caller that forgot
    # to say who it is sees less, never more.
    viewer: str | None = ""
    # Within what the viewer sees: "any", only its "own" pool, or only the "federation".
    pool: str = "any"
    # MIG instances of this profile instead of whole GPUs ("" for whole GPUs).
    mig_profile: str = ""

    def node_matches(self, node: common_pb2.Node) -> tuple[bool, float | None]:
        """Whether the node's place, provider, price and labels pass; with its distance if near."""
        if not visible(node, self.viewer):
            return False, None
        # visible() let through no other tenant's pool: a pool node here is the viewer's own.
        if (self.pool == "own" and not node.pool_tenant) or (self.pool == "federation" and node.pool_tenant):
            return False, None
        loc = node.location
        if self.countries is not None and loc.country_code not in self.countries:
            return False, None
        if loc.country_code in self.exclude_countries:
            return False, None
        if self.regions is not None and loc.region not in self.regions:
            return False, None
        if self.providers is not None and node.provider not in self.providers:
            return False, None
        if self.max_price and node.price_per_gpu_hour > self.max_price:
            return False, None
        for k, v in self.labels:
            if node.labels.get(k) != v:
                return False, None
        distance = None
        if self.near is not None:
            distance = haversine_km(self.near.latitude, self.near.longitude, loc.latitude, loc.longitude)
            if distance > self.near.radius_km:
                return False, None
        return True, distance

    def key(self) -> str:
        """The same text for the same filter in every process (page tokens are checked against
        it on whichever replica serves the next page): sets are written sorted, never as the
        repr of a frozenset, whose order follows PYTHONHASHSEED."""

        def values(v: frozenset[str] | None) -> tuple[str, ...] | None:
            return None if v is None else tuple(sorted(v))

        near = None if self.near is None else (self.near.latitude, self.near.longitude, self.near.radius_km)
        return repr(
            (
                self.gpu_model,
                self.min_gpu_memory_bytes,
                values(self.countries),
                values(self.exclude_countries),
                values(self.regions),
                values(self.providers),
                near,
                self.max_price,
                self.labels,
                self.include_degraded,
                self.viewer,
                self.pool,
                self.mig_profile,
            )
        )


def visible(node: common_pb2.Node, viewer: str | None) -> bool:
    """A federation node is visible to everyone; a private pool's only to its tenant and to
    operators (viewer None)."""
    return not node.pool_tenant or viewer is None or node.pool_tenant == viewer


def country_codes(values: list[str], field: str) -> frozenset[str]:
    """Country codes exactly as ISO 3166-1 writes them: two upper-case letters. The one rule for
    codes everywhere (hello, filters): not normalized, rejected; clients (the CLI) normalize
    what people type."""
    out = set()
    for code in values:
        if not is_country_code(code):
            raise errors.invalid(
                "INVALID_COUNTRY_CODE",
                f"{field}: {shown(code)} is not an ISO 3166-1 alpha-2 country code (upper case)",
                field=field,
            )
        out.add(code)
    return frozenset(out)


def compile_filter(f: common_pb2.GpuFilter) -> Filter:
    """Validate a GpuFilter; INVALID_ARGUMENT with a reason for anything malformed. The same
    filter arrives again and again (clients poll, retry, hold gangs): it is compiled once, and
    a filter is bounded in bytes, so the cache of compiled filters is too."""
    raw = f.SerializeToString(deterministic=True)
    if len(raw) > MAX_FILTER_BYTES:
        raise errors.invalid(
            "FILTER_TOO_LARGE", f"a filter is at most {MAX_FILTER_BYTES} bytes", field="filter"
        )
    return _compile_cached(raw)


@lru_cache(maxsize=2048)
def _compile_cached(raw: bytes) -> Filter:
    return _compile(common_pb2.GpuFilter.FromString(raw))


def _compile(f: common_pb2.GpuFilter) -> Filter:
    for field in ("countries", "exclude_countries", "regions", "providers"):
        if len(getattr(f, field)) > MAX_FILTER_VALUES:
            raise errors.invalid(
                "TOO_MANY_FILTER_VALUES",
                f"{field}: at most {MAX_FILTER_VALUES} values",
                field=f"filter.{field}",
            )
    if len(f.labels) > MAX_FILTER_LABELS:
        raise errors.invalid(
            "TOO_MANY_FILTER_VALUES", f"labels: at most {MAX_FILTER_LABELS}", field="filter.labels"
        )
    if len(f.gpu_model) > 128:
        raise errors.invalid(
            "INVALID_GPU_MODEL", "gpu_model is longer than 128 characters", field="filter.gpu_model"
        )
    for p in f.providers:
        if not valid_id(p):
            raise errors.invalid(
                "INVALID_PROVIDER",
                f"providers: {shown(p)} is not a valid provider name",
                field="filter.providers",
            )
    near = None
    if f.HasField("near"):
        n = f.near
        if not valid_coordinates(n.latitude, n.longitude):
            raise errors.invalid(
                "INVALID_COORDINATES",
                "near: latitude must be in [-90, 90], longitude in [-180, 180]",
                field="filter.near",
            )
        if not (math.isfinite(n.radius_km) and n.radius_km > 0):
            raise errors.invalid(
                "INVALID_RADIUS", "near.radius_km must be a positive number", field="filter.near.radius_km"
            )
        near = Near(n.latitude, n.longitude, n.radius_km)
    if f.mig_profile and not mig.valid_profile(f.mig_profile):
        raise errors.invalid(
            "INVALID_MIG_PROFILE",
            f"mig_profile {shown(f.mig_profile)} is not a MIG profile such as 1g.10gb",
            field="filter.mig_profile",
        )
    if not math.isfinite(f.max_price_per_gpu_hour) or f.max_price_per_gpu_hour < 0:
        raise errors.invalid(
            "INVALID_PRICE",
            "max_price_per_gpu_hour must be a non-negative number",
            field="filter.max_price_per_gpu_hour",
        )
    return Filter(
        gpu_model=f.gpu_model.strip(),
        min_gpu_memory_bytes=f.min_gpu_memory_bytes,
        countries=country_codes(list(f.countries), "countries") if f.countries else None,
        exclude_countries=country_codes(list(f.exclude_countries), "exclude_countries"),
        regions=frozenset(f.regions) if f.regions else None,
        providers=frozenset(f.providers) if f.providers else None,
        near=near,
        max_price=f.max_price_per_gpu_hour,
        labels=tuple(sorted(f.labels.items())),
        include_degraded=f.include_degraded,
        mig_profile=f.mig_profile,
    )
