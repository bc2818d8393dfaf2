"""The projector's lag over the last minutes: sampled in the background, drawn as SVG.

Each server process samples ``Tracker.status()`` every ``TRACKER_API_LAG_SAMPLE``
seconds (default 5) while it runs and keeps the last ten minutes in memory: the status
page draws them as an inline SVG chart, so it needs no script and no external assets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from html import escape
from typing import NamedTuple

import anyio.to_thread

from tracker.errors import ConfigError
from tracker.status import Status

log = logging.getLogger("tracker.api")

SAMPLE_ENV = "TRACKER_API_LAG_SAMPLE"
KEEP_SECONDS = 600.0
WIDTH, HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


def sample_seconds(env: Mapping[str, str]) -> float:
    raw = env.get(SAMPLE_ENV) or "5"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 60:
        raise ConfigError(f"{SAMPLE_ENV}: expected seconds from 0.1 to 60, got {raw!r}")
    return value


class Sample(NamedTuple):
    at: float
    """``time.time()`` of the sample."""
    total: int
    partitions: tuple[int, ...]


class LagHistory:
    """The last ``KEEP_SECONDS`` of lag samples, one every ``interval`` seconds."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=math.ceil(KEEP_SECONDS / interval) + 1)

    def add(self, status: Status, at: float | None = None) -> None:
        at = time.time() if at is None else at
        self.samples.append(Sample(at, status.lag, tuple(p.lag for p in status.partitions)))

    async def run(self, read: Callable[[], Status]) -> None:
        """Sample (``read`` on a worker thread) until cancelled; a failed sample is logged
        and skipped."""
        while True:
            try:
                self.add(await anyio.to_thread.run_sync(read))
            except Exception as error:  # Redis or the log unavailable: try again later
                log.warning("lag sample failed: %s", error)
            await asyncio.sleep(self.interval)


def _points(values: list[tuple[float, int]], x0: float, span: float, top: int) -> str:
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    points = []
    for at, value in values:
        x = LEFT + (at - x0) / span * inner_w if span else LEFT + inner_w
        y = TOP + inner_h - value / top * inner_h
        points.append(f"{x:.1f},{y:.1f}")
    if len(points) == 1:  # one sample: a flat line across
        points.insert(0, f"{LEFT},{points[0].split(',')[1]}")
    return " ".join(points)


def _ago(seconds: float) -> str:
    return f"-{seconds / 60:.0f} min" if seconds >= 90 else f"-{seconds:.0f} s"


def lag_svg(samples: list[Sample], now: float | None = None) -> str:
    """An SVG chart of total lag (thick) and per-partition lag (thin, when several)."""
    if not samples:
        return '<p class="muted">No lag sample yet.</p>'
    now = time.time() if now is None else now
    x0, x1 = samples[0].at, samples[-1].at
    span = x1 - x0
    top = max(1, *(s.total for s in samples))
    base = HEIGHT - BOTTOM
    parts: list[str] = [
        f'<svg id="lag-chart" role="img" aria-label="projector lag" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">{top}</text>',
        f'<text x="{LEFT - 6}" y="{base}" text-anchor="end">0</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 8}">{escape(_ago(now - x0))}</text>',
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f"{escape(_ago(now - x1)) if now - x1 >= 1 else 'now'}</text>",
        f'<text x="{LEFT - 44}" y="{TOP + (base - TOP) // 2}" class="muted">events</text>',
    ]
    count = min(len(s.partitions) for s in samples)
    if count > 1:
        for p in range(count):
            values = [(s.at, s.partitions[p]) for s in samples]
            parts.append(
                f'<polyline class="partition" points="{_points(values, x0, span, top)}">'
                f"<title>partition {p}</title></polyline>"
            )
    totals = [(s.at, s.total) for s in samples]
    parts.append(
        f'<polyline class="total" points="{_points(totals, x0, span, top)}">'
        "<title>total lag</title></polyline>"
    )
    parts.append("</svg>")
    return "".join(parts)
