"""herald-smtp against a real OpenSMTPD 6.8 (tests/opensmtpd_server.py): plain SMTP, DATA one
command at a time (it offers neither PIPELINING nor CHUNKING). Its per-session limit:
tests/test_mta_limits.py."""


import pytest

from conftest import send_json, unique_key
from mta import REFUSED, alive, codes, parse
from opensmtpd_server import TLS_BROKEN

TO = "ada.lovelace@example.com"




def test_a_plain_send_arrives_once(make_app, opensmtpd):
    client = make_app(opensmtpd.env()).test_client()
    key = unique_key()
    payload = {"to": TO, "subject": "Your code", "body": "Your code is 123456"}
    resp = send_json(client, payload, key=key)
    assert resp.status_code == 200, resp.get_json()
    assert send_json(client, payload, key=key).get_json() == resp.get_json()  # a replay, not a second mail
    [raw] = opensmtpd.messages()
    msg = parse(raw)
    assert msg["Delivered-To"] == TO and msg["Return-Path"] == "<noreply@example.com>"
    assert (msg["To"], msg["From"], msg["Subject"]) == (TO, "noreply@example.com", "Your code")
    assert msg.get_content().startswith("Your code is 123456")
    assert "by opensmtpd.herald.test (OpenSMTPD) with ESMTP" in msg["Received"]


def test_a_refused_recipient_leaves_the_session_usable(make_app, opensmtpd):
    client = make_app(opensmtpd.env()).test_client()
    resp = send_json(client, {"to": REFUSED, "body": "Your code is 123456"}, key=unique_key())
    assert resp.status_code == 400 and resp.get_json()["error_code"] == "invalid_destination"
    assert send_json(client, {"to": TO, "body": "Your code is 654321"}, key=unique_key()).status_code == 200
    assert codes(opensmtpd.messages()) == ["654321"]
    # The verb as the client wrote it (smtplib's rcpt() says "rcpt", a pipelined write "RCPT").
    assert f'command="rcpt to:<{REFUSED}>" result="550 invalid recipient' in opensmtpd.log().lower()
    assert opensmtpd.sessions() == 1


def test_starttls(make_app, make_opensmtpd):
    server = make_opensmtpd(tls=True)
    assert "starttls" in server.ehlo()
    if not server.tls_works():
        pytest.skip(TLS_BROKEN)
    client = make_app(server.env()).test_client()
    assert send_json(client, {"to": TO, "body": "Your code is 123456"}, key=unique_key()).status_code == 200
    assert codes(server.messages()) == ["123456"]


# -- the fixture itself ---------------------------------------------------------------


def test_the_fixture_offers_what_it_says(opensmtpd):
    assert set(opensmtpd.ehlo()) == {"8bitmime", "enhancedstatuscodes", "size", "dsn", "help"}


def test_stop_leaves_no_process_behind(make_app, make_opensmtpd):
    server = make_opensmtpd()
    app = make_app(server.env())
    assert send_json(app.test_client(), {"to": TO, "body": "x"}).status_code == 200
    server.wait_for_messages(1)
    pids = server.pids()  # the reaper and smtpd's privilege-separated processes
    assert len(pids) >= 6
    server.stop()
    assert alive(pids) == []  # zombies included: the reaper waited for every one
