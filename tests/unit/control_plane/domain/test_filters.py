"""Filter validation and matching: model families, countries as a hard filter, radius."""

from __future__ import annotations

import pytest

from control_plane.domain.errors import DomainError as ApiError
from control_plane.domain.filters import compile_filter, model_matches
from gpufed.v1 import common_pb2


def node(
    country: str = "DE", price: float = 2.0, lat: float = 50.1, lon: float = 8.7, **labels: str
) -> common_pb2.Node:
    return common_pb2.Node(
        provider="p",
        price_per_gpu_hour=price,
        labels=labels,
        location=common_pb2.Location(country_code=country, region="r", latitude=lat, longitude=lon),
    )


@pytest.mark.parametrize(
    ("wanted", "model", "ok"),
    [
        ("H100", "NVIDIA H100 80GB HBM3", True),
        ("h100", "NVIDIA H100 80GB HBM3", True),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", True),
        ("A100 80GB", "NVIDIA A100-SXM4-80GB", True),
        ("H100", "NVIDIA H1000", False),
        ("H100", "NVIDIA H200", False),
        ("", "anything", True),
    ],
)
def test_model_matches_exact_names_and_families_by_whole_words(wanted: str, model: str, ok: bool) -> None:
    assert model_matches(wanted, model) is ok


def test_countries_are_exact_codes_and_a_hard_filter() -> None:
    f = compile_filter(common_pb2.GpuFilter(countries=["DE", "FR"], exclude_countries=["FR"]))
    assert f.countries == frozenset({"DE", "FR"})
    assert f.node_matches(node("DE"))[0]
    assert not f.node_matches(node("FR"))[0]  # deny wins
    assert not f.node_matches(node("US"))[0]


@pytest.mark.parametrize(
    ("flt", "reason"),
    [
        (common_pb2.GpuFilter(countries=["XX"]), "INVALID_COUNTRY_CODE"),
        (common_pb2.GpuFilter(countries=["DEU"]), "INVALID_COUNTRY_CODE"),
        # One rule for codes everywhere: not normalized, refused (the CLI upper-cases input).
        (common_pb2.GpuFilter(countries=["de"]), "INVALID_COUNTRY_CODE"),
        (common_pb2.GpuFilter(exclude_countries=["GB "]), "INVALID_COUNTRY_CODE"),
        (
            common_pb2.GpuFilter(near=common_pb2.GeoCircle(latitude=0, longitude=200, radius_km=1)),
            "INVALID_COORDINATES",
        ),
        (
            common_pb2.GpuFilter(near=common_pb2.GeoCircle(latitude=0, longitude=0, radius_km=0)),
            "INVALID_RADIUS",
        ),
        (
            common_pb2.GpuFilter(near=common_pb2.GeoCircle(latitude=0, longitude=0, radius_km=float("nan"))),
            "INVALID_RADIUS",
        ),
        (common_pb2.GpuFilter(max_price_per_gpu_hour=float("inf")), "INVALID_PRICE"),
        (common_pb2.GpuFilter(providers=["Bad Name"]), "INVALID_PROVIDER"),
        (common_pb2.GpuFilter(gpu_model="x" * 200), "INVALID_GPU_MODEL"),
        (common_pb2.GpuFilter(regions=["r"] * 301), "TOO_MANY_FILTER_VALUES"),
    ],
)
def test_malformed_filters_are_invalid_argument_with_a_reason(flt: common_pb2.GpuFilter, reason: str) -> None:
    with pytest.raises(ApiError) as e:
        compile_filter(flt)
    assert e.value.reason == reason


def test_radius_price_labels_providers_regions() -> None:
    f = compile_filter(
        common_pb2.GpuFilter(
            near=common_pb2.GeoCircle(latitude=48.86, longitude=2.35, radius_km=500),
            max_price_per_gpu_hour=2.5,
            labels={"tier": "premium"},
            providers=["p"],
            regions=["r"],
        )
    )
    ok, distance = f.node_matches(node(lat=50.1, lon=8.7, tier="premium"))  # Frankfurt from Paris
    assert ok and distance is not None and 440 < distance < 490
    assert not f.node_matches(node(lat=40.7, lon=-74.0, tier="premium"))[0]
    assert not f.node_matches(node(price=3.0, tier="premium"))[0]
    assert not f.node_matches(node(tier="standard"))[0]


def test_a_filter_is_bounded_in_bytes_and_labels() -> None:
    big = common_pb2.GpuFilter(regions=["r" * 60] * 299)
    with pytest.raises(ApiError) as e:
        compile_filter(big)
    assert (e.value.reason, e.value.field) == ("FILTER_TOO_LARGE", "filter")
    many = common_pb2.GpuFilter(labels={f"k{i}": "v" for i in range(33)})
    with pytest.raises(ApiError) as e:
        compile_filter(many)
    assert e.value.field == "filter.labels"
