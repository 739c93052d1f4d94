"""Line charts as inline SVG, drawn in Python: the report needs no script and no network to render."""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 360, 190
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 10, 26, 26  # plot margins: y labels left, title top, x labels bottom
MAX_POINTS = 2 * WIDTH  # more points than pixels draw nothing more


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def downsample(points: list[tuple[int, float]], buckets: int) -> list[tuple[int, float]]:
    """At most 2 x `buckets` points: the lowest and the highest of each run of consecutive points,
    so spikes (a diverging loss) stay visible."""
    if len(points) <= 2 * buckets:
        return points
    size = len(points) / buckets
    out = []
    for b in range(buckets):
        chunk = points[int(b * size):int((b + 1) * size)]
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out += sorted({lo, hi})
    return out


def line_chart(key: str, points: list[tuple[int, float]], *, marks: list[tuple[int, str]] = (),
               color: str = "#1f77b4") -> str:
    """An SVG chart of (step, value) points; non-finite values are left out (and counted), `marks`
    are (step, label) dashed vertical lines (resumes, restarts). Log scale for positive series
    spanning more than three decades."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    dropped = len(points) - len(finite)
    head = f'<svg class="chart" data-key="{escape(key)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" ' \
           f'height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img">'
    last = f" = {_fmt(finite[-1][1])} @ {finite[-1][0]}" if finite else ""
    title = f'<text x="{_LEFT}" y="16" class="title">{escape(key)}{escape(last)}</text>'
    if not finite:
        return f'{head}{title}<text x="{_LEFT}" y="{HEIGHT // 2}" class="note">no finite values</text></svg>'
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    log = lo > 0 and hi / lo > 1e3
    f = math.log10 if log else (lambda v: v)
    y0, y1 = f(lo), f(hi)
    if y0 == y1:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    s0, s1 = finite[0][0], finite[-1][0]
    span = (s1 - s0) or 1
    pw, ph = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def x(step):
        return _LEFT + (step - s0) / span * pw if s1 != s0 else _LEFT + pw / 2

    def y(v):
        return _TOP + (1 - (f(v) - y0) / (y1 - y0)) * ph

    parts = [head, title, f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" class="frame"/>']
    for frac in (0, 0.5, 1):  # y ticks: bottom, middle, top (in the plotted scale)
        value = y0 + frac * (y1 - y0)
        ty = _TOP + (1 - frac) * ph
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{ty:.1f}" y2="{ty:.1f}" class="grid"/>'
                     f'<text x="{_LEFT - 4}" y="{ty + 4:.1f}" class="tick" text-anchor="end">'
                     f'{_fmt(10 ** value if log else value)}</text>')
    parts.append(f'<text x="{_LEFT}" y="{HEIGHT - 8}" class="tick">{s0}</text>'
                 f'<text x="{_LEFT + pw}" y="{HEIGHT - 8}" class="tick" text-anchor="end">step {s1}</text>')
    notes = (["log scale"] if log else []) + ([f"{dropped} non-finite left out"] if dropped else [])
    if notes:
        parts.append(f'<text x="{_LEFT + pw}" y="16" class="note" text-anchor="end">{escape(", ".join(notes))}</text>')
    for step, label in marks:
        if s0 <= step <= s1:
            parts.append(f'<line x1="{x(step):.1f}" x2="{x(step):.1f}" y1="{_TOP}" y2="{_TOP + ph}" class="mark">'
                         f'<title>{escape(label)}</title></line>')
    shown = downsample(finite, pw)
    if len(shown) == 1:
        parts.append(f'<circle cx="{x(shown[0][0]):.1f}" cy="{y(shown[0][1]):.1f}" r="3" fill="{color}"/>')
    else:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in shown)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    return "".join(parts) + "</svg>"
