"""Tracing: each request's W3C trace context in the logs, and OpenTelemetry spans when OTLP_ENABLED.

Off (the default) the OpenTelemetry SDK is never imported: the `traceparent` header is read by
hand, so log lines still carry the caller's trace_id and span_id. On, every request gets a server
span continuing the caller's trace, with child spans for the SMTP send and the idempotency store;
each worker queues finished spans and a background thread exports them in batches over OTLP/HTTP,
so a slow or dead collector costs dropped spans, never a slower or failed send.
Attributes hold codes, counts and flags only: never a recipient, subject, body, key or credential.
"""

import contextlib
import contextvars
import logging
import os
import re
import threading
import time

from flask import g, request

from . import logs
from .errors import SendError

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
ENVIRON_KEY = "herald_smtp.trace"  # the request's log ids, for the access log written after it

# Facts about a send only the transport knows, and the attributes they become.
SMTP_FACTS = {
    "relay": "herald_smtp.smtp.relay",  # the relay tried last, by position: primary, fallback-1, ...
    "round_trips": "herald_smtp.smtp.round_trips",  # replies waited for, connect to final reply
    "bytes_sent": "herald_smtp.smtp.bytes_sent",  # bytes written to the SMTP server
    "reused": "herald_smtp.smtp.reused",  # true when the send rode on a session already open
}
_smtp_span = contextvars.ContextVar("herald_smtp_smtp_span", default=None)


def note_smtp(**facts) -> None:
    """The transport's hook: set facts (SMTP_FACTS names) on the SMTP span of the send in
    progress; a no-op when tracing is off. The last value of each fact wins."""
    span = _smtp_span.get()
    if span is not None:
        for name, value in facts.items():
            span.set_attribute(SMTP_FACTS[name], value)


def parse_traceparent(value: str):
    """(trace_id, parent span id) of a valid W3C traceparent header, else None."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    return trace_id, span_id


def for_config(cfg):
    return OtlpTracing(cfg) if cfg.otlp_enabled else Tracing()


class Tracing:
    """Export off: the caller's trace_id and span_id on the request's log lines, nothing else."""

    def init_app(self, app) -> None:
        """Call before any other hook is registered, so every line of the request has the ids."""
        app.before_request(self._start)
        app.teardown_request(self._end)

    def _start(self):
        header = request.headers.get("traceparent")
        ids = parse_traceparent(header) if header else None
        if ids is not None:
            self._bind(*ids)

    @staticmethod
    def _bind(trace_id, span_id):
        g.trace_log = logs.bind_trace(trace_id, span_id)
        request.environ[ENVIRON_KEY] = logs.trace_fields()

    def _end(self, _exc):
        token = g.pop("trace_log", None)
        if token is not None:
            logs.unbind_trace(token)

    def smtp_span(self, message_bytes: int):
        return contextlib.nullcontext()

    def store_span(self):
        return contextlib.nullcontext()

    def wrap_store(self, store):
        return store

    def shutdown(self) -> None:
        pass


class OtlpTracing(Tracing):
    """Export on: spans through the SDK, batched per worker process."""

    EXPORT_TIMEOUT = 5.0  # seconds one export may take; only the exporting thread waits
    FLUSH_SECONDS = 3.0  # at worker exit, what is queued gets this long to go out

    def __init__(self, cfg):
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._context, self._trace = context, trace
        self._kind, self._status = trace.SpanKind, trace.Status
        self._error = trace.StatusCode.ERROR
        self._propagator = TraceContextTextMapPropagator()
        resource = Resource.create({"service.name": "herald-smtp", "process.pid": os.getpid()})
        # No exit hook of the SDK's own (it would wait up to 30 s): Service.close flushes, bounded.
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        # The processor's thread starts here, in the process that serves: gunicorn builds the app
        # in each worker after forking (and the SDK restarts the thread in a forked child).
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint,
                                                              timeout=self.EXPORT_TIMEOUT))
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("herald_smtp")
        _quiet_sdk_logs()

    def init_app(self, app) -> None:
        super().init_app(app)
        app.after_request(self._answered)

    def _start(self):
        parent = self._propagator.extract(request.headers)
        rule = request.url_rule
        attributes = {"http.request.method": request.method}
        if rule is not None:  # never the raw path: an unknown one is whatever the caller wrote
            attributes["http.route"] = rule.rule
        span = self._tracer.start_span(f"{request.method} {rule.rule}" if rule else request.method,
                                       context=parent, kind=self._kind.SERVER, attributes=attributes)
        g.trace_span = span
        g.trace_context = self._context.attach(self._trace.set_span_in_context(span, parent))
        ids = span.get_span_context()
        self._bind(format(ids.trace_id, "032x"), format(ids.span_id, "016x"))

    def _answered(self, response):
        span = g.get("trace_span")
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            if request_id := g.get("request_id"):
                span.set_attribute("herald_smtp.request_id", request_id)
            if response.status_code >= 400:
                code = (response.get_json(silent=True) or {}).get("error_code") or "send_failed"
                span.set_attribute("error.type", code)
                if response.status_code >= 500:  # a 4xx is the caller's error, not ours
                    span.set_status(self._status(self._error, code))
        return response

    def _end(self, exc):
        span, token = g.pop("trace_span", None), g.pop("trace_context", None)
        if span is not None:
            span.end()
            self._context.detach(token)
        super()._end(exc)

    @contextlib.contextmanager
    def _child(self, name, kind, attributes):
        # Exceptions are not recorded: their text can carry request data. The code says enough.
        with self._tracer.start_as_current_span(name, kind=kind, attributes=attributes,
                                                record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except SendError as err:
                self._failed(span, err.code)
                raise
            except Exception as err:
                self._failed(span, type(err).__name__)
                raise

    def _failed(self, span, code):
        span.set_attribute("error.type", code)
        span.set_status(self._status(self._error, code))

    @contextlib.contextmanager
    def smtp_span(self, message_bytes: int):
        with self._child("smtp send", self._kind.CLIENT, {"herald_smtp.smtp.message_bytes": message_bytes}) as span:
            token = _smtp_span.set(span)
            try:
                yield span
            except SendError as err:
                span.set_attributes({"herald_smtp.smtp.outcome": "failed", "herald_smtp.error_code": err.code})
                raise
            except Exception:
                span.set_attributes({"herald_smtp.smtp.outcome": "failed", "herald_smtp.error_code": "send_failed"})
                raise
            finally:
                _smtp_span.reset(token)
            span.set_attribute("herald_smtp.smtp.outcome", "sent")

    def store_span(self):
        """Around the idempotency store's work for a key: reserve, send (a child span), settle."""
        return self._child("idempotency", self._kind.INTERNAL, None)

    def wrap_store(self, store):
        return _TracedStore(store, self._trace.get_current_span)

    def shutdown(self) -> None:
        """Send what is queued, waiting FLUSH_SECONDS at most: a hanging collector must not hold
        a stopping worker (the SDK's own shutdown takes no time limit)."""
        flush = threading.Thread(target=self._provider.shutdown, name="herald-smtp-trace-flush", daemon=True)
        flush.start()
        flush.join(self.FLUSH_SECONDS)


class _TracedStore:
    """The idempotency store, telling the store span (the current one) what it decided."""

    def __init__(self, store, current_span):
        self._store, self._current_span = store, current_span
        self._system = type(store).__name__.removesuffix("Store").lower()

    def begin(self, key, fp, lease, deadline=None):
        outcome, rec, token = self._store.begin(key, fp, lease, deadline)
        self._current_span().set_attributes({"db.system.name": self._system,
                                             "herald_smtp.idempotency.outcome": outcome})
        return outcome, rec, token

    def complete(self, key, token, message_id, ttl, deadline=None):
        self._current_span().set_attribute("herald_smtp.idempotency.state", "done")
        return self._store.complete(key, token, message_id, ttl, deadline)

    def fail(self, key, token, code, message):
        self._current_span().set_attribute("herald_smtp.idempotency.state", "failed")
        return self._store.fail(key, token, code, message)

    def __getattr__(self, name):  # get, close, description: as the store has them
        return getattr(self._store, name)


class _OncePerMinute(logging.Filter):
    """The SDK logs every dropped span and failed export; one line a minute of each says enough."""

    def __init__(self):
        super().__init__()
        self._last = {}

    def filter(self, record):
        now, key = time.monotonic(), (record.name, record.msg)
        if now - self._last.get(key, -60.0) < 60.0:
            return False
        self._last[key] = now
        return True


def _quiet_sdk_logs() -> None:
    """The SDK's own warnings as JSON lines, rate-limited (once per process)."""
    logger = logging.getLogger("opentelemetry")
    if any(getattr(h, "herald_smtp", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(_OncePerMinute())
    handler.herald_smtp = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
