"""Known secrets and a recognisable recipient go through every kind of outcome; none of them may
appear in a log line (ours at debug level, or gunicorn's) or in any response."""

import json

import pytest

from conftest import SMTP_PASSWORD, send_json, unique_key

API_KEY = "api-key-SECRET-5f0c1e"
WRONG_API_KEY = "api-key-WRONG-77aa90"
WRONG_PASSWORD = "smtp-password-WRONG-31d4"
LOCAL = "zz-person-4823"  # the recipient's local part: identifies a person
TO = f"{LOCAL}@example.com"
SUBJECT, BODY = "subject-MARKER-9c2e", "body-MARKER-b41f"
NEVER = [API_KEY, WRONG_API_KEY, SMTP_PASSWORD, WRONG_PASSWORD, LOCAL, SUBJECT, BODY]


def mail(**extra):
    return {"to": TO, "subject": SUBJECT, "body": BODY, **extra}


def _post(client, payload, api_key=API_KEY, **kw):
    return send_json(client, payload, **{"X-API-Key": api_key}, **kw)


# label: (environment extras, Handler knobs, request, the status it gets)
CASES = {
    "sent (AUTH over STARTTLS)": ({}, {}, lambda c: _post(c, mail(), key=unique_key()), 200),
    "unauthorized": ({}, {}, lambda c: _post(c, mail(), api_key=WRONG_API_KEY), 401),
    "not json": ({}, {}, lambda c: c.post("/v1/send", data=f"{TO} {SUBJECT} {API_KEY}", content_type="application/json",
                                          headers={"X-API-Key": API_KEY}), 400),
    "wrong type": ({}, {}, lambda c: _post(c, mail(params={"code": [BODY]})), 400),
    "not one address": ({}, {}, lambda c: _post(c, mail(to=f"{TO}, {LOCAL}@example.org")), 400),
    "control character": ({}, {}, lambda c: _post(c, mail(to=f"{TO}\r\n{LOCAL}", subject=f"{SUBJECT}\r\nX: y")), 400),
    "too large": ({"HTTP_BODY_LIMIT_BYTES": "200"}, {}, lambda c: _post(c, mail(html=BODY * 20)), 413),
    "not JSON type": ({}, {}, lambda c: c.post("/v1/send", data=json.dumps(mail()), content_type="text/plain",
                                               headers={"X-API-Key": API_KEY}), 415),
    "conflict": ({}, {}, lambda c: [_post(c, mail(), key="k-1"), _post(c, mail(body=BODY + "2"), key="k-1")][-1], 409),
    "recipient refused (5xx at RCPT)": ({}, {"reject_rcpt": {TO: "550 5.1.1 <%s> no such user" % TO}},
                                        lambda c: _post(c, mail()), 400),
    "deferred (4xx)": ({}, {"mail_reply": "451 4.3.0 try later"}, lambda c: _post(c, mail()), 503),
    "unreachable": ({"SMTP_PORT": "1"}, {}, lambda c: _post(c, mail()), 503),
    "timeout": ({}, {"data_delay": 2}, lambda c: _post(c, mail(timeout_seconds=1)), 504),
    "authentication failed": ({"SMTP_PASSWORD": WRONG_PASSWORD}, {}, lambda c: _post(c, mail()), 500),
    "message refused (5xx)": ({}, {"data_reply": f"554 5.6.0 {LOCAL} refused"}, lambda c: _post(c, mail()), 500),
    "no such route": ({}, {}, lambda c: c.post(f"/v1/{LOCAL}", headers={"X-API-Key": API_KEY}), 404),
}


@pytest.fixture
def auth_server(make_server):
    return make_server(tls="starttls", auth=True)


def assert_nothing_leaks(*texts):
    for text in texts:
        for secret in NEVER:
            assert secret not in text, secret


@pytest.mark.parametrize("label", CASES)
def test_no_secret_or_recipient_in_logs_or_answers(make_app, auth_server, logs, label):
    env, knobs, request, status = CASES[label]
    for name, value in knobs.items():
        setattr(auth_server.handler, name, value)
    client = make_app(auth_server.env(API_KEY=f"{API_KEY},other-key", LOG_LEVEL="debug", **env)).test_client()
    r = request(client)
    assert r.status_code == status
    if status == 200:
        assert auth_server.messages[-1].rcpt_tos == [TO]  # it really went out, authenticated
        assert '"to": "***@example.com"' in logs.getvalue()  # logged, masked
    assert_nothing_leaks(logs.getvalue(), r.get_data(as_text=True), str(r.headers))


def test_no_secret_or_recipient_in_gunicorn_output(auth_server, gunicorn):
    service = gunicorn(auth_server.env(API_KEY=API_KEY, LOG_LEVEL="debug"))
    wrong = gunicorn(auth_server.env(API_KEY=API_KEY, SMTP_PASSWORD=WRONG_PASSWORD, LOG_LEVEL="debug"))
    answers = [
        service.post(mail(), key=unique_key(), headers={"X-API-Key": API_KEY}),
        service.post(mail(), headers={"X-API-Key": WRONG_API_KEY}),
        service.post(mail(to=f"{TO}, {LOCAL}@example.org"), headers={"X-API-Key": API_KEY}),
        service.post(mail(subject=f"{SUBJECT}\nX: y"), headers={"X-API-Key": API_KEY}),
        wrong.post(mail(), headers={"X-API-Key": API_KEY}),
    ]
    auth_server.handler.mail_reply = "451 4.3.0 try later"
    answers.append(service.post(mail(), headers={"X-API-Key": API_KEY}))

    assert [status for status, _ in answers] == [200, 401, 400, 400, 500, 503]
    output = service.stop() + wrong.stop()
    assert '"event": "access"' in output and '"to": "***@example.com"' in output
    assert_nothing_leaks(output, json.dumps(answers))
