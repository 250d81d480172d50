"""POST /v1/send through the Flask test client against a real aiosmtpd server:
every row of the README's error table ("API"), the success shape, content fallbacks, probes."""

import socket
import threading
import time
import uuid

import pytest

from conftest import API_KEY, free_port, send_json, unique_key

TO = "alice.liddell@example.com"
OK = {"to": TO, "subject": "Your code", "body": "Your code is 123456"}


def assert_error(resp, status, code, *leaks):
    """The failure envelope, exactly, with a message that leaks none of `leaks`."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"ok", "error_code", "error_message"}
    assert body["ok"] is False
    assert body["error_code"] == code
    assert isinstance(body["error_message"], str) and body["error_message"]
    for leak in ("alice.liddell", "Traceback") + leaks:
        assert leak not in body["error_message"]
    return body


def assert_nothing_sent(server):
    assert server.messages == []


@pytest.fixture
def keyed(make_app, smtp_server):
    """A client for a service that requires X-API-Key (two keys: rotation)."""
    return make_app(smtp_server.env(API_KEY=f"{API_KEY},next-key-abcdef")).test_client()


# -- success -------------------------------------------------------------------------


def test_success_shape_with_key_returns_the_key_as_message_id(client, smtp_server):
    key = unique_key()
    resp = send_json(client, OK, key=key)
    assert resp.status_code == 200
    assert resp.get_json() == {"ok": True, "message_id": key, "provider": "smtp"}
    assert [m.rcpt_tos for m in smtp_server.messages] == [[TO]]


def test_key_in_body_is_the_message_id(client, smtp_server):
    key = unique_key()  # in the body only: no Idempotency-Key header
    resp = send_json(client, {**OK, "idempotency_key": key})
    assert resp.get_json() == {"ok": True, "message_id": key, "provider": "smtp"}
    assert send_json(client, {**OK, "idempotency_key": key}).get_json()["message_id"] == key  # replayed
    assert len(smtp_server.messages) == 1


def test_without_a_key_message_id_is_a_uuid(client, smtp_server):
    first = send_json(client, OK).get_json()["message_id"]
    second = send_json(client, OK).get_json()["message_id"]
    assert str(uuid.UUID(first)) == first and first != second
    assert len(smtp_server.messages) == 2


def test_herald_payload_with_unknown_fields_is_accepted(client, smtp_server):
    payload = {"channel": "email", "to": TO, "subject": "Code", "body": "", "params": {"code": "424242"},
               "template": "otp", "locale": "en", "timeout_seconds": 10, "something_new": [1, 2]}
    assert send_json(client, payload, key=unique_key()).status_code == 200


def body_text(server):
    return server.parsed().get_body(("plain",)).get_content()


def test_default_subject(client, smtp_server):
    assert send_json(client, {"to": TO, "body": "hi"}).status_code == 200
    assert smtp_server.parsed()["subject"] == "Verification code"


def test_body_from_params_code(client, smtp_server):
    assert send_json(client, {"to": TO, "params": {"code": "987654"}}).status_code == 200
    assert body_text(smtp_server).strip() == "Your verification code is: 987654"


def test_default_body(client, smtp_server):
    assert send_json(client, {"to": TO, "body": "", "params": {}}).status_code == 200
    assert body_text(smtp_server).strip() == "You have a verification message. Please check your code."


# -- probes and request ids --------------------------------------------------------------


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "healthy", "service": "herald-smtp"}


def test_readyz_when_configured(client):
    assert client.get("/readyz").status_code == 200


def test_readyz_when_not_configured(make_app):
    resp = make_app({}).test_client().get("/readyz")
    assert resp.status_code == 503


def test_probes_need_no_api_key(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200


def test_request_id_passed_through(client, logs):
    resp = send_json(client, OK, **{"X-Request-ID": "req-42.abc"})
    assert resp.headers["X-Request-ID"] == "req-42.abc"
    assert '"request_id": "req-42.abc"' in logs.getvalue()  # the operator can follow it into our logs


def test_request_id_generated_when_absent_or_unsafe(client):
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert generated
    unsafe = client.get("/healthz", headers={"X-Request-ID": "a b\tc{}"}).headers["X-Request-ID"]
    assert unsafe != "a b\tc{}" and unsafe
    # Failures carry one too, so an operator can find the log line.
    assert send_json(client, {}).headers["X-Request-ID"]


# -- 401 unauthorized --------------------------------------------------------------------


def test_missing_api_key_is_401(keyed, smtp_server):
    assert_error(send_json(keyed, OK), 401, "unauthorized", API_KEY)
    assert_nothing_sent(smtp_server)


def test_wrong_api_key_is_401(keyed, smtp_server):
    resp = send_json(keyed, OK, **{"X-API-Key": "wrong-key-guess"})
    assert_error(resp, 401, "unauthorized", API_KEY, "wrong-key-guess")
    assert_nothing_sent(smtp_server)


def test_both_rotated_keys_are_accepted(keyed, smtp_server):
    assert send_json(keyed, OK, **{"X-API-Key": API_KEY}).status_code == 200
    assert send_json(keyed, OK, **{"X-API-Key": "next-key-abcdef"}).status_code == 200
    assert len(smtp_server.messages) == 2


def test_api_key_checked_before_the_body(keyed, smtp_server):
    resp = keyed.post("/v1/send", data="not json", content_type="text/plain")
    assert_error(resp, 401, "unauthorized")


# -- 400, 413, 415: malformed requests --------------------------------------------------
# In one place, test_hostile.py: bodies that are not a JSON object, fields of the wrong type,
# bad UTF-8, keys over 256 bytes, `to` that is not exactly one address, control characters
# (validation_failed), bodies over the limit, Content-Types that are not JSON.


def test_header_and_body_keys_differ(client, smtp_server):
    resp = send_json(client, {**OK, "idempotency_key": "key-in-body"}, key="key-in-header")
    assert_error(resp, 400, "invalid_request")
    assert_nothing_sent(smtp_server)


# -- 400 invalid_destination -------------------------------------------------------------


def test_recipient_rejected_by_the_server(client, smtp_server):
    smtp_server.handler.reject_rcpt[TO] = "550 5.1.1 mailbox unavailable"
    assert_error(send_json(client, OK, key=unique_key()), 400, "invalid_destination", "127.0.0.1")
    assert_nothing_sent(smtp_server)


# -- 409, and 429 for a full idempotency store: test_idempotency.py, on every store -------


# -- 429 rate_limited --------------------------------------------------------------------


def test_concurrent_sends_beyond_the_limit_are_429(make_app, smtp_server):
    app = make_app(smtp_server.env(SMTP_MAX_CONCURRENT_SENDS="1"))
    smtp_server.handler.data_gate = threading.Event()  # the first send holds the only slot in DATA
    results = {}
    first = threading.Thread(target=lambda: results.update(first=send_json(app.test_client(), OK)))
    first.start()
    try:
        for _ in range(1000):
            if smtp_server.handler.data_peers:
                break
            time.sleep(0.01)
        assert smtp_server.handler.data_peers, "the first send never reached DATA"
        second = send_json(app.test_client(), {**OK, "to": "bob@example.com"})
    finally:
        smtp_server.handler.data_gate.set()
        first.join()
    assert_error(second, 429, "rate_limited")
    assert results["first"].status_code == 200
    assert [m.rcpt_tos for m in smtp_server.messages] == [[TO]]
    # The slot is released: the next send goes through.
    assert send_json(app.test_client(), OK).status_code == 200


# -- 503 provider_down -------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["SMTP_HOST", "SMTP_FROM"])
def test_smtp_not_configured_is_503(make_app, smtp_server, missing):
    client = make_app({k: v for k, v in smtp_server.env().items() if k != missing}).test_client()
    assert_error(send_json(client, OK, key=unique_key()), 503, "provider_down")
    assert smtp_server.sessions == 0


def test_server_port_closed_is_503(make_app):
    port = free_port()  # nothing listens there
    client = make_app({"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_FROM": "noreply@example.com",
                       "SMTP_USE_STARTTLS": "false"}).test_client()
    assert_error(send_json(client, OK), 503, "provider_down", "127.0.0.1", str(port))


@pytest.mark.parametrize("knob, reply", [
    ("mail_reply", "421 4.3.2 service shutting down"), ("mail_reply", "451 4.3.0 try again later"),
    ("data_reply", "451 4.3.0 queue full"), ("data_reply", "421 4.3.2 closing"),
])
def test_transient_reply_is_503(client, smtp_server, knob, reply):
    setattr(smtp_server.handler, knob, reply)
    assert_error(send_json(client, OK), 503, "provider_down", "127.0.0.1")
    assert_nothing_sent(smtp_server)


def test_greeting_421_is_503(make_app):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def refuse():
            conn, _ = listener.accept()
            conn.sendall(b"421 4.3.2 too busy\r\n")
            conn.close()

        t = threading.Thread(target=refuse, daemon=True)
        t.start()
        client = make_app({"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_FROM": "noreply@example.com",
                           "SMTP_USE_STARTTLS": "false"}).test_client()
        assert_error(send_json(client, OK), 503, "provider_down")
        t.join(5)


def test_failure_is_not_remembered_and_a_retry_sends(client, smtp_server):
    key = unique_key()
    smtp_server.handler.mail_reply = "451 4.3.0 try again later"
    assert_error(send_json(client, OK, key=key), 503, "provider_down")
    smtp_server.handler.mail_reply = None
    assert send_json(client, OK, key=key).get_json()["message_id"] == key
    assert len(smtp_server.messages) == 1


# -- 504 timeout -------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A socket that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener.getsockname()[1]
    listener.close()


def test_server_that_never_answers_is_504_within_the_deadline(make_app, silent_server):
    client = make_app({"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(silent_server), "SMTP_FROM": "noreply@example.com",
                       "SMTP_USE_STARTTLS": "false", "SMTP_TIMEOUT_SECONDS": "30"}).test_client()
    started = time.monotonic()
    resp = send_json(client, {**OK, "timeout_seconds": 1})
    elapsed = time.monotonic() - started
    assert_error(resp, 504, "timeout", "127.0.0.1")
    # The request's own deadline, not SMTP_TIMEOUT_SECONDS (30 s), bounds the wait.
    assert elapsed < 10


def test_server_that_stalls_after_data_is_504(make_app, smtp_server):
    client = make_app(smtp_server.env()).test_client()
    smtp_server.handler.data_delay = 5
    assert_error(send_json(client, {**OK, "timeout_seconds": 1}), 504, "timeout")


# -- 500 send_failed ---------------------------------------------------------------------


def test_auth_with_wrong_password_is_500(make_app, make_server):
    server = make_server(tls="starttls", auth=True)
    client = make_app(server.env(SMTP_PASSWORD="not-the-password")).test_client()
    body = assert_error(send_json(client, OK), 500, "send_failed", "not-the-password", "localhost")
    assert "authentication" in body["error_message"]
    assert_nothing_sent(server)


def test_permanent_reject_after_data_is_500(client, smtp_server):
    smtp_server.handler.data_reply = "554 5.7.1 message refused"
    assert_error(send_json(client, OK), 500, "send_failed", "127.0.0.1")
    assert_nothing_sent(smtp_server)


def test_permanent_reject_of_the_sender_is_500(client, smtp_server):
    smtp_server.handler.mail_reply = "553 5.7.1 sender not allowed"
    assert_error(send_json(client, OK), 500, "send_failed", "noreply")


# -- 404, 405 ----------------------------------------------------------------------------


def test_unknown_route_is_404(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.post("/v1/sendx", json=OK), 404, "not_found")


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_wrong_method_is_405(client, smtp_server, method):
    assert_error(getattr(client, method)("/v1/send"), 405, "method_not_allowed")
    assert_nothing_sent(smtp_server)


def test_wrong_method_on_probe_is_405(client):
    assert_error(client.post("/healthz"), 405, "method_not_allowed")
