"""Garbage from callers: refused with the right envelope, or sent as exactly one mail to exactly
one recipient with exactly the headers we write. Checked on what the SMTP server received."""

import email
import email.policy
import http.client
import json
import re
import socket
import threading

import pytest

from conftest import CONTRACT_STATUS

TO = "user@example.com"
INJECTED = "Bcc: evil@example.org"
# C0 line breaks and NUL, plus what some parsers also take as a line end.
CONTROLS = {"crlf": "\r\n", "lf": "\n", "cr": "\r", "nul": "\x00", "vt": "\x0b", "nel": "\x85", "u2028": "\u2028"}
TOP_HEADERS = {"From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version", "Content-Type",
               "Content-Transfer-Encoding", "Content-Language"}
PART_HEADERS = {"Content-Type", "Content-Transfer-Encoding", "MIME-Version"}


def post(client, payload=None, *, raw=None, content_type="application/json", headers=None, environ=None):
    data = raw if raw is not None else json.dumps(payload)
    return client.post("/v1/send", data=data, content_type=content_type, headers=headers or {},
                       environ_overrides=environ or {})


def assert_refused(server, before, r, code, status=None):
    assert (r.status_code, r.json) == (status or CONTRACT_STATUS[code], {"ok": False, "error_code": code,
                                                                         "error_message": r.json["error_message"]})
    assert r.json["error_message"] and "evil" not in r.json["error_message"] and TO not in r.json["error_message"]
    assert len(server.messages) == before  # nothing sent for a refused request


def assert_one_clean_mail(server, before, r, to=TO):
    """One mail, one envelope recipient, the To header naming only it, only our own headers, once each."""
    assert r.status_code == 200 and r.json["ok"] is True
    assert len(server.messages) == before + 1
    envelope = server.messages[-1]
    assert envelope.rcpt_tos == [to]
    msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    names = list(msg.keys())
    assert len(names) == len(set(names)) and set(names) <= TOP_HEADERS, names
    assert [a.addr_spec for a in msg["To"].addresses] == [to]
    for part in msg.iter_parts():
        assert set(part.keys()) <= PART_HEADERS
    assert max(len(line) for line in envelope.original_content.split(b"\r\n")) <= 998
    return msg


# -- control characters in every field ---------------------------------------------

# field: where the nasty value goes, and what the service must answer (None: send it, cleanly)
FIELDS = {
    "to": "validation_failed",
    "subject": "validation_failed",
    "channel": "validation_failed",
    "idempotency_key": "invalid_request",
    "body": None,
    "html": None,
    "params.code": None,
    "template": None,
    "locale": None,
}


def _payload(field, value):
    payload = {"to": TO, "subject": "Your code", "body": "123456"}
    if field == "params.code":
        payload["params"] = {"code": value}
        payload["body"] = ""
    else:
        payload[field] = value
    return payload


@pytest.mark.parametrize("char", CONTROLS.values(), ids=CONTROLS.keys())
@pytest.mark.parametrize("field", FIELDS)
def test_control_characters_in_every_field(client, smtp_server, field, char):
    value = {"to": f"{TO}{char}{INJECTED}", "channel": f"email{char}{INJECTED}"}.get(field, f"x{char}{INJECTED}")
    before = len(smtp_server.messages)
    r = post(client, _payload(field, value))
    # NUL in the text is refused too: no transfer encoding allows it (RFC 2045).
    refused = FIELDS[field] or (char == "\x00" and field in ("body", "html", "params.code") and "validation_failed")
    if refused:
        assert_refused(smtp_server, before, r, refused)
    else:
        assert_one_clean_mail(smtp_server, before, r)


@pytest.mark.parametrize("char", CONTROLS.values(), ids=CONTROLS.keys())
def test_control_characters_in_request_headers(make_app, smtp_server, char):
    client = make_app(smtp_server.env(API_KEY="k1")).test_client()
    before = len(smtp_server.messages)
    value = f"abc{char}Set-Cookie: x=1"
    # Raw WSGI environ: the test client itself refuses a newline in a header value.
    r = post(client, {"to": TO}, environ={"HTTP_X_API_KEY": f"k1{char}x"})
    assert_refused(smtp_server, before, r, "unauthorized")
    r = post(client, {"to": TO}, environ={"HTTP_X_API_KEY": "k1", "HTTP_IDEMPOTENCY_KEY": value})
    assert_refused(smtp_server, before, r, "invalid_request")
    r = post(client, {"to": TO}, environ={"HTTP_X_API_KEY": "k1", "HTTP_X_REQUEST_ID": value})
    assert_one_clean_mail(smtp_server, before, r)
    # Not echoed: a fresh id of our own, and no header of the caller's making.
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
    assert "Set-Cookie" not in r.headers


# -- one recipient, and only one --------------------------------------------------

@pytest.mark.parametrize("to", [
    None,  # missing
    "",
    "   ",
    "not-an-address",
    "@example.com",
    "a@example.com, b@example.org",
    "a@example.com,b@example.org",
    "a@example.com; b@example.org",
    "a@example.com b@example.org",
    "a@example.com,",
    "<a@example.com>",
    "<a@example.com>, <b@example.org>",
    "a@example.com>, <b@example.org",
    "Alice <a@example.com>",
    '"Alice" <a@example.com>',
    "b@example.org (a@example.com)",
    '"b@example.org"@example.com',
    '"a,b"@example.com',
    "a@b@example.com",
    "@example.org:a@example.com",
    "a@[127.0.0.1]",
    "group: a@example.com, b@example.org;",
    # An RFC 2047 word in the local part: the To header would read "victim@evil.org, x@example.com".
    "=?utf-8?q?victim=40evil.org=2C_x?=@example.com",
    "=?utf-8?q?a=0D=0ABcc=3A_evil=40example.org?=@example.com",
])
def test_to_that_is_not_exactly_one_address_is_refused(client, smtp_server, to):
    assert_refused(smtp_server, 0, post(client, {} if to is None else {"to": to}), "invalid_destination")


def test_an_address_with_odd_but_valid_characters_goes_to_exactly_itself(client, smtp_server):
    to = "first.o'brien+tag%relay@example.com"  # one mailbox: % and ' are plain atext
    assert_one_clean_mail(smtp_server, 0, post(client, {"to": f"  {to} "}), to=to)


# -- headers the caller tries to add ------------------------------------------------

@pytest.mark.parametrize("subject", [
    f"Hi\r\n{INJECTED}",
    f"Hi\r\n {INJECTED}",  # looks like folding
    "=?utf-8?q?Hi=0D=0ABcc:_evil@example.org?=",  # the header parser decodes RFC 2047 words
    "=?utf-8?b?SGkNCkJjYzogZXZpbEBleGFtcGxlLm9yZw==?=",
    "=?utf-8?q?Hi=0ABcc:_evil@example.org?=",
])
def test_header_injection_in_the_subject_is_refused(client, smtp_server, subject):
    assert_refused(smtp_server, 0, post(client, {"to": TO, "subject": subject}), "validation_failed")


@pytest.mark.parametrize("subject", ["=?utf-8?q?caf=C3=A9?=", "Re: [herald] code =? 1", "a" * 998])
def test_harmless_subjects_go_out_as_one_header(client, smtp_server, subject):
    assert_one_clean_mail(smtp_server, 0, post(client, {"to": TO, "subject": subject}))


@pytest.mark.parametrize("body", [
    "hi\r\n.\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<evil@example.org>\r\nDATA\r\nevil\r\n.\r\n",
    "hi\n.\nRCPT TO:<evil@example.org>\n",
    "hi\n.\r\nRCPT TO:<evil@example.org>\r\n",  # SMTP smuggling: bare LF before the dot
    "hi\r.\r\nRCPT TO:<evil@example.org>\r\n",
    ".\r\nQUIT\r\n",
    f"\r\n\r\n{INJECTED}\r\n",
])
def test_smtp_smuggling_in_the_body_stays_inside_one_mail(client, smtp_server, body):
    msg = assert_one_clean_mail(smtp_server, 0, post(client, {"to": TO, "body": body}))
    assert "evil@example.org" in msg.get_content() or "QUIT" in msg.get_content()


# -- sizes and shapes of JSON ---------------------------------------------------------

DEEP_ARRAY = '{"to": "%s", "x": %s}' % (TO, "[" * 20000 + "]" * 20000)
DEEP_OBJECT = '{"to": "%s", "x": %s}' % (TO, '{"a":' * 10000 + "1" + "}" * 10000)


@pytest.mark.parametrize("raw, code", [
    pytest.param(DEEP_ARRAY, "invalid_request", id="deep-array"),
    pytest.param(DEEP_OBJECT, "invalid_request", id="deep-object"),
    pytest.param('{"to": "a@example.com", "to": "b@example.org"}', "invalid_request", id="duplicate-to"),
    pytest.param('{"to": "%s", "params": {"code": "1", "code": "2"}}' % TO, "invalid_request", id="duplicate-nested"),
    pytest.param('{"to": "%s", "timeout_seconds": NaN}' % TO, "invalid_request", id="nan"),
    pytest.param('{"to": "%s", "timeout_seconds": 1e999}' % TO, "invalid_request", id="infinity"),
    pytest.param('{"to": "%s", "timeout_seconds": -1}' % TO, "invalid_request", id="negative-timeout"),
    pytest.param('{"to": "%s", "subject": %s}' % (TO, json.dumps("s" * 999)), "validation_failed", id="subject-999"),
    pytest.param('{"to": "%s", "channel": "sms"}' % TO, "validation_failed", id="channel-sms"),
    pytest.param('{"to": "%s@example.com"}' % ("a" * 300), "invalid_destination", id="to-300"),
    pytest.param('{"to": "%s", "idempotency_key": "%s"}' % (TO, "k" * 257), "invalid_request", id="key-257"),
    pytest.param('{"to": "%s", "idempotency_key": "%s"}' % (TO, "é" * 129), "invalid_request", id="key-258-bytes"),
    pytest.param('["%s"]' % TO, "invalid_request", id="array"),
    pytest.param('"%s"' % TO, "invalid_request", id="string"),
    pytest.param("null", "invalid_request", id="null"),
    pytest.param("42", "invalid_request", id="number"),
    pytest.param("", "invalid_request", id="empty"),
    pytest.param('{"to": "%s"' % TO, "invalid_request", id="truncated"),
    pytest.param('{"to": ["%s", "b@example.org"]}' % TO, "invalid_request", id="to-list"),
    pytest.param('{"to": {"address": "%s"}}' % TO, "invalid_request", id="to-object"),
    pytest.param('{"to": "%s", "params": {"code": 123456}}' % TO, "invalid_request", id="params-number"),
    pytest.param('{"to": "%s", "params": ["123456"]}' % TO, "invalid_request", id="params-list"),
    pytest.param('{"to": "%s", "timeout_seconds": "5"}' % TO, "invalid_request", id="timeout-string"),
    pytest.param('{"to": "%s", "timeout_seconds": true}' % TO, "invalid_request", id="timeout-bool"),
    *[pytest.param(json.dumps({"to": TO, field: value}), "invalid_request", id=f"{field}-{type(value).__name__}")
      for field, value in [("to", 123), ("subject", 5), ("body", {"x": 1}), ("channel", True), ("html", 1),
                           ("locale", 1), ("template", []), ("idempotency_key", 7), ("params", "code"),
                           ("timeout_seconds", 1.5)]],
    # JSON escapes can spell lone UTF-16 surrogates: no UTF-8 text can carry them.
    pytest.param('{"to": "%s", "subject": "\\ud800"}' % TO, "invalid_request", id="surrogate-subject"),
    pytest.param('{"to": "%s", "body": "x\\udc80"}' % TO, "invalid_request", id="surrogate-body"),
    pytest.param('{"to": "%s", "params": {"code": "\\ud800"}}' % TO, "invalid_request", id="surrogate-code"),
    pytest.param('{"to": "%s", "idempotency_key": "\\ud800"}' % TO, "invalid_request", id="surrogate-key"),
])
def test_malformed_json_is_refused(client, smtp_server, raw, code):
    assert_refused(smtp_server, 0, post(client, raw=raw), code)


@pytest.mark.parametrize("raw", [
    '{"to": "%s", "body": "%s"}' % (TO, "a" * 60000),  # one 60 kB line: encoded into short lines
    '{"to": "%s", "x": %s}' % (TO, "[" * 100 + "]" * 100),  # nested, but within reason, and unknown
    json.dumps({"to": TO, **{f"unknown{i}": i for i in range(3000)}}),
    json.dumps({"to": TO, "params": {f"p{i}": "v" for i in range(2000)}}),
    json.dumps({"to": TO, "timeout_seconds": 10 ** 100}),
    json.dumps({"to": TO, "idempotency_key": "k" * 256}),
    json.dumps({"to": TO, "subject": "Ünïcödé ✉ " * 80, "body": "日本語 " * 1000}),
], ids=["long-body", "nested-unknown", "many-fields", "many-params", "huge-timeout", "key-256", "unicode"])
def test_big_but_valid_json_is_sent_once(client, smtp_server, raw):
    assert_one_clean_mail(smtp_server, 0, post(client, raw=raw))


@pytest.mark.parametrize("raw", [
    b'{"to": "\xff\xfe@example.com"}',
    b'{"to": "user@example.com", "body": "\xc0\xaf"}',  # overlong '/'
    b'{"to": "user@example.com", "subject": "\xed\xa0\x80"}',  # an encoded surrogate
    b'\xef\xbb\xbf{"to": "user@example.com"}',  # UTF-8 byte order mark
    '{"to": "user@example.com"}'.encode("utf-16"),
    '{"to": "user@example.com", "subject": "é"}'.encode("latin-1"),
], ids=["ff-fe", "overlong", "surrogate", "bom", "utf-16", "latin-1"])
def test_invalid_utf8_is_refused(client, smtp_server, raw):
    assert_refused(smtp_server, 0, post(client, raw=raw), "invalid_request")


# -- Content-Type ----------------------------------------------------------------------

@pytest.mark.parametrize("content_type, sent", [
    ("application/json", True),
    ("application/json; charset=utf-8", True),
    ("application/json;charset=UTF-8", True),
    ("APPLICATION/JSON", True),
    ("application/merge-patch+json", True),  # a +json type is JSON
    ("application/json; charset=latin-1", True),  # JSON is UTF-8 whatever the label says
    ("text/plain", False),
    ("text/json", False),
    ("application/json-patch", False),
    ("application/jsonx", False),
    ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False),
    ("", False),
    (None, False),
])
def test_content_type_tricks(client, smtp_server, content_type, sent):
    r = client.post("/v1/send", data=json.dumps({"to": TO}), content_type=content_type)
    if sent:
        assert_one_clean_mail(smtp_server, 0, r)
    else:
        assert_refused(smtp_server, 0, r, "invalid_request", 415)


def test_a_body_over_the_limit_is_refused_before_parsing(client, smtp_server):
    r = post(client, raw=json.dumps({"to": TO, "body": "a" * 70000}))
    assert_refused(smtp_server, 0, r, "invalid_request", 413)


# -- through gunicorn: what the test client cannot send ---------------------------------

LIMIT = 4096  # the service's HTTP_BODY_LIMIT_BYTES


@pytest.fixture
def service(smtp_server, gunicorn):
    return gunicorn(smtp_server.env(HTTP_BODY_LIMIT_BYTES=str(LIMIT)), workers=1, threads=2)


def _request_of(size):
    """A valid send request of exactly `size` bytes."""
    padding = size - len(json.dumps({"to": TO, "body": ""}))
    return json.dumps({"to": TO, "body": "a" * padding}).encode()


def _post(service, body, chunked):
    """POST `body` (chunked, or with a Content-Length) from one thread while this one reads the
    answer: the service may answer 413 and close before the body is all sent, and the answer
    must be read all the same. Returns (status, parsed answer)."""
    pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    if chunked:
        head = b"Transfer-Encoding: chunked"
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    else:
        head = b"Content-Length: %d" % len(body)

    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as s:
        def send():
            try:
                s.sendall(b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + head + b"\r\n\r\n")
                for piece in pieces:
                    s.sendall(piece)
            except OSError:
                pass  # the service answered and closed before reading it all

        sender = threading.Thread(target=send)
        sender.start()
        answer = http.client.HTTPResponse(s)
        answer.begin()
        result = answer.status, json.loads(answer.read())
        sender.join()
    return result


BODY_SHAPES = pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])


@BODY_SHAPES
def test_a_body_of_exactly_the_limit_is_sent_and_one_byte_more_is_413(service, smtp_server, chunked):
    status, answer = _post(service, _request_of(LIMIT), chunked)
    assert (status, answer["ok"]) == (200, True)
    status, answer = _post(service, _request_of(LIMIT + 1), chunked)
    assert (status, answer["error_code"]) == (413, "invalid_request")
    assert len(smtp_server.messages) == 1


@BODY_SHAPES
def test_a_huge_body_is_cut_off_and_the_service_goes_on(service, smtp_server, chunked):
    status, answer = _post(service, _request_of(10_000_000), chunked)
    assert (status, answer["error_code"]) == (413, "invalid_request")
    assert smtp_server.messages == []
    assert service.post({"to": TO})[0] == 200


def _raw(service, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("header", [
    b"X-Request-ID: abc\r\n Set-Cookie: x=1",  # obsolete line folding
    b"X-Request-ID: abc\nSet-Cookie: x=1",  # bare LF
    b"X-Request-ID: abc\rSet-Cookie: x=1",  # bare CR
    b"X-Request-ID: abc\x00def",
    b"Idempotency-Key: abc\x00def",
    b"Idempotency-Key: abc\rX-Evil: 1",
    b"Idempotency-Key: abc\r\n\tX-Evil: 1",
])
def test_raw_header_tricks_through_gunicorn(service, smtp_server, header):
    body = json.dumps({"to": TO}).encode()
    request = (b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header
               + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    reply = _raw(service, request)
    head, _, payload = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"set-cookie" not in head.lower() and b"x-evil" not in head.lower()
    if status == 200:
        assert len(smtp_server.messages) == 1 and smtp_server.messages[0].rcpt_tos == [TO]
        rid = re.search(rb"(?im)^X-Request-ID: (.*)\r?$", head).group(1)
        assert re.fullmatch(rb"[0-9a-f]{32}|abc", rid)
    else:
        assert status == 400 and smtp_server.messages == []
