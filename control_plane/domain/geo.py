"""Great-circle distance for radius search and distance ordering."""

from __future__ import annotations

import math

EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def valid_coordinates(lat: float, lon: float) -> bool:
    return -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0 and math.isfinite(lat) and math.isfinite(lon)


def unit_vector(lat: float, lon: float) -> tuple[float, float, float]:
    """The point on the unit sphere: the dot product of two is the cosine of their distance."""
    p, la = math.radians(lat), math.radians(lon)
    return (math.cos(p) * math.cos(la), math.cos(p) * math.sin(la), math.sin(p))
