"""Time-series charts of a device's measurements, drawn on the server as inline SVG.

A measurement holds fragments of series (`{"c8y_Temperature": {"T": {"value": 21.5, "unit":
"C"}}}`); every `<fragment>.<series>` with numeric values becomes one chart. The geometry is
computed here (pure Python, tested without a browser) and the template only writes it out, so
the page needs no script library and works offline; the live stream sends the re-rendered
charts when a measurement arrives. Bounded: the latest MAX_POINTS points of at most MAX_SERIES
series, dots for the last MAX_DOTS points of each (the line carries the rest).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

MAX_SERIES = 12
MAX_POINTS = 500
MAX_DOTS = 120
# parts of a measurement that are not series fragments
_NOT_SERIES = frozenset({"id", "self", "time", "type", "source", "creationTime", "lastUpdated"})

WIDTH, HEIGHT = 640, 190
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 26  # room for the axis labels


@dataclass(frozen=True)
class Point:
    t: int  # epoch milliseconds
    v: float


@dataclass
class Series:
    fragment: str
    name: str
    unit: str = ""
    points: list[Point] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.fragment}.{self.name}"


@dataclass(frozen=True)
class Dot:
    x: float
    y: float
    label: str  # time and value, the dot's tooltip


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class Chart:
    """One series laid out in a WIDTH x HEIGHT box."""

    series: Series
    width: int
    height: int
    path: str
    dots: list[Dot]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    last: str  # the latest value with its unit

    @property
    def plot(self) -> tuple[int, int, int, int]:
        """The plot area: x0, y0, x1, y1."""
        return LEFT, TOP, self.width - RIGHT, self.height - BOTTOM


def _ms(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def series_of(measurements: list[JSON]) -> list[Series]:
    """The numeric series in `measurements` (oldest first), by key, at most MAX_SERIES."""
    found: dict[str, Series] = {}
    for m in measurements:
        t = _ms(m.get("time"))
        if t is None:
            continue
        for frag, content in m.items():
            if frag in _NOT_SERIES or not isinstance(content, dict):
                continue
            for name, sv in content.items():
                if not isinstance(sv, dict):
                    continue
                v = _number(sv.get("value"))
                if v is None:
                    continue
                key = f"{frag}.{name}"
                s = found.get(key)
                if s is None:
                    if len(found) >= MAX_SERIES:
                        continue
                    s = found[key] = Series(frag, str(name))
                unit = sv.get("unit")
                if isinstance(unit, str) and unit:
                    s.unit = unit
                s.points.append(Point(t, v))
    out = sorted(found.values(), key=lambda s: s.key)
    for s in out:
        s.points.sort(key=lambda p: p.t)  # a device may send them out of order
        del s.points[:-MAX_POINTS]
    return out


def fmt(v: float) -> str:
    return f"{v:.6g}"


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _y_range(values: list[float]) -> tuple[float, float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = max(1.0, abs(hi) * 0.1)
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, 4)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


def _time_label(ms: int, with_date: bool) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def chart(s: Series, width: int = WIDTH, height: int = HEIGHT) -> Chart:
    """The layout of one series (it has at least one point)."""
    x0, y0, x1, y1 = LEFT, TOP, width - RIGHT, height - BOTTOM
    pts = s.points
    t_lo, t_hi = pts[0].t, pts[-1].t
    v_lo, v_hi, step = _y_range([p.v for p in pts])

    def x(t: int) -> float:
        if t_hi == t_lo:
            return (x0 + x1) / 2
        return x0 + (t - t_lo) * (x1 - x0) / (t_hi - t_lo)

    def y(v: float) -> float:
        return y1 - (v - v_lo) * (y1 - y0) / (v_hi - v_lo)

    coords = [(round(x(p.t), 1), round(y(p.v), 1)) for p in pts]
    path = "M" + " L".join(f"{cx:g} {cy:g}" for cx, cy in coords)
    with_date = t_hi - t_lo >= 86_400_000
    unit = f" {s.unit}" if s.unit else ""
    dots = [Dot(cx, cy, f"{_time_label(p.t, True)} UTC: {fmt(p.v)}{unit}")
            for (cx, cy), p in zip(coords[-MAX_DOTS:], pts[-MAX_DOTS:], strict=True)]
    y_ticks = []
    n = round((v_hi - v_lo) / step)
    for i in range(n + 1):
        v = v_lo + i * step
        y_ticks.append(Tick(round(y(v), 1), fmt(round(v, 10))))
    x_ticks = [Tick(x0, _time_label(t_lo, with_date))]
    if t_hi != t_lo:
        x_ticks.append(Tick(x1, _time_label(t_hi, with_date)))
    return Chart(s, width, height, path, dots, y_ticks, x_ticks, fmt(pts[-1].v) + unit)


def charts(measurements: list[JSON]) -> list[Chart]:
    """A chart per numeric series of `measurements` (oldest first)."""
    return [chart(s) for s in series_of(measurements) if s.points]
