"""Great-circle distances, the unit vectors nearest-first ranks by, and coordinate bounds."""

from __future__ import annotations

import math

import pytest

from control_plane.domain.geo import EARTH_RADIUS_KM, haversine_km, unit_vector, valid_coordinates


def test_known_distances() -> None:
    assert haversine_km(52.52, 13.405, 52.52, 13.405) == 0.0
    assert 870 < haversine_km(52.52, 13.405, 48.857, 2.352) < 885  # Berlin - Paris
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM)


def test_unit_vectors_rank_points_as_the_great_circle_does() -> None:
    frankfurt = unit_vector(50.1, 8.7)
    berlin, new_york = unit_vector(52.52, 13.405), unit_vector(40.7, -74.0)

    def dot(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert math.isclose(dot(frankfurt, frankfurt), 1.0)
    assert dot(frankfurt, berlin) > dot(frankfurt, new_york)


@pytest.mark.parametrize(
    ("lat", "lon", "ok"),
    [
        (0, 0, True),
        (90, 180, True),
        (-90, -180, True),
        (90.1, 0, False),
        (0, 180.5, False),
        (math.nan, 0, False),
    ],
)
def test_coordinates_must_be_on_earth(lat: float, lon: float, ok: bool) -> None:
    assert valid_coordinates(lat, lon) is ok
