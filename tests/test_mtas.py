"""Every real MTA the tests run, side by side: the mail's bytes through each (and each path), and
a send moving from one MTA to another when the first defers before the data.

Exim defers by address (tests/exim_server.py): a sender DEFER[code] is refused at MAIL, a
recipient DEFER[code] at RCPT. OpenSMTPD, the fallback, takes both."""

import re

import pytest

from conftest import send_json, unique_key
from exim_server import DEFER, EximServer
from herald_smtp import load_config
from herald_smtp.smtp.message import MessageBuilder, SendRequest
from mta import codes, parse, started

TO = "ada.lovelace@example.com"
SUBJECT = "Ваш код подтверждения — вход в «Геральд» ✓"
# 8 KB of text with every line SMTP's transparency rule touches: a lone dot (DATA's end marker
# if left unstuffed), dots leading a line, and a last line that is a dot.
BODY = "\n".join(
    [f"Line {i:03d}: the code is 482916, and this line pads the body to eight kilobytes ......"
     for i in range(96)]
    + [".", "..", ".hidden", "... three", " . not leading", "Ёлки, щи, ъ — всё на месте.", "."])




def without_date(data: bytes) -> bytes:
    """The message in LF form (as a Maildir stores it) without its Date line (built at send time)."""
    return re.sub(rb"(?m)^Date: .*\n", b"", data.replace(b"\r\n", b"\n"))


SERVERS = {  # id: (fixture, SMTP_CHUNKING)
    "postfix-bdat": ("postfix", "true"),
    "exim-bdat": ("exim", "true"),
    "exim-data": ("exim", "false"),
    "opensmtpd-data": ("opensmtpd", "true"),  # it offers no CHUNKING: DATA whatever we allow
}


@pytest.mark.parametrize("server_id", SERVERS)
def test_the_mails_bytes_arrive_intact(request, make_app, server_id):
    fixture, chunking = SERVERS[server_id]
    server = request.getfixturevalue(fixture)
    env = server.env(SMTP_CHUNKING=chunking)
    key = unique_key()
    resp = send_json(make_app(env).test_client(), {"to": TO, "subject": SUBJECT, "body": BODY}, key=key)
    assert resp.status_code == 200, resp.get_json()

    [raw] = server.messages()
    sent = MessageBuilder(load_config(env)).build(SendRequest(to=TO, subject=SUBJECT, body=BODY), key).data
    assert len(sent) > 8192 and b"\r\n.\r\n" in sent and b"\r\n..\r\n" in sent  # what the test is about
    # Byte for byte what herald-smtp wrote, after the MTA's own trace headers (Received, ...).
    assert without_date(raw).endswith(without_date(sent))
    msg = parse(raw)
    assert msg["Subject"] == SUBJECT
    assert msg.get_content().replace("\r\n", "\n").rstrip("\n") == BODY
    if fixture == "exim":
        assert server.received() == [("bdat" if chunking == "true" else "data", True)]


@pytest.fixture(scope="module")
def exim_one_at_a_time(tmp_path_factory):
    """An Exim that offers no PIPELINING (CHUNKING still), plain SMTP."""
    server = started(EximServer(tmp_path_factory.mktemp("exim"), pipelining=False))
    yield server
    server.stop()


STAGES = [("mail", 421), ("mail", 451), ("rcpt", 421), ("rcpt", 451)]
PATHS = {  # id: (Exim offers PIPELINING, SMTP_CHUNKING)
    "bdat": (True, "true"), "data": (True, "false"),
    "bdat-unpipelined": (False, "true"), "data-unpipelined": (False, "false"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stage,code", STAGES, ids=[f"{s}-{c}" for s, c in STAGES])
def test_exim_deferring_before_the_data_hands_the_mail_to_opensmtpd(request, make_app, opensmtpd, stage, code, path):
    """Exim refuses MAIL or RCPT with a 4xx: nothing of the message has gone out, so the send
    moves to the fallback relay (OpenSMTPD), and Exim goes to the back of the line."""
    pipelining, chunking = PATHS[path]
    exim = request.getfixturevalue("exim" if pipelining else "exim_one_at_a_time")
    exim.clear()
    sender, to = (DEFER[code], TO) if stage == "mail" else ("noreply@example.com", DEFER[code])
    env = exim.env(SMTP_FROM=sender, SMTP_CHUNKING=chunking, **opensmtpd.fallback_env())
    client = make_app(env).test_client()
    resp = send_json(client, {"to": to, "body": "Your code is 111111"}, key=unique_key())
    assert resp.status_code == 200, resp.get_json()
    [raw] = opensmtpd.messages()
    assert codes([raw]) == ["111111"] and parse(raw)["Return-Path"] == f"<{sender}>"
    refused = f"temporarily rejected {stage.upper()} <{DEFER[code]}>: {code} "
    assert refused in exim.log() and exim.messages() == []
    # Exim, in cool-down, is tried after the fallback: the next send does not reach it.
    sessions = exim.sessions()
    assert send_json(client, {"to": to, "body": "Your code is 222222"}, key=unique_key()).status_code == 200
    assert sorted(codes(opensmtpd.messages())) == ["111111", "222222"]
    assert exim.sessions() == sessions


def test_check_says_what_each_mta_offers_and_the_path_a_mail_takes(exim, opensmtpd, postfix, tmp_path):
    """`check` against the three real MTAs at once (Exim the primary, with STARTTLS and AUTH)."""
    from test_check import check, store

    env = {**exim.env(), **opensmtpd.fallback_env(1), **postfix.fallback_env(2), **store(tmp_path)}
    status, lines = check(env)
    assert status == 0, lines
    offers = [line.split("; ", 2)[2] for line in lines if line.startswith("ok: ") and "; offers " in line]
    assert offers == [
        "offers PIPELINING, CHUNKING, SIZE 52428800, AUTH PLAIN LOGIN, STARTTLS; TLSv1.3; mail goes by BDAT pipelined",
        "offers SIZE 36700160; no TLS; mail goes by DATA",
        "offers PIPELINING, CHUNKING, SIZE 10240000, AUTH PLAIN LOGIN, STARTTLS; TLSv1.3; mail goes by BDAT pipelined",
    ], lines
