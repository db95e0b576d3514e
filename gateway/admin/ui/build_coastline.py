"""Build ``coastline.json``, the world outline the status page draws its map on.

Source: the npm package ``world-atlas`` 2.0.2 (https://github.com/topojson/world-atlas),
file ``land-110m.json``: Natural Earth's 1:110m land polygons as TopoJSON.
- world-atlas is under the ISC license, Copyright 2013-2019 Michael Bostock.
- Natural Earth data is in the public domain (https://www.naturalearthdata.com/about/terms-of-use/).

The page must work offline (no tiles, no CDN), so the converted outline is committed next to
this script and only this script's output is served. Re-run it to rebuild:

    cd "$(mktemp -d)" && npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python gateway/admin/ui/build_coastline.py package/land-110m.json gateway/admin/ui/coastline.json

Output format (compact, a few tens of KB): ``{"source": ..., "license": ..., "scale": 10,
"rings": [[lon0, lat0, dlon1, dlat1, ...], ...]}``: each ring is a closed land outline in
integer tenths of a degree, the first point absolute and the rest as deltas (small numbers
keep the JSON short). Rings are simplified with Douglas-Peucker at ``--tolerance-deg``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

SCALE = 10  # coordinates stored in tenths of a degree: plenty for a status-page map
DEFAULT_TOLERANCE_DEG = 0.05
MIN_RING_POINTS = 4  # fewer than this after simplification: a speck, not worth drawing


def decode_arcs(topo: dict) -> list[list[tuple[float, float]]]:
    """TopoJSON arcs are quantized and delta-encoded; return them in degrees."""
    sx, sy = topo["transform"]["scale"]
    tx, ty = topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x += dx
            y += dy
            pts.append((x * sx + tx, y * sy + ty))
        arcs.append(pts)
    return arcs


def ring_points(ring: list[int], arcs: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Join a ring's arcs (``~i`` means arc i reversed); shared end points appear once."""
    out: list[tuple[float, float]] = []
    for index in ring:
        pts = arcs[~index][::-1] if index < 0 else arcs[index]
        out.extend(pts[1:] if out else pts)
    return out


def simplify(points: list[tuple[float, float]], tolerance: float) -> list[tuple[float, float]]:
    """Douglas-Peucker, iterative (rings can be long)."""
    if len(points) < 3:
        return points
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        a, b = stack.pop()
        (ax, ay), (bx, by) = points[a], points[b]
        length = math.hypot(bx - ax, by - ay)
        best, best_i = -1.0, -1
        for i in range(a + 1, b):
            px, py = points[i]
            if length == 0:
                d = math.hypot(px - ax, py - ay)
            else:
                d = abs((bx - ax) * (ay - py) - (ax - px) * (by - ay)) / length
            if d > best:
                best, best_i = d, i
        if best > tolerance:
            keep[best_i] = True
            stack.append((a, best_i))
            stack.append((best_i, b))
    return [p for p, k in zip(points, keep, strict=True) if k]


def encode(points: list[tuple[float, float]]) -> list[int]:
    flat: list[int] = []
    px = py = 0
    for i, (lon, lat) in enumerate(points):
        x, y = round(lon * SCALE), round(lat * SCALE)
        if i == 0:
            flat += [x, y]
        elif (x, y) != (px, py):
            flat += [x - px, y - py]
        px, py = x, y
    return flat


def build(topo: dict, tolerance_deg: float) -> dict:
    arcs = decode_arcs(topo)
    rings = []
    for geom in topo["objects"]["land"]["geometries"]:
        polygons = geom["arcs"] if geom["type"] == "MultiPolygon" else [geom["arcs"]]
        for polygon in polygons:
            for ring in polygon:
                pts = simplify(ring_points(ring, arcs), tolerance_deg)
                flat = encode(pts)
                if len(flat) // 2 >= MIN_RING_POINTS:
                    rings.append(flat)
    return {
        "source": "world-atlas 2.0.2 land-110m.json (Natural Earth 1:110m land)",
        "license": "world-atlas: ISC (c) Michael Bostock; Natural Earth: public domain",
        "scale": SCALE,
        "rings": rings,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="world-atlas land-110m.json (TopoJSON)")
    ap.add_argument("output", help="where to write coastline.json")
    ap.add_argument("--tolerance-deg", type=float, default=DEFAULT_TOLERANCE_DEG)
    args = ap.parse_args(argv)
    with open(args.source) as f:
        topo = json.load(f)
    out = build(topo, args.tolerance_deg)
    text = json.dumps(out, separators=(",", ":"))
    with open(args.output, "w") as f:
        f.write(text)
    points = sum(len(r) // 2 for r in out["rings"])
    print(f"{args.output}: {len(out['rings'])} rings, {points} points, {len(text)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
