"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client: every worker then writes its values to files there and GET /metrics adds
up all workers' files, whichever worker answers the scrape. Without it (tests, `flask run`)
the values live in this process. Labels only ever hold values we define (outcomes and
error codes), never a recipient, a key or any request text.
"""

import os
import time

from flask import g, has_request_context, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)

from .errors import STATUS
from .tracing import note_smtp

# Sends are bounded by SMTP_TIMEOUT_SECONDS (30 by default); replays answer in milliseconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One per app (per worker): the app calls `send` and the transport calls `connection`."""

    def __init__(self):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if self.multiprocess:
            os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        # A registry per app, so several apps in one process (tests) never collide.
        self.registry = r = CollectorRegistry()
        self.sends = Counter("herald_smtp_sends", "POST /v1/send answers by outcome (sent, replayed, "
                             "failed) and error_code (empty unless failed).", ["outcome", "error_code"], registry=r)
        self.latency = Histogram("herald_smtp_send_duration_seconds", "Time to answer POST /v1/send, "
                                 "by outcome.", ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.connections = Counter("herald_smtp_smtp_connections", "SMTP sessions opened, and sends "
                                   "carried by a session that was already open (reused).", ["kind"], registry=r)
        self.idempotency = Counter("herald_smtp_idempotency", "Idempotency-Key outcomes other than a "
                                   "first send: replayed or conflict.", ["result"], registry=r)
        # livesum: the sum over the workers alive now (a dead worker's sends are not in flight).
        self.in_flight = Gauge("herald_smtp_sends_in_flight", "POST /v1/send requests being handled now.",
                               registry=r, multiprocess_mode="livesum")
        # Series exist from the start, so rate() and alerts see a 0 before the first event.
        for outcome in ("sent", "replayed"):
            self.sends.labels(outcome, "")
            self.latency.labels(outcome)
        for kind in ("opened", "reused"):
            self.connections.labels(kind)
        for result in ("replayed", "conflict"):
            self.idempotency.labels(result)

    def send(self, outcome: str, seconds: float) -> None:
        """`outcome`: "sent", "replayed" or an error_code."""
        if has_request_context():
            g.metrics_recorded = True
        if outcome in ("sent", "replayed"):
            kind, code = outcome, ""
        else:
            kind, code = "failed", outcome if outcome in STATUS else "send_failed"
        self.sends.labels(kind, code).inc()
        self.latency.labels(kind).observe(seconds)
        if outcome == "replayed":
            self.idempotency.labels("replayed").inc()
        elif outcome == "idempotency_conflict":
            self.idempotency.labels("conflict").inc()

    def connection(self, kind: str) -> None:
        """`kind`: "opened" or "reused"."""
        self.connections.labels(kind).inc()
        note_smtp(reused=kind == "reused")  # the send's span (tracing on) learns it too

    def init_app(self, app) -> None:
        """Count POST /v1/send requests while they are handled, and the answers the view
        never reached (401 from the API key check, 413 from the body limit)."""

        @app.before_request
        def _in_flight_start():
            if request.endpoint == "api.send":
                self.in_flight.inc()
                g.metrics_in_flight = True
                g.metrics_started = time.monotonic()

        @app.after_request
        def _count_unrecorded(response):
            if g.get("metrics_in_flight") and not g.get("metrics_recorded"):
                code = (response.get_json(silent=True) or {}).get("error_code") or "send_failed"
                self.send(code, time.monotonic() - g.metrics_started)
            return response

        @app.teardown_request
        def _in_flight_end(_exc):
            if g.pop("metrics_in_flight", False):
                self.in_flight.dec()

    def render(self):
        """(body, content type) of the Prometheus text exposition."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST
