"""A second relay (README "Fallback relays"): when the primary cannot take a mail before its data
goes out, the fallback delivers it, once, within the send's one deadline; after the data, never.
Through gunicorn, with two real SMTP servers on loopback."""

import time
import urllib.error
import urllib.request

import pytest

from conftest import SMTP_PASSWORD, free_port, json_lines, unique_key

MAIL = {"to": "user@example.com", "subject": "Your code", "body": "Your code is 424242"}
TIMEOUT = 4  # SMTP_TIMEOUT_SECONDS: a stalled primary gets half, the fallback the rest


def fallback_env(server, n=1):
    """SMTP_FALLBACK_<n>_* for an aiosmtpd SMTPServer (or FaultServer), from its own env()."""
    return {f"SMTP_FALLBACK_{n}_{k[len('SMTP_'):]}": v for k, v in server.env().items() if k != "SMTP_FROM"}


def service(gunicorn, primary_env, fallback, **extra):
    env = {**primary_env, **fallback_env(fallback), "SMTP_TIMEOUT_SECONDS": str(TIMEOUT), **extra}
    return gunicorn(env, workers=1, threads=4)


def timed_post(g, key=None, **extra):
    started = time.monotonic()
    status, body = g.post({**MAIL, **extra}, key or unique_key())
    return status, body, time.monotonic() - started


# How the primary fails, each before anything of the mail went out.
PRIMARY_DOWN = {
    "refusing connections": ({}, None),
    "421 at the greeting": ({}, ("greeting", "421 4.3.2 too busy, try later")),
    "TLS handshake failing": ({"tls": True}, ("starttls", "plain")),
    "stalling its greeting": ({}, ("greeting", "stall")),
    "refusing AUTH": ({"auth": True}, ("auth", "535 5.7.8 bad credentials")),
    "451 to MAIL": ({}, ("mail", "451 4.3.0 try again later")),
}


@pytest.mark.parametrize("how", PRIMARY_DOWN)
def test_a_mail_the_primary_cannot_take_is_delivered_once_by_the_fallback(gunicorn, fault_server, make_server, certs,
                                                                          how):
    options, fault = PRIMARY_DOWN[how]
    fallback = make_server()
    if fault is None:
        primary_env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_FROM": "noreply@example.com",
                       "SMTP_USE_STARTTLS": "false"}
    else:
        primary = fault_server(certs=certs if options.get("tls") else None, auth=options.get("auth", False))
        primary.fault(*fault)
        primary_env = primary.env()
    g = service(gunicorn, primary_env, fallback)

    status, body, elapsed = timed_post(g)

    assert (status, len(fallback.messages)) == (200, 1)
    assert elapsed < TIMEOUT + 0.5
    if fault is not None:
        assert primary.received == []
    log = json_lines(g.stop())
    assert [line["relay"] for line in log if line.get("outcome") == "sent"] == ["fallback-1"]  # its access line


def test_primary_dropping_the_connection_after_the_data_is_never_sent_through_the_fallback(gunicorn, fault_server,
                                                                                          make_server):
    primary, fallback = fault_server(), make_server()
    primary.fault("dot", "close")
    g = service(gunicorn, primary.env(), fallback)
    status, body, _ = timed_post(g)
    assert (status, body["error_code"]) == (500, "send_failed")
    assert len(primary.received) == 1 and fallback.messages == []


def test_a_refused_recipient_is_an_answer_about_the_address_not_the_relay(gunicorn, fault_server, make_server):
    primary, fallback = fault_server(), make_server()
    primary.fault("rcpt", "550 5.1.1 no such user")
    g = service(gunicorn, primary.env(), fallback)
    status, body, _ = timed_post(g)
    assert (status, body["error_code"]) == (400, "invalid_destination")
    assert fallback.messages == []


def test_a_failed_primary_sits_out_its_cool_down_then_is_used_again(gunicorn, fault_server, make_server):
    primary, fallback = fault_server(), make_server()
    g = service(gunicorn, primary.env(), fallback, SMTP_RELAY_COOLDOWN_SECONDS="2")
    primary.fault("greeting", "421 4.3.2 too busy")
    assert timed_post(g)[0] == 200
    sessions = primary.sessions
    for _ in range(3):  # within the cool-down the primary is not even tried
        assert timed_post(g)[0] == 200
    assert (primary.sessions, len(fallback.messages)) == (sessions, 4)
    metrics = g.metrics()
    assert metrics["herald_smtp_relay_cooldown_until{relay=primary}"] > time.time()
    assert metrics["herald_smtp_relay_failures_total{reason=deferred,relay=primary}"] == 1
    assert metrics["herald_smtp_relay_sends_total{relay=fallback-1}"] == 4

    primary.heal()
    time.sleep(2.2)
    assert timed_post(g)[0] == 200
    assert (len(primary.accepted), len(fallback.messages)) == (1, 4)  # back on the primary
    assert g.metrics()["herald_smtp_relay_cooldown_until{relay=primary}"] == 0


def test_every_relay_down_is_503_and_stalled_ones_answer_by_the_deadline(gunicorn, fault_server):
    closed = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_FROM": "noreply@example.com",
              "SMTP_USE_STARTTLS": "false", "SMTP_FALLBACK_1_HOST": "127.0.0.1",
              "SMTP_FALLBACK_1_PORT": str(free_port()), "SMTP_FALLBACK_1_USE_STARTTLS": "false"}
    g = gunicorn({**closed, "SMTP_TIMEOUT_SECONDS": str(TIMEOUT)}, workers=1, threads=2)
    status, body, elapsed = timed_post(g)
    assert (status, body["error_code"]) == (503, "provider_down") and elapsed < 1
    with urllib.request.urlopen(g.url + "/healthz") as resp:
        assert resp.status == 200
    try:
        urllib.request.urlopen(g.url + "/readyz")
        ready = 200
    except urllib.error.HTTPError as e:
        ready = e.code
    assert ready == 503  # every relay is in cool-down

    primary, fallback = fault_server(), fault_server()
    primary.fault("greeting", "stall")
    fallback.fault("greeting", "stall")
    g = service(gunicorn, primary.env(), fallback)
    status, body, elapsed = timed_post(g)
    assert (status, body["error_code"]) == (504, "timeout") and elapsed < TIMEOUT + 0.5


def test_the_fallbacks_credentials_appear_in_no_log_line_and_no_answer(gunicorn, fault_server, make_server):
    primary = fault_server()
    primary.fault("greeting", "421 4.3.2 too busy")
    fallback = make_server(tls="starttls", auth=True)
    g = service(gunicorn, primary.env(), fallback, LOG_LEVEL="debug")
    answers = [g.post(MAIL, unique_key()) for _ in range(2)]
    bad = service(gunicorn, primary.env(), fallback, SMTP_FALLBACK_1_PASSWORD="wrong-fallback-password-77")
    answers.append(bad.post(MAIL, unique_key()))
    output = g.stop() + bad.stop() + repr(answers)
    assert [status for status, _ in answers] == [200, 200, 500]
    assert answers[2][1]["error_message"] == \
        "SMTP authentication failed; check SMTP_FALLBACK_1_USER and SMTP_FALLBACK_1_PASSWORD"
    for secret in (SMTP_PASSWORD, "wrong-fallback-password-77"):
        assert secret not in output
