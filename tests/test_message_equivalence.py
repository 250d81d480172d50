"""MessageBuilder.build writes its bytes directly; they must equal what the stdlib's EmailMessage
writes for the same request, byte for byte (README, "Performance": the message is written
straight to bytes).

The reference below is the EmailMessage construction build() used before it was made fast, with
two exceptions. A Subject or From display name the policy would write as RFC 2047 encoded words
(not ASCII, or a word too long for a line) is set raw, as email.header.Header encodes it, because
the policy's folder loses the space between two encoded words (tests/test_encodings.py decodes
random subjects and names to show that build() keeps every one). Text with control characters is
set with quoted-printable, which the stdlib would send raw under 7bit. Date, Message-ID and the
multipart boundary differ per message; they are compared by shape.
"""

import random
import re
import time
import uuid
from email.header import Header
from email.message import EmailMessage
from datetime import datetime, timezone
from email.utils import format_datetime, formatdate

import pytest

from herald_smtp.config import load_config
from herald_smtp.errors import SendError
from herald_smtp.smtp.message import (_LANGUAGE_TAG, POLICY, MessageBuilder, SendRequest, effective_body, recipient,
                                 from_value, transfer_encoding)


def reference(builder, req):
    to = recipient(req.to)
    msg = EmailMessage(policy=POLICY)
    if from_value(builder.from_header) is None:
        msg["From"] = builder.from_header
    else:
        msg.set_raw("From", from_value(builder.from_header))
    msg["To"] = to
    subject = req.subject or "Verification code"
    if subject.isascii() and not re.search(r"\S{60}", subject):
        msg["Subject"] = subject
    else:
        msg.set_raw("Subject", Header(subject, "utf-8", header_name="Subject").encode(maxlinelen=76))
    msg["Date"] = formatdate(time.time(), usegmt=True)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@{builder.domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    body = effective_body(req)
    msg.set_content(body, charset="utf-8", cte=transfer_encoding(body))
    if req.html:
        msg.add_alternative(req.html, subtype="html", charset="utf-8", cte=transfer_encoding(req.html))
    if _LANGUAGE_TAG.fullmatch(req.locale):
        msg["Content-Language"] = req.locale
    return msg.as_bytes()


_VARYING = [
    (re.compile(rb"^Date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000(?=\r$)", re.M), b"Date: <date>"),
    (re.compile(rb"^Message-ID: <[0-9a-f]{32}@([^>\s]*)>(?=\r$)", re.M), rb"Message-ID: <id@\1>"),
    (re.compile(rb"={15}\d{19}=="), b"<boundary>"),
]


def normalised(data: bytes) -> bytes:
    for pattern, replacement in _VARYING:
        data, n = pattern.subn(replacement, data)
        assert n or pattern is _VARYING[2][0], f"no {replacement!r} in the message"
    return data


def builder(**env):
    return MessageBuilder(load_config({"SMTP_HOST": "127.0.0.1", "SMTP_FROM": "noreply@example.com",
                                       "IDEMPOTENCY_STORE": "memory://", "WEB_CONCURRENCY": "1", **env}))


def assert_same(b, req):
    fast = b.build(req).data
    assert normalised(fast) == normalised(reference(b, req))


LONG_WORD = "x" * 120
CORPUS = {
    "ascii": SendRequest(to="alice@example.com", body="Your verification code is: 123456"),
    "fallback body from params": SendRequest(to="alice@example.com", params={"code": "987654"}),
    "fallback body without code": SendRequest(to="alice@example.com"),
    "german": SendRequest(to="juergen@example.de", subject="Ihr Bestätigungscode",
                          body="Grüße!\nIhr Bestätigungscode lautet: 123456.\nÄÖÜ äöü ß"),
    "cjk": SendRequest(to="taro@example.jp", subject="確認コード", body="あなたの確認コードは 123456 です。\n" * 3),
    "cjk, many lines (base64)": SendRequest(to="li@example.cn", subject="您的验证码是 123456，请在十分钟内使用",
                                             body="您的验证码是：123456。请勿将验证码告诉他人。\n" * 20),
    "emoji": SendRequest(to="e@example.com", subject="🔐 Your code 🔑", body="Code: 123456 ✅\n👋"),
    "long ascii line": SendRequest(to="a@example.com", body="code 123456 " + "lorem ipsum " * 100),
    "over 998 octets, no space": SendRequest(to="a@example.com", body=LONG_WORD * 10),
    "lines starting with a dot": SendRequest(to="a@example.com", body=".\n..\n.hidden\nend\n."),
    "crlf and lone cr": SendRequest(to="a@example.com", body="one\r\ntwo\rthree\n\nfour\n"),
    "trailing spaces and tabs": SendRequest(to="a@example.com", body="code 1   \nline\t\n  \n"),
    "more than ten non-ascii lines (quoted-printable)": SendRequest(to="a@example.com", body="Grüße\n" * 12),
    "From_ line": SendRequest(to="a@example.com", body="From here on\nFrom: x"),
    "html alternative": SendRequest(to="a@example.com", body="code 123456",
                                    html="<p>Your code is <b>123456</b></p>"),
    "html alternative, non-ascii": SendRequest(to="a@example.com", subject="Código", body="Código: 123456",
                                               html="<p>Código: <b>123456</b> 🎉</p>\n" * 15),
    "html with long lines": SendRequest(to="a@example.com", body="x", html="<div>" + "a" * 1500 + "</div>"),
    "locale": SendRequest(to="a@example.com", body="Code 1", locale="de-DE"),
    "locale with html": SendRequest(to="a@example.com", body="Code 1", html="<p>1</p>", locale="zh-Hant-TW"),
    "locale not a language tag": SendRequest(to="a@example.com", body="Code 1", locale="de DE; x"),
    "idn recipient": SendRequest(to="kunde@bücher.example", body="Code 1"),
    "idn recipient, cjk domain": SendRequest(to="user@例え.jp", body="Code 1"),
    "long recipient (folded line)": SendRequest(to="a" * 64 + "@" + "sub." * 8 + "example.com", body="Code 1"),
    "recipient with rare atext": SendRequest(to="a+b=?c!#$%&'*/^_`{|}~-x@example.com", body="Code 1"),
    # A whole encoded word in `to` is refused (the To header would decode it); this one is plain atext.
    "recipient that looks like an encoded word": SendRequest(to="a=?utf-8?q?x?=@example.com", body="Code 1"),
    "long subject": SendRequest(to="a@example.com", subject="Your verification code for the sign-in to " * 8),
    "long subject, no space": SendRequest(to="a@example.com", subject="x" * 200),
    "subject like an encoded word": SendRequest(to="a@example.com", subject="=?utf-8?q?hello?= world"),
    "subject with spaces at the ends": SendRequest(to="a@example.com", subject="  two  spaces  "),
    "control characters in the text": SendRequest(to="a@example.com", body="code \x1b[1m123456\x1b[0m\x7f\x0b\x0c",
                                                  html="<p>\x1b\x01</p>"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_matches_email_message(name):
    assert_same(builder(SMTP_FROM_NAME="Herald"), CORPUS[name])


@pytest.mark.parametrize("from_name", ["", "Herald", "Bücherstube Müller", "验证码服务", "Herald, Inc. \"Codes\"",
                                       "🔐 Login", "A very long display name for the sender of verification codes"])
def test_matches_email_message_for_every_sender_name(from_name):
    b = builder(SMTP_FROM_NAME=from_name)
    for req in (CORPUS["ascii"], CORPUS["html alternative, non-ascii"]):
        assert_same(b, req)


def test_matches_email_message_with_an_idn_and_long_sender_domain():
    assert_same(builder(SMTP_FROM="codes@" + "verification." * 4 + "bücher.example"), CORPUS["german"])


def test_matches_email_message_without_a_sender():
    # SMTP_FROM empty: the API answers 503 after building, which must not fail either.
    assert_same(builder(SMTP_FROM=""), CORPUS["ascii"])


def test_matches_email_message_over_random_requests():
    rnd = random.Random(5)
    atext = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
    words = ["code", "123456", "Grüße", "確認", "🔑", "=?", "?=", ".", "..", "a" * 90, "", " ", "ñ", "x=y", "—"]

    def text(n):
        return "".join(rnd.choice(words) + rnd.choice([" ", " ", "", "\n", "\r\n", "  "]) for _ in range(n))

    checked = 0
    for _ in range(300):
        local = ".".join("".join(rnd.choice(atext) for _ in range(rnd.randint(1, 20))) for _ in range(rnd.randint(1, 3)))
        domain = ".".join(rnd.choice(["example", "bücher", "ex-ample", "a" * 30, "例え"]) for _ in range(rnd.randint(1, 3)))
        req = SendRequest(to=f"{local}@{domain}.com", subject=text(rnd.randint(0, 12)).replace("\n", " ").replace("\r", ""),
                          body=text(rnd.randint(0, 60)), html=rnd.choice(["", text(5)]),
                          locale=rnd.choice(["", "en", "pt-BR"]))
        try:
            recipient(req.to)
        except SendError:
            continue
        assert_same(builder(SMTP_FROM_NAME="Herald Codes"), req)
        checked += 1
    assert checked > 200


def test_the_date_line_is_formatted_once_a_second_and_is_what_email_message_writes():
    """build() formats the Date line once a second: over a second boundary, every line equals the one
    EmailMessage writes for that second, and the line changes when the second does."""
    b = builder()
    req = CORPUS["ascii"]
    seen = {}
    started = time.time()
    while time.time() < started + 1.2 or len(seen) < 2:
        before = int(time.time())
        line = re.search(rb"^Date: .*\r\n", b.build(req).data, re.M).group()
        if int(time.time()) != before:
            continue  # a second ended during the build: either second's line is right
        msg = EmailMessage(policy=POLICY)
        msg["Date"] = format_datetime(datetime.fromtimestamp(before, timezone.utc))
        assert line == msg.as_bytes().split(b"\r\n\r\n")[0] + b"\r\n"
        seen.setdefault(before, line)
    assert len(set(seen.values())) == len(seen) >= 2
