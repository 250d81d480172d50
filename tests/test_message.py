"""The email as it arrives at a real aiosmtpd server, parsed back with the stdlib."""

import email.utils

import pytest

from conftest import send_json, unique_key

TO = "marker.person@example.com"


def deliver(client, server, **fields):
    payload = {"to": TO, "subject": "Your code", "body": "Your code is 123456", **fields}
    resp = send_json(client, payload, key=unique_key())
    assert resp.status_code == 200, resp.get_json()
    return server.parsed(), server.messages[-1]


def raw_lines(envelope):
    return envelope.original_content.split(b"\r\n")


def header_block(envelope):
    return envelope.original_content.split(b"\r\n\r\n", 1)[0]


def plain(msg):
    # Decoded text keeps the wire's CRLF line ends; a mail client shows plain lines.
    return msg.get_body(("plain",)).get_content().replace("\r\n", "\n")


@pytest.mark.parametrize("subject", [
    "您的验证码是 123456",
    "認証コードのお知らせ：123456（10分間有効）",
    "Ihr Bestätigungscode für Größenänderungen – bitte prüfen",
    "Verification code",
])
def test_subject_decodes_to_what_herald_sent(client, smtp_server, subject):
    msg, env = deliver(client, smtp_server, subject=subject)
    assert msg["subject"] == subject
    assert max(header_block(env)) < 0x80  # RFC 2047 encoded, never raw 8-bit


def test_non_ascii_from_name(make_app, smtp_server):
    client = make_app(smtp_server.env(SMTP_FROM_NAME="Héräld Prüfdienst 验证")).test_client()
    msg, env = deliver(client, smtp_server)
    (sender,) = msg["from"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Héräld Prüfdienst 验证", "noreply@example.com")
    assert max(header_block(env)) < 0x80


def test_ascii_from_name_and_envelope_sender(make_app, smtp_server):
    client = make_app(smtp_server.env(SMTP_FROM_NAME="Herald")).test_client()
    msg, env = deliver(client, smtp_server)
    assert msg["from"].addresses[0].display_name == "Herald"
    assert env.mail_from == "noreply@example.com"


@pytest.mark.parametrize("body", [
    "Your code is 123456",
    "您的验证码是 123456，10 分钟内有效。\n请勿泄露。",
    "Ihr Code: 123456\nGrüße\n",
])
def test_body_decodes_to_what_herald_sent(client, smtp_server, body):
    msg, _ = deliver(client, smtp_server, body=body)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert plain(msg).rstrip("\n") == body.rstrip("\n")


@pytest.mark.parametrize("body", ["a" * 5000, "验" * 5000, "x" * 997 + "é" + "y" * 3000])
def test_no_line_over_998_octets(client, smtp_server, body):
    msg, env = deliver(client, smtp_server, body=body, html=f"<p>{body}</p>", subject="s" * 990)
    assert max(len(line) for line in raw_lines(env)) <= 998
    assert plain(msg).rstrip("\n") == body
    assert msg.get_body(("html",)).get_content().rstrip("\r\n") == f"<p>{body}</p>"


def test_message_id_is_unique_at_the_sender_domain_and_free_of_request_text(client, smtp_server):
    key = "key-marker-0042"
    first, _ = deliver(client, smtp_server, subject="subjmarker", body="bodymarker")
    resp = send_json(client, {"to": TO, "subject": "subjmarker", "body": "bodymarker"}, key=key)
    assert resp.status_code == 200
    second = smtp_server.parsed()
    ids = [first["message-id"], second["message-id"]]
    assert ids[0] != ids[1]
    for mid in ids:
        assert mid.startswith("<") and mid.endswith("@example.com>")
        for text in ("marker", key, "123456"):
            assert text not in mid


def test_message_id_is_one_per_key_across_replicas_and_private_to_the_deployment(make_app, smtp_server):
    """Every copy sent for one key (a retry after an unknown outcome, on any replica) carries the
    same Message-ID, so mail systems can collapse duplicates; another sender's ids differ."""
    def message_id(key, **env):
        app = make_app(smtp_server.env(IDEMPOTENCY_STORE="memory://", WEB_CONCURRENCY="1", **env))
        resp = send_json(app.test_client(), {"to": TO, "body": "Your code is 123456"}, key=key)
        assert resp.status_code == 200, resp.get_json()
        return smtp_server.parsed()["message-id"]

    key = "challenge-marker-7731"
    same = message_id(key), message_id(key)  # two replicas, each with its own store: both send
    assert same[0] == same[1] and key not in same[0] and same[0].endswith("@example.com>")
    others = {message_id("challenge-marker-7732"),
              message_id(key, SMTP_FROM="noreply@other.example"),
              message_id(key, SMTP_PASSWORD="another-deployments-password", SMTP_USE_STARTTLS="false")}
    assert len(others) == 3 and same[0] not in others


def test_date_mime_version_and_auto_submitted(client, smtp_server):
    msg, _ = deliver(client, smtp_server)
    assert email.utils.parsedate_to_datetime(msg["date"]).tzinfo is not None
    assert msg["mime-version"] == "1.0"
    assert msg["auto-submitted"] == "auto-generated"
    assert msg["to"] == TO


@pytest.mark.parametrize("locale, expected", [
    ("de-DE", "de-DE"), ("zh-Hans-CN", "zh-Hans-CN"), ("ja", "ja"),
    ("", None), ("en_US", None), ("de-DE\r\nBcc: eve@example.com", None), ("x" * 20, None),
])
def test_content_language_only_from_a_valid_locale(client, smtp_server, locale, expected):
    msg, env = deliver(client, smtp_server, locale=locale)
    assert msg["content-language"] == expected
    assert msg["bcc"] is None and env.rcpt_tos == [TO]


def test_html_alternative(client, smtp_server):
    msg, _ = deliver(client, smtp_server, body="Code: 123456", html="<p>Code: <b>123456</b> – grüß</p>", locale="de")
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["content-language"] == "de"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert plain(msg).strip() == "Code: 123456"
    assert msg.get_body(("html",)).get_content().strip() == "<p>Code: <b>123456</b> – grüß</p>"
    assert msg["auto-submitted"] == "auto-generated"


def test_idn_recipient_is_punycoded_in_to_and_envelope(client, smtp_server):
    msg, env = deliver(client, smtp_server, to="kunde@bücher.example")
    assert msg["to"] == "kunde@xn--bcher-kva.example"
    assert env.rcpt_tos == ["kunde@xn--bcher-kva.example"]
    assert max(header_block(env)) < 0x80


def test_envelope_recipient_is_exactly_to_and_only_it(client, smtp_server):
    _, env = deliver(client, smtp_server, to="  someone@example.org ", subject="cc: other@example.com",
                     body="Bcc: third@example.com\nTo: fourth@example.com")
    assert env.rcpt_tos == ["someone@example.org"]
    assert env.mail_from == "noreply@example.com"


def test_body_lines_starting_with_a_dot_survive(client, smtp_server):
    body = ".\n.leading dot\n..two dots\nmiddle\n.\nend"
    msg, _ = deliver(client, smtp_server, body=body)
    assert plain(msg).rstrip("\n") == body
    assert len(smtp_server.messages) == 1  # a lone "." did not end the data early


def test_the_remembered_domain_check_refuses_and_accepts_as_before(client, smtp_server):
    """The domain check is remembered per domain: a second address at a domain already checked is
    accepted without checking it again, an invalid domain is refused every time (a refusal is never
    remembered), and the part before the @ is still checked at a domain already known."""
    from herald_smtp.smtp.message import domain_check

    for to in ("first@cached-domain.example.org", "second@CACHED-domain.example.org", "kunde@bücher-cache.example",
               "again@bücher-cache.example"):
        assert send_json(client, {"to": to}, key=unique_key()).status_code == 200
    hits = domain_check.cache_info().hits
    assert send_json(client, {"to": "third@cached-domain.example.org"}, key=unique_key()).status_code == 200
    assert domain_check.cache_info().hits == hits + 1
    delivered = len(smtp_server.messages)
    for to in ("a@bad_domain.example", "a@bad_domain.example", "a@-hyphen.example", "a@-hyphen.example",
               "a..b@cached-domain.example.org", "a b@cached-domain.example.org"):
        resp = send_json(client, {"to": to}, key=unique_key())
        assert (resp.status_code, resp.get_json()["error_code"]) == (400, "invalid_destination"), to
    assert len(smtp_server.messages) == delivered
    assert [m.rcpt_tos[0] for m in smtp_server.messages[-5:]] == [
        "first@cached-domain.example.org", "second@cached-domain.example.org", "kunde@xn--bcher-cache-thb.example",
        "again@xn--bcher-cache-thb.example", "third@cached-domain.example.org"]
