"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client: every worker then writes its values to files there and GET /metrics adds
up all workers' files, whichever worker answers the scrape. Without it (tests, `flask run`)
the values live in this process. Labels only ever hold values we define (outcomes and
error codes), never a recipient, a key or any request text.
"""

import glob
import os
import time

from flask import g, has_request_context, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily

from .errors import STATUS

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
                                   "first send: replayed, conflict, or unsaved (sent, but the success was not "
                                   "recorded, or no replica confirmed it: a retry after the lease sends again).",
                                   ["result"], registry=r)
        self.unknown = Counter("herald_smtp_delivery_unknown", "Sends whose data went out but whose final "
                               "reply never came (connection lost, deadline passed): the server may have the "
                               "mail, and a retry sends another copy with the same Message-ID.", registry=r)
        self.evictions = Counter("herald_smtp_idempotency_evictions", "Settled idempotency records evicted "
                                 "to make room for new keys (IDEMPOTENCY_MAX_ENTRIES reached): each one shortens "
                                 "how long replays are remembered.", registry=r)
        self.relay_sends = Counter("herald_smtp_relay_sends", "Mails each SMTP relay accepted, by its position "
                                   "(primary, fallback-1, ...).", ["relay"], registry=r)
        self.relay_failures = Counter("herald_smtp_relay_failures", "Times a relay could not take a mail, by "
                                      "reason (unreachable, tls, no_starttls, auth, deferred, refused, timeout, lost, "
                                      "unknown: after the message went out).", ["relay", "reason"], registry=r)
        # livemax: a relay is in cool-down while any live worker skips it.
        self.relay_cooldown = Gauge("herald_smtp_relay_cooldown_until", "Unix time a relay's cool-down ends (it "
                                    "is skipped while another relay is available); 0 after a success. In cool-down "
                                    "while greater than time().", ["relay"], registry=r, multiprocess_mode="livemax")
        self._children = {}  # (metric, label values) -> its child; see _child
        self._store_age, self._ttl = None, None  # () -> age of the oldest remembered success; see watch_store
        # livesum: the sum over the workers alive now (a dead worker's sends are not in flight).
        self.in_flight = Gauge("herald_smtp_sends_in_flight", "POST /v1/send requests being handled now.",
                               registry=r, multiprocess_mode="livesum")
        # Series exist from the start, so rate() and alerts see a 0 before the first event.
        for outcome in ("sent", "replayed"):
            self.sends.labels(outcome, "")
            self.latency.labels(outcome)
        for kind in ("opened", "reused"):
            self.connections.labels(kind)
        for result in ("replayed", "conflict", "unsaved"):
            self.idempotency.labels(result)

    def send(self, outcome: str, seconds: float, unknown: bool = False) -> None:
        """`outcome`: "sent", "replayed" or an error_code; `unknown`: delivery is unknown."""
        if has_request_context():
            g.metrics_recorded = True
        if outcome in ("sent", "replayed"):
            kind, code = outcome, ""
        else:
            kind, code = "failed", outcome if outcome in STATUS else "send_failed"
        self._child(self.sends, kind, code).inc()
        self._child(self.latency, kind).observe(seconds)
        if unknown:
            self.unknown.inc()
        if outcome == "replayed":
            self.idempotency.labels("replayed").inc()
        elif outcome == "idempotency_conflict":
            self.idempotency.labels("conflict").inc()

    def unsaved(self) -> None:
        """A success the idempotency store did not record (or no replica confirmed)."""
        self.idempotency.labels("unsaved").inc()

    def _child(self, metric, *labels):
        """metric.labels(*labels), remembered: labels() validates and locks on every call, and
        every send takes three."""
        try:
            return self._children[metric, labels]
        except KeyError:
            return self._children.setdefault((metric, labels), metric.labels(*labels))

    def relay(self, name: str, sent: bool = False, failure: str = "", cooldown_until: float = None) -> None:
        """A relay took a mail (`sent`), or could not (`failure`: the reason); its cool-down's end."""
        sends = self._child(self.relay_sends, name)  # the series exists from the first call
        if sent:
            sends.inc()
        if failure:
            self.relay_failures.labels(name, failure).inc()
        if cooldown_until is not None:
            self.relay_cooldown.labels(name).set(cooldown_until)

    def connection(self, kind: str) -> None:
        """`kind`: "opened" or "reused"."""
        self._child(self.connections, kind).inc()

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

    def watch_store(self, oldest_success_age, ttl_seconds) -> None:
        """Report `oldest_success_age()` at every scrape: read from the shared store then, it is
        right whichever worker answers. `ttl_seconds`: how far back replays are meant to reach."""
        self._store_age, self._ttl = oldest_success_age, ttl_seconds

    def collect(self):
        """The store's gauges, read now (a prometheus_client custom collector)."""
        if self._store_age is None:
            return
        try:
            age = self._store_age()
        except Exception:
            age = None  # the store is unreachable: store_up says so, rather than a failed scrape
        yield GaugeMetricFamily("herald_smtp_idempotency_store_up", "1 when the idempotency store answered at "
                                "this scrape, 0 when it could not be read (then sends answer 503 provider_down, or "
                                "go out unprotected with IDEMPOTENCY_FAIL_OPEN).", value=0 if age is None else 1)
        yield GaugeMetricFamily("herald_smtp_idempotency_ttl_seconds", "IDEMPOTENCY_TTL_SECONDS: how long a success "
                                "is meant to be replayed.", value=self._ttl)
        if age is not None:
            yield GaugeMetricFamily("herald_smtp_idempotency_oldest_success_age_seconds",
                                    "Age of the oldest success still remembered for replay (0: none). About "
                                    "IDEMPOTENCY_TTL_SECONDS, unless evictions shorten the replay window.", value=age)

    def render(self):
        """(body, content type) of the Prometheus text exposition."""
        if self.multiprocess:
            registry = CollectorRegistry()
            _WorkerFiles(registry)
        else:
            registry = CollectorRegistry()
            registry.register(_Of(self.registry))
        registry.register(self)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _WorkerFiles(multiprocess.MultiProcessCollector):
    """Every process's file but those of 0 bytes: prometheus_client creates a process's file before
    it sizes it, and reading one then fails the whole scrape (client_python#1199); a worker killed
    in that moment leaves it so for good. Such a file holds nothing yet."""

    def collect(self):
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(name):
                    files.append(name)
            except OSError:  # removed meanwhile (mark_process_dead)
                pass
        return self.merge(files, accumulate=True)


class _Of:
    """A registry's samples as one collector, so a render can add the store's gauge beside them."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()
