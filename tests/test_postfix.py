"""herald-smtp against a real Postfix smtpd (tests/postfix_server.py): STARTTLS with the test CA,
AUTH after it, PIPELINING and CHUNKING offered, delivery to a private Maildir."""

import email
import email.policy

import pytest

from conftest import API_KEY, SMTP_USER, send_json, unique_key, wait_for
from mta import alive
from postfix_server import REFUSED

TO = "ada.lovelace@example.com"


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_a_send_over_starttls_with_auth_arrives_once(make_app, postfix):
    client = make_app(postfix.env()).test_client()
    key = unique_key()
    payload = {"to": TO, "subject": "Your code", "body": "Your code is 123456"}
    resp = send_json(client, payload, key=key)
    assert resp.status_code == 200, resp.get_json()
    assert send_json(client, payload, key=key).get_json() == resp.get_json()  # a replay, not a second mail

    [raw] = postfix.messages()
    msg = parse(raw)
    # virtual(8) writes the envelope into the mail: recipient as Delivered-To, sender as Return-Path.
    assert msg["Delivered-To"] == TO and msg["Return-Path"] == "<noreply@example.com>"
    assert (msg["To"], msg["From"], msg["Subject"]) == (TO, "noreply@example.com", "Your code")
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Message-ID"].endswith("@example.com>")
    assert msg.get_content().startswith("Your code is 123456")
    received = msg["Received"]  # Postfix's own record of how the mail came in
    assert "using TLS" in received and f"(Authenticated sender: {SMTP_USER}@" in received
    assert "with ESMTPSA" in received


def test_a_wrong_password_is_send_failed_and_delivers_nothing(make_app, postfix):
    client = make_app(postfix.env(SMTP_PASSWORD="not-the-password")).test_client()
    resp = send_json(client, {"to": TO, "body": "Your code is 123456"}, key=unique_key())
    assert resp.status_code == 500 and resp.get_json()["error_code"] == "send_failed"
    assert "not-the-password" not in resp.get_data(as_text=True)
    assert postfix.messages() == []
    wait_for(lambda: "SASL PLAIN authentication failed" in postfix.log(), timeout=5)  # refused at AUTH
    # One failed login at the provider, not one per mechanism (PLAIN, then LOGIN): some lock accounts.
    wait_for(lambda: "disconnect" in postfix.log(), timeout=5)
    assert "SASL LOGIN authentication failed" not in postfix.log() and "auth=0/1" in postfix.log()


def test_a_recipient_refused_at_rcpt_is_invalid_destination(make_app, postfix):
    client = make_app(postfix.env()).test_client()
    resp = send_json(client, {"to": REFUSED, "body": "Your code is 123456"}, key=unique_key())
    assert resp.status_code == 400 and resp.get_json()["error_code"] == "invalid_destination"
    assert postfix.messages() == []
    # The refused RCPT left the session clean: the next mail on it goes through.
    assert send_json(client, {"to": TO, "body": "Your code is 654321"}, key=unique_key()).status_code == 200
    [raw] = postfix.messages()
    assert parse(raw)["Delivered-To"] == TO
    wait_for(lambda: f"reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <{REFUSED}>" in postfix.log(), timeout=5)


def test_a_russian_subject_and_body_arrive_intact(make_app, postfix):
    subject = "Ваш код подтверждения — вход в «Геральд»"
    body = "Здравствуйте!\n\nВаш код: 482916. Никому его не сообщайте.\nЁлки, щи, ъ — всё на месте."
    client = make_app(postfix.env()).test_client()
    assert send_json(client, {"to": TO, "subject": subject, "body": body}, key=unique_key()).status_code == 200
    [raw] = postfix.messages()
    raw.decode("ascii")  # went as 7-bit MIME, as message.py promises
    msg = parse(raw)
    assert msg["Subject"] == subject
    assert msg.get_content().replace("\r\n", "\n").rstrip("\n") == body  # text in canonical CRLF form


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_through_gunicorn_one_session_carries_both_mails_and_quits(gunicorn, postfix, make_postfix, chunking):
    postfix = postfix if chunking else make_postfix(auth=True, chunking=False)
    g = gunicorn(postfix.env(API_KEY=API_KEY), workers=1, threads=1)
    for code in ("111111", "222222"):
        status, body = g.post({"to": TO, "body": f"Your code is {code}"}, key=unique_key(),
                              headers={"X-API-Key": API_KEY})
        assert (status, body["ok"]) == (200, True), body
    raws = postfix.wait_for_messages(2)
    assert [parse(r).get_content().split()[-1] for r in raws] == ["111111", "222222"]
    g.stop()
    # The worker reused one session (MAIL, RCPT and BDAT LAST, or MAIL, RCPT, DATA, pipelined),
    # then said QUIT on its way out.
    wait_for(lambda: "quit=1" in postfix.log(), timeout=5)
    [session] = [line for line in postfix.log().splitlines() if "auth=1" in line and "disconnect" in line]
    assert f"ehlo=2 starttls=1 auth=1 mail=2 rcpt=2 {'bdat' if chunking else 'data'}=2 quit=1" in session


# -- the fixture itself ---------------------------------------------------------------


def test_the_fixture_offers_what_it_says(postfix, make_postfix):
    assert {"pipelining", "chunking", "starttls"} <= postfix.ehlo(tls=False).keys()
    assert "auth" not in postfix.ehlo(tls=False).keys()  # AUTH only after STARTTLS
    assert {"pipelining", "chunking", "auth"} <= postfix.ehlo(tls=True).keys()
    plain = make_postfix(chunking=False)
    assert "chunking" not in plain.ehlo(tls=True).keys() and "pipelining" in plain.ehlo(tls=True).keys()


def test_stop_leaves_no_process_behind(make_app, make_postfix):
    server = make_postfix(auth=True)
    assert send_json(make_app(server.env()).test_client(), {"to": TO, "body": "x"}).status_code == 200
    server.wait_for_messages(1)
    pids = server.pids()  # master, qmgr, postlogd, smtpd, cleanup, virtual, ...
    assert len(pids) >= 6
    server.stop()
    assert alive(pids) == []  # zombies included: the reaper waited for every one


def test_postfix_as_the_fallback_takes_what_the_primary_defers(gunicorn, postfix, fault_server):
    primary = fault_server()
    primary.fault("mail", "451 4.3.0 try again later")
    fallback = {f"SMTP_FALLBACK_1_{k[len('SMTP_'):]}": v for k, v in postfix.env().items() if k != "SMTP_FROM"}
    g = gunicorn({**primary.env(), **fallback, "API_KEY": API_KEY}, workers=1, threads=2)
    status, body = g.post({"to": TO, "body": "Your code is 333333"}, key=unique_key(), headers={"X-API-Key": API_KEY})
    assert (status, body["ok"]) == (200, True), body
    [raw] = postfix.wait_for_messages(1)
    assert parse(raw).get_content().split()[-1] == "333333"
    assert primary.accepted == [] and "BDAT" not in primary.commands
    output = g.stop()
    assert '"relay": "fallback-1"' in output and postfix.env()["SMTP_PASSWORD"] not in output
