"""CHUNKING (RFC 3030): with a server that offers it and PIPELINING, MAIL, RCPT and `BDAT <size> LAST`
with the message go out in one write, one round trip per mail (README "Performance"). Every reply is
read in order; a refused recipient is never a sent mail; nothing is retried once BDAT LAST is written."""

import time

import pytest

from conftest import CONTRACT_STATUS, send_json, unique_key
from herald_smtp import load_config
from herald_smtp.smtp.transport import Transport

MAIL = {"to": "user@example.com", "subject": "Your code", "body": "Your code is 424242\n.\n..dots stay"}


def _send(client, key=None, **extra):
    return send_json(client, {**MAIL, **extra}, key=key or unique_key())


def test_one_write_and_one_round_trip_per_mail_on_a_reused_session(fault_server):
    server = fault_server(pipelining=True, chunking=True)
    transport = Transport(load_config(server.env()))
    data = b"Subject: hi\r\n\r\nline one\r\n.\r\n..two dots\r\n"
    try:
        first = transport.send("noreply@example.com", "user@example.com", data, time.monotonic() + 5)
        second = transport.send("noreply@example.com", "user@example.com", data, time.monotonic() + 5)
    finally:
        transport.close_all()
    assert (first.chunking, first.reused, second.reused) == (True, False, True)
    assert second.round_trips == 1  # MAIL, RCPT and BDAT LAST with the message: one wait
    assert "DATA" not in server.commands and server.commands.count("BDAT") == 2
    assert server.accepted == [data, data]  # byte for byte: BDAT takes no dot-stuffing


def test_without_pipelining_bdat_still_carries_the_message(fault_server, make_app):
    server = fault_server(chunking=True)
    client = make_app(server.env()).test_client()
    assert _send(client).status_code == 200
    assert server.commands[-3:] == ["MAIL", "RCPT", "BDAT"]
    assert server.accepted[-1].rstrip(b"\r\n").endswith(b"\r\n.\r\n..dots stay")  # no dot-stuffing


def test_smtp_chunking_false_keeps_data(fault_server, make_app):
    server = fault_server(pipelining=True, chunking=True)
    client = make_app(server.env(SMTP_CHUNKING="false")).test_client()
    assert _send(client).status_code == 200
    assert "DATA" in server.commands and "BDAT" not in server.commands


DEADLINE = 1  # timeout_seconds of the stall rows

# step, action, error_code, copies at the server, sessions: every reply to the one write, in order.
BDAT_FAULTS = [
    ("mail", "451 4.3.0 try again later", "provider_down", 0, 1),
    ("mail", "550 5.7.1 sender refused", "send_failed", 0, 1),
    ("mail", "421 4.3.2 shutting down", "provider_down", 0, 2),  # a refusal: once more on a fresh session
    ("mail", "close", "send_failed", 0, 1),  # the message was written: delivery unknown, never retried
    ("rcpt", "450 4.2.1 mailbox busy", "provider_down", 0, 1),
    ("rcpt", "550 5.1.1 no such user", "invalid_destination", 0, 1),
    ("rcpt", "close", "send_failed", 0, 1),
    ("message", "stall", "timeout", 0, 1),
    ("dot", "452 4.3.1 insufficient storage", "provider_down", 1, 1),
    ("dot", "554 5.6.0 content refused", "send_failed", 1, 1),
    ("dot", "close", "send_failed", 1, 1),
    ("dot", "stall", "timeout", 1, 1),
]


@pytest.mark.parametrize("step, action, code, received, sessions", BDAT_FAULTS,
                         ids=[f"{r[0]}-{r[1].split()[0]}" for r in BDAT_FAULTS])
def test_every_bdat_reply_maps_exactly_and_nothing_is_sent_twice(fault_server, make_app, step, action, code,
                                                                  received, sessions):
    server = fault_server(pipelining=True, chunking=True)
    client = make_app(server.env(SMTP_TIMEOUT_SECONDS="10")).test_client()
    assert _send(client).status_code == 200  # the session is open and reused from here
    server.fault(step, action)
    key = unique_key()

    r = _send(client, key, timeout_seconds=DEADLINE)

    assert (r.status_code, r.json["error_code"]) == (CONTRACT_STATUS[code], code)
    assert len(server.accepted) == 1 and len(server.received) == 1 + received
    assert server.sessions == sessions  # after a lost or late reply to the write, never a retry
    server.heal()
    assert _send(client, key).json["message_id"] == key  # a failure is not remembered
    assert len(server.accepted) == 2


def test_a_refused_recipient_is_never_a_sent_mail_even_if_the_server_takes_the_bdat(fault_server, make_app):
    server = fault_server(pipelining=True, chunking=True, bdat_without_recipients=True)
    client = make_app(server.env()).test_client()
    server.fault("rcpt", "550 5.1.1 no such user", times=1)
    r = _send(client)
    assert (r.status_code, r.json["error_code"]) == (400, "invalid_destination")
    assert _send(client).status_code == 200  # on a new session: the broken one was abandoned
    assert server.sessions == 2
