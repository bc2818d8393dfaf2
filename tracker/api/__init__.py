"""The HTTP API (``tracker serve``): flux0-compatible session routes over a Tracker.

``app`` builds the Litestar app; ``auth`` checks bearer tokens; ``sessions`` and ``resets``
hold the routes; ``bodies`` decodes request bodies; ``views`` shapes responses; ``errors``
maps errors to statuses; ``ops`` and ``metrics`` serve health, readiness and Prometheus.
"""
