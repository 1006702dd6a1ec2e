"""Builds the console's world map (control_plane/console/world.json) from two npm packages:
world-atlas (ISC; Natural Earth's 1:110m Admin 0 countries, public domain) and
i18n-iso-countries (MIT; ISO 3166-1 numeric -> alpha-2).

    python scripts/build_world_map.py            # fetches both with `npm pack` into a temp dir
    python scripts/build_world_map.py --from DIR # DIR holds the unpacked packages

Each country becomes one SVG path in an equirectangular projection of longitude -180..180 and
latitude 84..-57 onto 1000 x 392 units (Antarctica left out), coordinates rounded to 0.1. The
output is committed; rerun only to move to a new edition of the data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "control_plane" / "console" / "world.json"
PACKAGES = {"world-atlas": "world-atlas@2.0.2", "i18n-iso-countries": "i18n-iso-countries@7.14.0"}
WIDTH, NORTH, SOUTH = 1000.0, 84.0, -57.0
HEIGHT = round(WIDTH * (NORTH - SOUTH) / 360.0)

Point = tuple[float, float]


def fetch(into: Path) -> None:
    for name, spec in PACKAGES.items():
        out = subprocess.run(["npm", "pack", spec], cwd=into, capture_output=True, text=True, check=True)
        with tarfile.open(into / out.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(into / name, filter="data")


def decode_arcs(topology: dict[str, Any]) -> list[list[Point]]:
    """TopoJSON's quantized, delta-encoded arcs, in degrees."""
    (sx, sy), (tx, ty) = topology["transform"]["scale"], topology["transform"]["translate"]
    arcs = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * sx + tx, y * sy + ty))
        arcs.append(points)
    return arcs


def ring(arcs: list[list[Point]], indices: list[int]) -> list[Point]:
    out: list[Point] = []
    for i in indices:
        points = arcs[i] if i >= 0 else list(reversed(arcs[~i]))
        out.extend(points if not out else points[1:])
    return out


def project(p: Point) -> Point:
    lon, lat = p
    lat = max(SOUTH, min(NORTH, lat))
    return (round((lon + 180.0) / 360.0 * WIDTH, 1), round((NORTH - lat) / (NORTH - SOUTH) * HEIGHT, 1))


def unwrap(r: list[Point]) -> list[Point]:
    """A ring that crosses the antimeridian (Russia's Chukotka, Fiji) would draw a band across
    the map: its western-hemisphere points move east by 360 degrees, off the map's right edge."""
    if any(abs(b[0] - a[0]) > 180 for a, b in itertools.pairwise(r)):
        return [(lon + 360.0 if lon < 0 else lon, lat) for lon, lat in r]
    return r


def path(rings: list[list[Point]]) -> str:
    parts = []
    for r in rings:
        pts = [project(p) for p in unwrap(r)]
        # Drop points that round onto their predecessor: the 110m data has many at this scale.
        kept = [pts[0]] + [q for prev, q in itertools.pairwise(pts) if q != prev]
        if len(kept) >= 3:
            parts.append("M" + "L".join(f"{x:g},{y:g}" for x, y in kept) + "Z")
    return "".join(parts)


def build(src: Path) -> dict[str, Any]:
    topology = json.loads((src / "world-atlas" / "package" / "countries-110m.json").read_text())
    codes = json.loads((src / "i18n-iso-countries" / "package" / "codes.json").read_text())
    alpha2 = {numeric: a2 for a2, _a3, numeric, *_ in codes}
    arcs = decode_arcs(topology)
    countries: dict[str, Any] = {}
    for g in topology["objects"]["countries"]["geometries"]:
        code = alpha2.get(str(g.get("id", "")))
        if code is None or code == "AQ" or g["type"] not in ("Polygon", "MultiPolygon"):
            continue  # no ISO code (disputed areas), Antarctica, or empty
        polygons = [g["arcs"]] if g["type"] == "Polygon" else g["arcs"]
        rings = [ring(arcs, r) for poly in polygons for r in poly]
        d = path(rings)
        if d:
            countries[code] = {"name": g["properties"]["name"], "d": d}
    return {
        "source": "world-atlas 2.0.2 (ISC; Natural Earth 1:110m Admin 0, public domain), "
        "i18n-iso-countries 7.14.0 (MIT); built by scripts/build_world_map.py",
        "width": WIDTH,
        "height": HEIGHT,
        "countries": dict(sorted(countries.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", help="a directory with the unpacked packages (default: npm pack)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(a.src) if a.src else Path(tmp)
        if not a.src:
            fetch(src)
        world = build(src)
    OUT.write_text(json.dumps(world, separators=(",", ":")) + "\n")
    print(f"{OUT}: {len(world['countries'])} countries, {OUT.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
