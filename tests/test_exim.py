"""herald-smtp against a real Exim 4.96 (tests/exim_server.py): PIPELINING and CHUNKING as Exim
offers them by default, STARTTLS with the test CA, AUTH after it; Exim without PIPELINING.
Exim's log says which path each mail took (K: BDAT, L: pipelined). Its per-session limit:
tests/test_mta_limits.py."""


import pytest

from conftest import API_KEY, SMTP_USER, send_json, unique_key, wait_for
from mta import REFUSED, alive, codes, parse

TO = "ada.lovelace@example.com"




def test_a_send_over_starttls_with_auth_arrives_once_by_pipelined_bdat(make_app, exim):
    client = make_app(exim.env()).test_client()
    key = unique_key()
    payload = {"to": TO, "subject": "Your code", "body": "Your code is 123456"}
    resp = send_json(client, payload, key=key)
    assert resp.status_code == 200, resp.get_json()
    assert send_json(client, payload, key=key).get_json() == resp.get_json()  # a replay, not a second mail

    [raw] = exim.messages()
    msg = parse(raw)
    # Exim's appendfile writes the envelope into the mail: Envelope-to and Return-path.
    assert msg["Envelope-to"] == TO and msg["Return-path"] == "<noreply@example.com>"
    assert (msg["To"], msg["From"], msg["Subject"]) == (TO, "noreply@example.com", "Your code")
    assert msg.get_content().startswith("Your code is 123456")
    assert "with esmtpsa" in msg["Received"] and "(TLS1.3)" in msg["Received"]  # STARTTLS, then AUTH
    assert exim.received() == [("bdat", True)]  # MAIL, RCPT and BDAT LAST in one write
    assert " A=plain:herald " in exim.log()


def test_a_wrong_password_is_send_failed_with_one_failed_login_per_send(make_app, exim):
    client = make_app(exim.env(SMTP_PASSWORD="not-the-password")).test_client()
    for _ in range(2):
        resp = send_json(client, {"to": TO, "body": "Your code is 123456"}, key=unique_key())
        assert resp.status_code == 500 and resp.get_json()["error_code"] == "send_failed"
        assert "not-the-password" not in resp.get_data(as_text=True)
    assert exim.messages() == []
    # One failed login at the provider per send, not one per mechanism (PLAIN, then LOGIN):
    # some providers lock an account after a few.
    wait_for(lambda: exim.log().count(" lost ") + exim.log().count("closed by QUIT") >= 2, timeout=5)
    failed = exim.failed_logins()
    assert len(failed) == 2 and all("plain authenticator failed" in line for line in failed), exim.log()
    assert f"(set_id={SMTP_USER})" in failed[0]


def test_a_refused_recipient_leaves_the_session_usable(make_app, exim):
    client = make_app(exim.env()).test_client()
    resp = send_json(client, {"to": REFUSED, "body": "Your code is 123456"}, key=unique_key())
    assert resp.status_code == 400 and resp.get_json()["error_code"] == "invalid_destination"
    assert send_json(client, {"to": TO, "body": "Your code is 654321"}, key=unique_key()).status_code == 200
    assert codes(exim.messages()) == ["654321"]
    assert "rejected RCPT <refused@example.com>: 5.7.1 refused" in exim.log()
    assert exim.sessions() == 1  # the refusal did not cost the session


def test_through_gunicorn_one_session_carries_every_mail(gunicorn, exim):
    g = gunicorn(exim.env(API_KEY=API_KEY), workers=1, threads=1)
    sent = [f"{n}{n}{n}{n}{n}{n}" for n in range(1, 6)]
    for code in sent:
        status, body = g.post({"to": TO, "body": f"Your code is {code}"}, key=unique_key(),
                              headers={"X-API-Key": API_KEY})
        assert (status, body["ok"]) == (200, True), body
    assert sorted(codes(exim.wait_for_messages(5))) == sent  # delivered side by side: any order
    assert exim.received() == [("bdat", True)] * 5  # pipelined BDAT, the path Exim's defaults give
    g.stop()
    wait_for(lambda: "closed by QUIT" in exim.log(), timeout=5)  # the worker said QUIT on its way out
    assert exim.sessions() == 1


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_without_pipelining_one_command_at_a_time(make_app, make_exim, chunking):
    """Exim enforces SMTP synchronization where it offers no PIPELINING: a client that sends ahead
    gets `554 SMTP synchronization error` and loses the session."""
    server = make_exim(tls=False, pipelining=False, chunking=chunking)
    client = make_app(server.env(SMTP_CHUNKING=str(chunking).lower())).test_client()
    for code in ("111111", "222222", "333333"):
        assert send_json(client, {"to": TO, "body": f"Your code is {code}"}, key=unique_key()).status_code == 200
    assert sorted(codes(server.wait_for_messages(3))) == ["111111", "222222", "333333"]
    assert server.received() == [("bdat" if chunking else "data", False)] * 3
    assert "synchronization error" not in server.log()
    assert server.sessions() == 1


# -- the fixture itself ---------------------------------------------------------------


def test_the_fixture_offers_what_it_says(exim, make_exim):
    offered = exim.ehlo()
    assert {"pipelining", "chunking", "starttls"} <= offered.keys()
    assert "auth" not in offered  # AUTH only after STARTTLS
    secured = exim.ehlo(tls=True)
    assert {"pipelining", "chunking"} <= secured.keys() and secured["auth"].split() == ["PLAIN", "LOGIN"]
    bare = make_exim(tls=False, pipelining=False, chunking=False).ehlo()
    assert not {"pipelining", "chunking", "starttls", "auth"} & bare.keys()


def test_stop_leaves_no_process_behind(make_app, make_exim):
    server = make_exim(tls=False)
    app = make_app(server.env())
    assert send_json(app.test_client(), {"to": TO, "body": "x"}).status_code == 200
    server.wait_for_messages(1)
    pids = server.pids()  # the reaper, the daemon, the session the app keeps open
    assert len(pids) >= 3
    server.stop()  # Exim's daemon leaves its sessions running: the reaper ends them
    assert alive(pids) == []  # zombies included: the reaper waited for every one
