"""Prometheus metrics: requests and latency (Litestar's middleware, by route template and
status), commits appended, and the projector's lag per partition (read on each scrape).

Metrics live in the process: with ``tracker serve --workers N`` each worker counts its own
requests, and a scrape reaches one of them (set ``PROMETHEUS_MULTIPROC_DIR`` for
prometheus_client's multiprocess mode if one view is needed; the lag gauge is the same
from every worker).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tracker.errors import TrackerError

if TYPE_CHECKING:
    from tracker.api.context import Api

log = logging.getLogger("tracker.api")

COMMITS = Counter(
    "tracker_commits_appended", "Offset commits appended through PATCH /api/sessions/{id}"
)

PROMETHEUS = PrometheusConfig(
    app_name="tracker",
    prefix="tracker",
    group_path=True,
    exclude_unhandled_paths=True,
)
"""``tracker_requests_total`` and ``tracker_request_duration_seconds`` by method, route
template (``path``) and status."""


class LagCollector(Collector):
    """``tracker_projector_lag{partition}``: events in the log after the applied position."""

    def __init__(self) -> None:
        self.api: Api | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "tracker_projector_lag",
            "Events in the log not yet applied to Redis",
            labels=["partition"],
        )
        api = self.api
        if api is not None and api.tracker_ is not None:
            try:
                for part in api.tracker_.status().partitions:
                    gauge.add_metric([str(part.partition)], part.lag)
            except TrackerError as error:
                log.warning("projector lag not available: %s", error)
        yield gauge


LAG = LagCollector()
REGISTRY.register(LAG)


class Metrics(PrometheusController):
    """``GET /metrics``: Prometheus text."""

    path = "/metrics"
    include_in_schema = False
