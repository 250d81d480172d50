"""End to end: gunicorn as a real process with the project's gunicorn.conf.py, sending to aiosmtpd."""

import http.client
import json

import pytest

from conftest import API_KEY, SMTP_PASSWORD, WorkerConnection, unique_key

TO = "grace@example.com"


def call(g, method, path, body=b"", headers=None):
    """Any request to the running service; returns (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post_json(payload, key_header=True, **headers):
    headers = {"Content-Type": "application/json", **({"X-API-Key": API_KEY} if key_header else {}), **headers}
    return "POST", "/v1/send", json.dumps(payload).encode(), headers


def test_a_send_arrives(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=2, threads=2)
    a, b = (WorkerConnection(g, pid) for pid in g.workers(2))
    key = unique_key()
    mail = {"to": TO, "subject": "Code", "body": "Your code is 123456"}
    status, body = a.post(mail, key=key, headers={"X-API-Key": API_KEY})
    assert (status, body) == (200, {"ok": True, "message_id": key, "provider": "smtp"})
    assert [m.rcpt_tos for m in smtp_server.messages] == [[TO]]
    assert smtp_server.parsed().get_content().startswith("Your code is 123456")
    # The same key again is replayed, not sent twice, by the other worker too.
    for worker in (b, a):
        assert worker.post(mail, key=key, headers={"X-API-Key": API_KEY}) == (200, body)
    assert len(smtp_server.messages) == 1


ROWS = [
    ("missing key", post_json({"to": TO}, key_header=False), 401, "unauthorized"),
    ("wrong key", post_json({"to": TO}, key_header=False, **{"X-API-Key": "nope"}), 401, "unauthorized"),
    ("not an object", post_json([TO]), 400, "invalid_request"),
    ("wrong type", post_json({"to": TO, "params": {"code": 1}}), 400, "invalid_request"),
    ("bad address", post_json({"to": "Grace <grace@example.com>"}), 400, "invalid_destination"),
    ("header injection", post_json({"to": TO, "subject": "a\r\nBcc: x@example.com"}), 400, "validation_failed"),
    ("too large", post_json({"to": TO, "body": "x" * 5000}), 413, "invalid_request"),
    ("not json", ("POST", "/v1/send", b"to=grace", {"Content-Type": "text/plain", "X-API-Key": API_KEY}),
     415, "invalid_request"),
    ("unknown route", ("GET", "/v2/nothing", b"", {}), 404, "not_found"),
    ("wrong method", ("GET", "/v1/send", b"", {"X-API-Key": API_KEY}), 405, "method_not_allowed"),
]


def test_error_rows_from_the_running_service(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY, HTTP_BODY_LIMIT_BYTES="4096"), workers=1, threads=2)
    got = {name: call(g, *request) for name, request, _, _ in ROWS}
    for name, _, status, code in ROWS:
        assert got[name][0] == status, (name, got[name])
        assert set(got[name][1]) == {"ok", "error_code", "error_message"}, name
        assert (got[name][1]["ok"], got[name][1]["error_code"]) == (False, code), name
    assert smtp_server.messages == []


def test_smtp_not_configured_is_503_from_the_running_service(gunicorn):
    g = gunicorn({"API_KEY": API_KEY}, workers=1, threads=2)
    status, body = call(g, *post_json({"to": TO, "body": "hi"}))
    assert (status, body["ok"], body["error_code"]) == (503, False, "provider_down")
    assert call(g, "GET", "/readyz")[0] == 503
    assert call(g, "GET", "/healthz") == (200, {"status": "healthy", "service": "herald-smtp"})


def test_access_log_is_json_without_query_string_or_headers(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(), workers=1, threads=2)
    call(g, "GET", "/healthz?token=query-marker-81", headers={"X-Custom": "header-marker-82",
                                                              "User-Agent": "agent-marker-83"})
    method, path, body, headers = post_json({"to": TO, "body": "hi"}, key_header=False, Referer="referer-marker-84")
    assert call(g, method, path + "?q=query-marker-85", body, headers)[0] == 200
    output = g.stop()
    access = [json.loads(line) for line in output.splitlines() if '"event": "access"' in line]
    # Before ours: the fixture's own /healthz polls while gunicorn started.
    assert [(a["method"], a["path"], int(a["status"])) for a in access[-2:]] == \
        [("GET", "/healthz", 200), ("POST", "/v1/send", 200)]
    assert "marker-8" not in output


@pytest.fixture
def secrecy_run(make_server, gunicorn):
    """A varied run (successes and failures) with known secrets; returns (output, responses)."""
    server = make_server(tls="starttls", auth=True)  # AUTH with SMTP_PASSWORD over STARTTLS
    server.handler.reject_rcpt["zq-refused-local@example.com"] = "550 5.1.1 no such user"
    g = gunicorn(server.env(API_KEY=API_KEY, LOG_LEVEL="debug"), workers=2, threads=2)
    mail = {"to": "zq-private-local@example.com", "subject": "subject-marker-5531", "body": "body-marker-7781",
            "params": {"code": "code-marker-9913"}}
    key = unique_key()
    requests = [
        post_json(mail, **{"Idempotency-Key": key}),
        post_json(mail, **{"Idempotency-Key": key}),  # replay
        post_json({**mail, "body": "body-marker-other"}, **{"Idempotency-Key": key}),  # 409
        post_json({**mail, "to": "zq-refused-local@example.com"}),  # 550 at RCPT
        post_json({**mail, "to": "zq-private-local@@example.com"}),  # invalid address
        post_json({**mail, "subject": "subject-marker-5531\r\nBcc: zq-private-local@example.com"}),
        post_json(mail, key_header=False, **{"X-API-Key": "wrong-key-marker-4410"}),
        post_json({**mail, "idempotency_key": "x" * 300}),
    ]
    responses = [call(g, *r) for r in requests]
    server.handler.data_reply = "554 5.7.1 body-marker-7781 refused"
    responses.append(call(g, *post_json(mail)))
    output = g.stop()
    assert [s for s, _ in responses] == [200, 200, 409, 400, 400, 400, 401, 400, 500]
    assert len(server.messages) == 1
    return output, json.dumps([b for _, b in responses])


def test_logs_and_responses_carry_no_secret_recipient_subject_or_body(secrecy_run):
    output, responses = secrecy_run
    # The run was logged: masked recipients and error codes are there.
    assert "***@example.com" in output and "idempotency_conflict" in output
    assert output.count('"event": "access"') >= 9
    for secret in (API_KEY, SMTP_PASSWORD, "wrong-key-marker", "zq-private-local", "zq-refused-local",
                   "subject-marker", "body-marker", "code-marker"):
        assert secret not in output, secret
        assert secret not in responses, secret
