"""The SMTP transport against real aiosmtpd servers: TLS modes with verification on, AUTH,
connection reuse and its bounds, servers that drop or restart, and clean shutdown."""

import socket
import threading
import time

import pytest
import trustme

from conftest import Certs, send_json, unique_key

TO = "dora@example.com"
# aiosmtpd cannot see implicit TLS, and one test wants AUTH offered in clear on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


def send(client, to=TO, **fields):
    return send_json(client, {"to": to, "subject": "Code", "body": "Your code is 123456", **fields}, key=unique_key())


def record(server, command):
    """Count a command the server receives (aiosmtpd handler hook; set before connecting)."""
    seen = []
    original = getattr(server.handler, f"handle_{command}", None)

    async def hook(srv, session, envelope, *args):
        seen.append(args)
        if original is not None:
            return await original(srv, session, envelope, *args)
        return "535 5.7.8 refused" if command == "AUTH" else "221 Bye"

    setattr(server.handler, f"handle_{command}", hook)
    return seen


# -- TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_tls_with_verification_on(make_server, make_app, tls):
    server = make_server(tls=tls)
    env = server.env()
    assert "SMTP_SKIP_TLS_VERIFY" not in env  # verification on: the default
    resp = send(make_app(env).test_client())
    assert resp.status_code == 200, resp.get_json()
    assert [m.rcpt_tos for m in server.messages] == [[TO]]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_certificate_from_an_unknown_ca_is_503(make_server, make_app, tmp_path, tls):
    server = make_server(tls=tls)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    resp = send(make_app(server.env(SMTP_CA_FILE=str(other_ca))).test_client())
    assert resp.status_code == 503
    assert resp.get_json()["error_code"] == "provider_down"
    assert "localhost" not in resp.get_json()["error_message"]
    assert server.messages == []


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_ca_file_adds_to_the_system_cas(make_server, make_app, certs, tmp_path, monkeypatch, tls):
    # OpenSSL's default paths honour SSL_CERT_FILE: a temporary bundle stands in for the system's.
    public = Certs(tmp_path)  # a CA only the "system" store knows
    private_relay, public_relay = make_server(tls=tls), make_server(tls=tls, certs=public)
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca_file)  # a system store without the public CA
    assert send(make_app(public_relay.env(SMTP_CA_FILE=certs.ca_file)).test_client()).status_code == 503
    monkeypatch.setenv("SSL_CERT_FILE", public.ca_file)
    for relay in (private_relay, public_relay):
        client = make_app(relay.env(SMTP_CA_FILE=certs.ca_file)).test_client()
        resp = send(client)
        assert resp.status_code == 200, resp.get_json()
        assert len(relay.messages) == 1


def test_skip_tls_verify_accepts_an_unknown_ca(make_server, make_app, tmp_path):
    server = make_server(tls="starttls")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    client = make_app(server.env(SMTP_CA_FILE=str(other_ca), SMTP_SKIP_TLS_VERIFY="true")).test_client()
    assert send(client).status_code == 200


def test_ehlo_names_the_hostname_or_smtp_helo_name(make_server, make_app):
    server = make_server(tls="starttls")  # EHLO again after STARTTLS, with the same name
    assert send(make_app(server.env()).test_client()).status_code == 200
    assert send(make_app(server.env(SMTP_HELO_NAME="mta.herald.example")).test_client()).status_code == 200
    assert server.handler.ehlo_names == [socket.gethostname()] * 2 + ["mta.herald.example"] * 2


def test_starttls_required_but_not_offered_is_503_and_nothing_goes_out_in_clear(make_server, make_app):
    server = make_server(auth=True)  # plain, advertises AUTH without TLS
    auths, mails = record(server, "AUTH"), record(server, "MAIL")
    client = make_app(server.env(SMTP_USE_STARTTLS="true")).test_client()
    resp = send(client)
    assert resp.status_code == 503
    assert resp.get_json()["error_code"] == "provider_down"
    assert "STARTTLS" in resp.get_json()["error_message"]
    assert auths == [] and mails == [] and server.messages == []


def test_auth_over_starttls(make_server, make_app):
    server = make_server(tls="starttls", auth=True)  # refuses MAIL without a successful AUTH
    client = make_app(server.env()).test_client()
    for _ in range(3):
        assert send(client).status_code == 200
    assert len(server.messages) == 3
    assert server.sessions == 1  # authenticated once, reused


def test_auth_over_implicit_tls(make_server, make_app):
    server = make_server(tls="implicit", auth=True)
    assert send(make_app(server.env()).test_client()).status_code == 200
    assert len(server.messages) == 1


# -- reuse and its bounds ----------------------------------------------------------------


@pytest.mark.parametrize("tls", [None, "starttls"])
def test_many_sends_share_one_session(make_server, make_app, tls):
    server = make_server(tls=tls)
    client = make_app(server.env()).test_client()
    for i in range(20):
        assert send(client, to=f"user{i}@example.com").status_code == 200
    assert server.sessions == 1
    assert [m.rcpt_tos for m in server.messages] == [[f"user{i}@example.com"] for i in range(20)]


def test_each_thread_keeps_its_own_session(smtp_server, make_app):
    app = make_app(smtp_server.env())
    codes = []

    def worker():
        client = app.test_client()
        codes.extend(send(client).status_code for _ in range(5))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 10
    assert smtp_server.sessions == 2
    assert len(smtp_server.messages) == 10


def test_max_messages_per_connection_opens_a_new_session(smtp_server, make_app):
    quits = record(smtp_server, "QUIT")
    client = make_app(smtp_server.env(SMTP_MAX_MESSAGES_PER_CONNECTION="3")).test_client()
    for _ in range(7):
        assert send(client).status_code == 200
    assert smtp_server.sessions == 3  # 3 + 3 + 1
    assert len(quits) == 2  # a retired session is closed politely
    assert len(smtp_server.messages) == 7


def test_max_idle_seconds_opens_a_new_session(smtp_server, make_app):
    client = make_app(smtp_server.env(SMTP_MAX_IDLE_SECONDS="0.5")).test_client()
    assert send(client).status_code == 200
    time.sleep(0.8)
    assert send(client).status_code == 200
    assert smtp_server.sessions == 2
    assert len(smtp_server.messages) == 2


# -- servers that go away ----------------------------------------------------------------


def test_server_that_drops_idle_connections(make_server, make_app):
    server = make_server(timeout=1)  # aiosmtpd closes a session idle for a second
    client = make_app(server.env()).test_client()
    assert send(client, to="first@example.com").status_code == 200
    time.sleep(2)
    resp = send(client, to="second@example.com")
    assert resp.status_code == 200, resp.get_json()
    assert server.sessions == 2
    assert [m.rcpt_tos for m in server.messages] == [["first@example.com"], ["second@example.com"]]


def test_server_that_restarts(smtp_server, make_app):
    client = make_app(smtp_server.env()).test_client()
    assert send(client, to="before@example.com").status_code == 200
    smtp_server.stop()
    smtp_server.start()  # same port, same handler; the cached session is dead
    resp = send(client, to="after@example.com")
    assert resp.status_code == 200, resp.get_json()
    assert smtp_server.sessions == 1  # counted since the restart
    assert [m.rcpt_tos for m in smtp_server.messages] == [["before@example.com"], ["after@example.com"]]


def test_cached_session_closing_with_421_is_replaced_and_sent_once(smtp_server, make_app):
    # Postfix-style idle close: the cached session answers MAIL with 421; reconnect and send once.
    original, first, closing = smtp_server.handler.handle_MAIL, [], threading.Event()

    async def handle_MAIL(server, session, envelope, address, options):
        first.append(first[0] if first else session)
        if closing.is_set() and session is first[0]:
            return "421 4.4.2 idle too long, closing"
        return await original(server, session, envelope, address, options)

    smtp_server.handler.handle_MAIL = handle_MAIL
    client = make_app(smtp_server.env()).test_client()
    assert send(client, to="before@example.com").status_code == 200
    closing.set()
    resp = send(client, to="after@example.com")
    assert resp.status_code == 200, resp.get_json()
    assert smtp_server.sessions == 2
    assert [m.rcpt_tos for m in smtp_server.messages] == [["before@example.com"], ["after@example.com"]]


def test_refused_transaction_leaves_the_session_clean(smtp_server, make_app):
    smtp_server.handler.reject_rcpt["nobody@example.com"] = "550 5.1.1 no such user"
    client = make_app(smtp_server.env()).test_client()
    assert send(client, to="nobody@example.com").status_code == 400
    resp = send(client, to="somebody@example.com")
    assert resp.status_code == 200
    assert [m.rcpt_tos for m in smtp_server.messages] == [["somebody@example.com"]]
    assert smtp_server.messages[0].mail_from == "noreply@example.com"
    assert smtp_server.sessions == 1  # RSET, not a reconnect


def test_refused_message_leaves_the_session_clean(smtp_server, make_app):
    client = make_app(smtp_server.env()).test_client()
    smtp_server.handler.data_reply = "554 5.7.1 spam"
    assert send(client).status_code == 500
    smtp_server.handler.data_reply = None
    assert send(client, to="next@example.com").status_code == 200
    assert [m.rcpt_tos for m in smtp_server.messages] == [["next@example.com"]]


def test_close_all_sends_quit(smtp_server, make_app):
    quits = record(smtp_server, "QUIT")
    app = make_app(smtp_server.env())
    client = app.test_client()
    assert send(client).status_code == 200
    app.extensions["herald_smtp"].transport.close_all()
    assert len(quits) == 1
    assert send(client).status_code == 200  # a later send opens a fresh session
    assert smtp_server.sessions == 2
