"""RFC 2920 PIPELINING: MAIL, RCPT and DATA in one round trip, with exact per-command errors."""

import pytest

from conftest import send_json, unique_key


@pytest.fixture
def pipelining_server(make_server):
    server = make_server()
    server.handler.pipelining = True
    return server


def test_commands_go_out_together_and_mail_arrives(pipelining_server, make_app):
    client = make_app(pipelining_server.env()).test_client()
    for _ in range(3):
        r = send_json(client, {"to": "carol@example.com", "body": ".starts with a dot"}, key=unique_key())
        assert r.status_code == 200, r.json
    assert pipelining_server.handler.pipelined == [True, True, True]
    assert len(pipelining_server.messages) == 3
    assert pipelining_server.messages[0].rcpt_tos == ["carol@example.com"]
    assert pipelining_server.parsed().get_content().startswith(".starts with a dot")
    assert pipelining_server.sessions == 1


def test_without_the_extension_commands_wait_for_replies(smtp_server, client):
    assert send_json(client, {"to": "carol@example.com"}, key=unique_key()).status_code == 200
    assert smtp_server.handler.pipelined == [False]


@pytest.mark.parametrize("knob, reply, status, code", [
    ("mail_reply", "451 4.3.0 try later", 503, "provider_down"),
    ("mail_reply", "553 5.7.1 sender refused", 500, "send_failed"),
    ("reject_rcpt", "550 5.1.1 no such user", 400, "invalid_destination"),
    ("reject_rcpt", "452 4.2.2 mailbox full", 503, "provider_down"),
    ("data_reply", "554 5.6.0 content refused", 500, "send_failed"),
])
def test_a_refusal_at_each_pipelined_step_maps_exactly_and_the_session_stays_usable(
        pipelining_server, make_app, knob, reply, status, code):
    handler = pipelining_server.handler
    client = make_app(pipelining_server.env()).test_client()
    if knob == "reject_rcpt":
        handler.reject_rcpt["dave@example.com"] = reply
    else:
        setattr(handler, knob, reply)
    r = send_json(client, {"to": "dave@example.com"}, key=unique_key())
    assert (r.status_code, r.json["error_code"]) == (status, code)
    assert handler.messages == []
    handler.reject_rcpt.clear()
    handler.mail_reply = handler.data_reply = None
    r = send_json(client, {"to": "dave@example.com"}, key=unique_key())
    assert r.status_code == 200, r.json
    assert len(handler.messages) == 1
    assert pipelining_server.sessions == 1  # RSET after the refusal kept the session in sync
