"""The SMTP server misbehaves at every step: the right error code, never a 200 for an unaccepted
mail, at most one copy on the server, and the next request on the same thread works once the
server is healthy again."""

import concurrent.futures
import time

import pytest

from conftest import CONTRACT_STATUS, send_json, unique_key

DEADLINE = 1  # timeout_seconds for the stall rows; SMTP_TIMEOUT_SECONDS stays at 10


def row(step, action, code, *marks):
    return pytest.param(step, action, code, id=f"{step}-{action.split()[0]}", marks=marks)


# Each row runs twice: command by command, and with MAIL, RCPT and DATA pipelined (RFC 2920).
FAULTS = [
    row("greeting", "close", "provider_down"),
    row("greeting", "421 4.3.2 shutting down", "provider_down"),
    row("greeting", "450 4.3.2 too busy", "provider_down"),
    row("greeting", "554 5.3.2 no SMTP service here", "provider_down"),
    row("greeting", "stall", "timeout"),
    row("ehlo", "close", "provider_down"),
    row("ehlo", "421 4.3.2 shutting down", "provider_down"),
    row("ehlo", "451 4.3.0 try again later", "provider_down"),
    row("ehlo", "554 5.7.1 not welcome", "send_failed"),
    row("ehlo", "stall", "timeout"),
    row("starttls", "close", "provider_down"),
    row("starttls", "plain", "provider_down"),  # says 220, then no TLS: the handshake fails
    row("starttls", "454 4.7.0 TLS not available", "provider_down"),
    row("starttls", "stall", "timeout"),
    row("auth", "close", "provider_down"),
    row("auth", "535 5.7.8 bad credentials", "send_failed"),
    row("auth", "454 4.7.0 temporary authentication failure", "provider_down"),
    row("auth", "stall", "timeout"),
    row("mail", "close", "provider_down"),
    row("mail", "421 4.3.2 shutting down", "provider_down"),
    row("mail", "451 4.3.0 try again later", "provider_down"),
    row("mail", "550 5.7.1 sender refused", "send_failed"),
    row("mail", "stall", "timeout"),
    row("rcpt", "close", "provider_down"),
    row("rcpt", "421 4.3.2 shutting down", "provider_down"),
    row("rcpt", "450 4.2.1 mailbox busy", "provider_down"),
    row("rcpt", "550 5.1.1 no such user", "invalid_destination"),
    row("rcpt", "stall", "timeout"),
    row("data", "close", "provider_down"),
    row("data", "421 4.3.2 shutting down", "provider_down"),
    row("data", "451 4.3.0 try again later", "provider_down"),
    row("data", "554 5.5.1 no valid recipients", "send_failed"),
    row("data", "stall", "timeout"),
    row("dot", "close", "send_failed"),  # the mail may have been taken: unknown, never retried
    row("dot", "421 4.3.2 shutting down", "provider_down"),
    row("dot", "452 4.3.1 insufficient storage", "provider_down"),
    row("dot", "554 5.6.0 content refused", "send_failed"),
    row("dot", "stall", "timeout"),
]


def _send(client, key, **extra):
    return send_json(client, {"to": "user@example.com", "subject": "Your code", "body": "123456", **extra}, key=key)


PIPELINING = pytest.mark.parametrize("pipelining", [False, True], ids=["stepwise", "pipelined"])


@PIPELINING
@pytest.mark.parametrize("step, action, code", FAULTS)
def test_fault_on_a_fresh_connection(fault_server, certs, make_app, step, action, code, pipelining):
    server = fault_server(certs=certs if step == "starttls" else None, auth=step == "auth", pipelining=pipelining)
    client = make_app(server.env(SMTP_TIMEOUT_SECONDS="10")).test_client()
    server.fault(step, action)
    key = unique_key()

    started = time.monotonic()
    r = _send(client, key, timeout_seconds=DEADLINE)
    elapsed = time.monotonic() - started

    assert (r.status_code, r.json["error_code"], r.json["ok"]) == (CONTRACT_STATUS[code], code, False)
    assert set(r.json) == {"ok", "error_code", "error_message"}
    assert server.accepted == [] and len(server.received) == (step == "dot")  # never a second copy
    if pipelining and step == "mail" and action[0] in "45" and not action.startswith("421"):
        assert "RCPT" in server.commands  # sent along with MAIL, before its reply: really pipelined
    if code == "timeout":
        assert elapsed < DEADLINE + 3  # Herald's own client deadline is not much longer than ours
    assert client.get("/healthz").status_code == 200

    server.heal()  # Herald's caller retries with the same key: a failure is not remembered
    r = _send(client, key)
    assert (r.status_code, r.json["message_id"]) == (200, key)
    assert len(server.accepted) == 1 and server.recipients == [["<user@example.com>"]]


# A cached session dies; before DATA it is retried once on a fresh one, after DATA never.
# step      what the server does      times  error_code (None: 200)  sessions  copies received
STALE = [
    ("idle", "421 4.4.2 idle too long", 1, None, 2, 2),
    ("mail", "close", 1, None, 2, 2),
    ("mail", "421 4.4.2 closing", 1, None, 2, 2),
    ("rcpt", "close", 1, None, 2, 2),
    ("data", "close", 1, None, 2, 2),
    ("mail", "close", None, "provider_down", 2, 1),  # the retry fails too: one retry only
    ("dot", "close", 1, "send_failed", 1, 2),  # the data was sent: no second copy
]


@PIPELINING
@pytest.mark.parametrize("step, action, times, code, sessions, received", STALE,
                         ids=[f"{s[0]}-{s[1].split()[0]}-{'once' if s[2] else 'always'}" for s in STALE])
def test_fault_on_a_cached_connection(fault_server, make_app, step, action, times, code, sessions, received,
                                      pipelining):
    server = fault_server(pipelining=pipelining)
    client = make_app(server.env()).test_client()
    assert _send(client, unique_key()).status_code == 200  # opens the session this thread keeps
    if step == "idle":
        server.kick(action)
        time.sleep(0.2)  # let the close reach the client
    else:
        server.fault(step, action, times)

    r = _send(client, unique_key())

    if code is None:
        assert r.status_code == 200
        assert len(server.accepted) == 2
    else:
        assert (r.status_code, r.json["error_code"]) == (CONTRACT_STATUS[code], code)
        assert len(server.accepted) == 1
    assert (server.sessions, len(server.received)) == (sessions, received)
    server.heal()
    assert _send(client, unique_key()).status_code == 200


def test_server_restart_while_workers_hold_idle_connections(make_server, gunicorn):
    smtp = make_server()
    service = gunicorn(smtp.env(), workers=2, threads=4)

    def burst(n):
        keys = [unique_key() for _ in range(n)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda k: service.post({"to": "user@example.com", "body": k}, key=k), keys))
        return keys, answers

    _, answers = burst(16)  # every worker thread that served one now holds an idle session
    assert [status for status, _ in answers] == [200] * 16
    smtp.stop()
    smtp.start()

    keys, answers = burst(16)

    assert [status for status, _ in answers] == [200] * 16
    delivered = [m.original_content.decode() for m in smtp.messages[16:]]
    assert len(delivered) == 16  # none lost, none twice
    assert all(sum(k in body for body in delivered) == 1 for k in keys)
