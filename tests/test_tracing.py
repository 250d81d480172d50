"""Traces that continue Herald's: gunicorn with 2 workers exporting to an OTLP/HTTP receiver on
loopback that decodes what arrives (opentelemetry-proto); a dead and a hanging collector."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import API_KEY, ROOT, SMTP_PASSWORD, free_port, send_json, unique_key, wait_for
from herald_smtp import ConfigError, load_config
from herald_smtp.tracing import parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(i, sampled=True):
    """A caller's (Herald's) traceparent: its own trace id and span id per request."""
    return f"00-{TRACE_ID[:-4]}{i:04x}-{i + 1:016x}-{'01' if sampled else '00'}"


class Collector:
    """An OTLP/HTTP receiver on loopback: keeps each request's raw bytes and its decoded spans."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)

        self.raw, self.spans, self.paths = [], [], []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.paths.append(self.path)
                collector.raw.append(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.spans.extend(_decode(request))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


def _decode(request):
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                yield {"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                       "name": s.name, "kind": s.kind, "trace_state": s.trace_state, "status": s.status.code,
                       "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                       "pid": resource.get("process.pid"), "service": resource.get("service.name")}


class Hanging:
    """A collector that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def log_lines(g):
    return [json.loads(line) for line in g.log_path.read_text().splitlines() if line.startswith("{")]


SENDS = 8
MAIL = {"to": "ines.secret-recipient@example.com", "subject": "Private subject line",
        "body": "Your code is 913370"}


def test_spans_continue_the_callers_trace_with_no_personal_data(gunicorn, make_server, collector):
    server = make_server(tls="starttls", auth=True)
    # A worker takes 2 connections at most (gunicorn's worker_connections), so 4 at once are on both.
    g = gunicorn(server.env(API_KEY=API_KEY, OTLP_ENABLED="true", OTLP_ENDPOINT=collector.url,
                            GUNICORN_CMD_ARGS="--worker-connections 2"), workers=2, threads=2)
    server.handler.reject_rcpt["nobody@example.com"] = "550 5.1.1 no such user"
    keys = [f"key-{i}-{unique_key()}" for i in range(SENDS)]
    auth = {"X-API-Key": API_KEY, "tracestate": "herald=t61rcWkgMzE"}

    def post(i, payload, key):
        return g.post(payload, key, headers={**auth, "traceparent": traceparent(i)})

    # Four mails held at DATA at once on 2 workers x 2 threads: both workers serve them.
    server.handler.data_gate = gate = threading.Event()
    with ThreadPoolExecutor(SENDS) as pool:
        sends = [pool.submit(post, i, MAIL | {"body": f"{MAIL['body']} {i}"}, keys[i]) for i in range(SENDS)]
        try:
            wait_for(lambda: len(server.handler.data_peers) == 4)
        finally:
            gate.set()
    assert [f.result()[0] for f in sends] == [200] * SENDS
    assert post(100, MAIL | {"body": f"{MAIL['body']} 0"}, keys[0])[1]["message_id"] == keys[0]  # replay
    assert post(101, MAIL, keys[1])[0] == 409
    assert post(102, MAIL | {"to": "nobody@example.com"}, keys[2] + "x")[0] == 400
    server.handler.data_reply = "451 4.3.0 try later"
    assert post(103, MAIL, keys[3] + "x")[0] == 503
    assert g.post(MAIL, headers={"traceparent": traceparent(104)})[0] == 401
    g.stop()  # graceful: each worker flushes its queued spans on the way out

    assert set(collector.paths) == {"/v1/traces"}
    spans = collector.spans
    by_trace = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    assert {s["service"] for s in spans} == {"herald-smtp"}
    assert len({s["pid"] for s in spans}) == 2, "each worker exports its own spans"

    def only(i, name):
        (span,) = [s for s in by_trace[traceparent(i).split("-")[1]] if s["name"] == name]
        return span

    SERVER, INTERNAL, CLIENT = 2, 1, 3  # span kinds
    for i in [*range(SENDS), 100, 101, 102, 103, 104]:
        trace = by_trace[traceparent(i).split("-")[1]]
        server_span = only(i, "POST /v1/send")
        assert server_span["kind"] == SERVER and server_span["parent"] == traceparent(i).split("-")[2]
        assert server_span["attributes"]["http.route"] == "/v1/send"
        if i == 104:  # refused before the view: no other span
            assert trace == [server_span]
            continue
        assert server_span["trace_state"] == "herald=t61rcWkgMzE"
        store = only(i, "idempotency")
        assert store["parent"] == server_span["span_id"] and store["kind"] == INTERNAL
        assert store["attributes"]["db.system.name"] == "sqlite"
        smtp = [s for s in trace if s["name"] == "smtp send"]
        assert all(s["parent"] == store["span_id"] and s["kind"] == CLIENT for s in smtp)
        assert len(trace) == 2 + len(smtp)
        if i < SENDS:  # reserved, sent, settled
            assert store["attributes"] == {"db.system.name": "sqlite", "herald_smtp.idempotency.outcome": "new",
                                           "herald_smtp.idempotency.state": "done"}
            assert smtp[0]["attributes"]["herald_smtp.smtp.outcome"] == "sent"
            assert smtp[0]["attributes"]["herald_smtp.smtp.message_bytes"] > 100
            assert smtp[0]["attributes"]["herald_smtp.smtp.relay"] == "primary"
            assert smtp[0]["attributes"]["herald_smtp.smtp.bytes_sent"] == \
                smtp[0]["attributes"]["herald_smtp.smtp.message_bytes"]
            # A reused session: MAIL, RCPT, DATA and the data, one wait each (no PIPELINING here);
            # a new one first waits for the greeting, EHLO, STARTTLS, EHLO again and AUTH.
            reused = smtp[0]["attributes"]["herald_smtp.smtp.reused"]
            assert smtp[0]["attributes"]["herald_smtp.smtp.round_trips"] == (4 if reused else 9)
            assert server_span["attributes"]["http.response.status_code"] == 200

    # More sends than the workers' four threads: some sessions were reused, and the span says which.
    assert {only(i, "smtp send")["attributes"]["herald_smtp.smtp.reused"] for i in range(SENDS)} == {True, False}
    assert only(100, "idempotency")["attributes"]["herald_smtp.idempotency.outcome"] == "replay"
    conflict = only(101, "idempotency")
    assert conflict["attributes"]["herald_smtp.idempotency.outcome"] == "conflict"
    assert conflict["attributes"]["error.type"] == "idempotency_conflict"
    assert only(101, "POST /v1/send")["attributes"]["error.type"] == "idempotency_conflict"
    rejected = only(102, "smtp send")
    assert rejected["attributes"]["herald_smtp.error_code"] == "invalid_destination"
    assert rejected["attributes"]["herald_smtp.smtp.relay"] == "primary"
    assert rejected["attributes"]["herald_smtp.smtp.outcome"] == "failed"
    deferred = only(103, "POST /v1/send")
    assert deferred["attributes"]["error.type"] == "provider_down" and deferred["status"] == 2  # ERROR
    assert only(103, "idempotency")["attributes"]["herald_smtp.idempotency.state"] == "failed"
    assert only(104, "POST /v1/send")["attributes"]["http.response.status_code"] == 401

    # Nothing personal or secret anywhere in what was exported, in any encoding the spans use.
    exported = b"".join(collector.raw)
    for secret in ["ines.secret-recipient", "Private subject", "913370", *keys, API_KEY, SMTP_PASSWORD,
                   "nobody@example.com"]:
        assert secret.encode() not in exported, secret

    # Every JSON line of a traced request names its trace and our server span, access lines too.
    lines = [line for line in log_lines(g) if line.get("trace_id")]
    for i in (0, 101, 103):
        server_span = only(i, "POST /v1/send")
        mine = [line for line in lines if line["trace_id"] == server_span["trace_id"]]
        # A sent mail writes one line, its access line with the send's fields; a failure writes two.
        assert {line["event"] for line in mine} >= {"access"} and len(mine) >= (1 if i == 0 else 2)
        assert i != 0 or mine[0]["outcome"] == "sent"
        assert {line["span_id"] for line in mine} == {server_span["span_id"]}


@pytest.mark.parametrize("peer", ["dead", "hanging"])
def test_an_unreachable_collector_changes_nothing_for_sends(gunicorn, smtp_server, peer):
    sink = Hanging() if peer == "hanging" else None
    endpoint = sink.url if sink else f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        # A small queue (the SDK's own settings), so 3 spans a request fill a batch and then the
        # queue while the export waits on the collector: spans are dropped, sends go on.
        g = gunicorn(smtp_server.env(OTLP_ENABLED="true", OTLP_ENDPOINT=endpoint, OTEL_BSP_MAX_QUEUE_SIZE="200",
                                     OTEL_BSP_MAX_EXPORT_BATCH_SIZE="50"), workers=2, threads=4)
        timings = []

        def send(i):
            started = time.monotonic()
            status, body = g.post({"to": f"u{i}@example.com", "body": "code"}, f"k{i}-{unique_key()}",
                                  headers={"traceparent": traceparent(i)})
            timings.append(time.monotonic() - started)
            return status

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(send, range(200)))
        assert statuses == [200] * 200
        assert len(smtp_server.messages) == 200
        # An export attempt lasts up to 5 s (OtlpTracing.EXPORT_TIMEOUT); no request waited for one.
        assert max(timings) < 2.0, sorted(timings)[-5:]
        stopping = time.monotonic()
        g.stop()
        print(f"{peer} collector: slowest send {max(timings):.3f} s, stop {time.monotonic() - stopping:.1f} s")
        assert time.monotonic() - stopping < 15  # the exit flush is bounded too
        # Spans were dropped, and the SDK said so in JSON lines, a few per worker, not one per span.
        sdk_lines = [line["event"] for line in log_lines(g) if line.get("logger", "").startswith("opentelemetry")]
        assert 1 <= sdk_lines.count("Queue full, dropping Span.") <= 2, sdk_lines
        assert len(sdk_lines) <= 2 * 4, sdk_lines
        assert not [line for line in g.log_path.read_text().splitlines()
                    if "opentelemetry" in line and not line.startswith("{")]
    finally:
        if sink:
            sink.close()


def test_export_off_logs_the_callers_ids_and_never_loads_the_sdk(tmp_path, smtp_server):
    script = (
        "import sys, json\n"
        "from herald_smtp import create_app\n"
        f"app = create_app({smtp_server.env(IDEMPOTENCY_STORE=f'sqlite:///{tmp_path}/i.sqlite3')!r})\n"
        "c = app.test_client()\n"
        f"r = c.post('/v1/send', json={{'to': 'a@example.com'}}, headers={{'traceparent': {traceparent(7)!r}}})\n"
        "assert r.status_code == 200, r.get_json()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []
    (sent,) = [json.loads(line) for line in out.stderr.splitlines() if '"event": "sent"' in line]
    assert (sent["trace_id"], sent["span_id"]) == (traceparent(7).split("-")[1], traceparent(7).split("-")[2])


def test_lines_of_a_request_without_trace_context_carry_no_ids(make_app, smtp_server, logs):
    client = make_app(smtp_server.env()).test_client()
    assert send_json(client, {"to": "a@example.com"}, traceparent=traceparent(1)).status_code == 200
    assert send_json(client, {"to": "a@example.com"}).status_code == 200
    first, second = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert first["trace_id"] == traceparent(1).split("-")[1]
    assert "trace_id" not in second and "span_id" not in second  # the previous request's ids are gone


IDS = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")


@pytest.mark.parametrize("header, ids", [
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", IDS),
    (" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00 ", IDS),  # not sampled: ids all the same
    ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future", IDS),  # a later version may add fields
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", None),  # version 00 has 4 fields
    ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),
    ("00-00000000000000000000000000000000-b7ad6b7169203331-01", None),
    ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", None),
    ("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", None),  # upper case is invalid
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", None),
    ("", None),
])
def test_traceparent_parsing(header, ids):
    assert parse_traceparent(header) == ids


def test_sdk_log_lines_are_rate_limited_per_message():
    from herald_smtp.tracing import _OncePerMinute

    once = _OncePerMinute()
    record = lambda msg: logging.LogRecord("opentelemetry.exporter", logging.ERROR, "x", 1, msg, None, None)
    passed = [once.filter(record(msg)) for msg in ["Failed to export %s", "Transient error %s"] * 50]
    assert passed == [True, True] + [False] * 98  # each message once, however they alternate
    once._last = {k: v - 61 for k, v in once._last.items()}  # a minute later
    assert once.filter(record("Failed to export %s"))


@pytest.mark.parametrize("raw, url", [
    ("http://otel-collector:4318", "http://otel-collector:4318/v1/traces"),  # Herald's example
    ("https://otel.example.com/", "https://otel.example.com/v1/traces"),
    ("otel-collector:4318", "http://otel-collector:4318/v1/traces"),  # host:port, as Herald's Go exporter takes it
    ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
    ("http://gateway/otlp", "http://gateway/otlp/v1/traces"),
])
def test_otlp_endpoint_forms(raw, url):
    cfg = load_config({"OTLP_ENABLED": "true", "OTLP_ENDPOINT": raw})
    assert (cfg.otlp_enabled, cfg.otlp_endpoint) == (True, url)


@pytest.mark.parametrize("env, error", [
    ({"OTLP_ENABLED": "true"}, "OTLP_ENABLED is true but OTLP_ENDPOINT is empty"),
    ({"OTLP_ENABLED": "maybe"}, "OTLP_ENABLED: expected true or false"),
    ({"OTLP_ENDPOINT": "ftp://collector:21"}, "OTLP_ENDPOINT: expected the collector's OTLP/HTTP URL"),
    ({"OTLP_ENDPOINT": "http://collector:99999"}, "OTLP_ENDPOINT: expected"),
    ({"OTLP_ENDPOINT": "http://:4318"}, "OTLP_ENDPOINT: expected"),
])
def test_bad_otlp_settings_stop_startup(env, error):
    with pytest.raises(ConfigError, match=error):
        load_config(env)


def test_tracing_is_off_by_default():
    cfg = load_config({})
    assert (cfg.otlp_enabled, cfg.otlp_endpoint) == (False, "")
