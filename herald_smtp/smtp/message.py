"""Message building: a validated send request becomes RFC 5322 bytes.

Nothing here knows HTTP or SMTP. Every header value that reaches the wire is checked for
control characters first and refused, never stripped, so no input can add a header line.
"""

import dataclasses
import email.policy
import functools
import hashlib
import hmac
import random
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from email.contentmanager import _encode_text  # set_content()'s own encoder; private, so tests pin its output
from email.header import Header
from email.headerregistry import Address
from email.utils import format_datetime

from email_validator import EmailNotValidError, validate_email

from ..config import Config, has_control_chars
from ..errors import SendError

# email-validator's own domain check (length, characters, UTS-46, IDNA), remembered per domain:
# a few domains take most mail and the check costs ~20 us each time. The same function decides;
# a refusal raises, so it is never remembered and an invalid domain is checked (and refused) anew.
_validator = sys.modules["email_validator.validate_email"]  # where validate_email looks it up (pinned 2.4.0)
if not hasattr(_validator.validate_email_domain_name, "cache_info"):
    _validator.validate_email_domain_name = functools.lru_cache(maxsize=1024)(_validator.validate_email_domain_name)
domain_check = _validator.validate_email_domain_name

DEFAULT_SUBJECT = "Verification code"
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit, the contract's bound for a subject
# CRLF line ends and a 7-bit body: non-ASCII text goes quoted-printable or base64, so
# every line stays far below 998 octets and no server needs 8BITMIME.
POLICY = email.policy.SMTP.clone(cte_type="7bit")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*")


@dataclasses.dataclass(frozen=True)
class SendRequest:
    """What the caller asked for, after type checks; `to` is still as given."""
    to: str
    subject: str = ""
    body: str = ""
    html: str = ""
    params: dict = dataclasses.field(default_factory=dict)
    locale: str = ""
    template: str = ""


@dataclasses.dataclass(frozen=True)
class Envelope:
    sender: str
    recipient: str
    data: bytes


def recipient(to: str) -> str:
    """Exactly one address, syntax and IDN only (no DNS); returns its ASCII form for the wire."""
    if has_control_chars(to):
        raise SendError("validation_failed", "to contains a control character")
    if not to.strip():
        raise SendError("invalid_destination", "to is required")
    try:
        valid = validate_email(to.strip(), check_deliverability=False, allow_smtputf8=False,
                               allow_display_name=False, allow_quoted_local=False,
                               allow_domain_literal=False, allow_empty_local=False)
    except EmailNotValidError:
        raise SendError("invalid_destination", "to is not exactly one valid email address") from None
    if "=?" in valid.ascii_email and not _header_says(valid.ascii_email):
        raise SendError("invalid_destination", "to is not exactly one valid email address")
    return valid.ascii_email


def _header_says(address: str) -> bool:
    """The To header's parser decodes RFC 2047 words, even in an address: "=?utf-8?q?a=40b.org=2C_c?=@x"
    would be written as two addresses. True when the header would name exactly `address`."""
    try:
        return str(POLICY.header_store_parse("To", address)[1]) == address
    except ValueError:
        return False


def effective_body(req: SendRequest) -> str:
    if req.body:
        return req.body
    code = req.params.get("code")
    if code:
        return f"Your verification code is: {code}"
    return "You have a verification message. Please check your code."


def _ascii_domain(address: str) -> str:
    domain = address.rpartition("@")[2]
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "herald-smtp.invalid"


class MessageBuilder:
    """Turns SendRequests into wire bytes for one configured sender."""

    def __init__(self, cfg: Config):
        local, _, _ = cfg.smtp_from.rpartition("@")
        self.domain = _ascii_domain(cfg.smtp_from)
        self.sender = f"{local}@{self.domain}" if local else ""
        self.from_header = Address(display_name=cfg.smtp_from_name, addr_spec=self.sender) if self.sender else None
        self._from_line = _from(self.from_header)
        # Every replica of one deployment derives the same Message-ID from a key; the password,
        # when there is one, keeps anyone else from telling which key an id came from.
        self._id_hmac = hmac.new(hashlib.sha256(f"message-id\0{cfg.sender_scope}\0{cfg.smtp_password}".encode()).digest(),
                                 digestmod=hashlib.sha256)

    def message_id(self, key: str = "") -> str:
        """`<id@sender's domain>`: a keyed hash of the idempotency key, so every copy sent for one
        key carries the same id (never the key itself); random without a key."""
        if not key:
            return f"<{uuid.uuid4().hex}@{self.domain}>"
        mac = self._id_hmac.copy()  # a copy of the keyed state skips hashing the key each time
        mac.update(key.encode())
        return f"<{mac.hexdigest()[:32]}@{self.domain}>"

    def build(self, req: SendRequest, key: str = "") -> Envelope:
        """The bytes EmailMessage(policy=POLICY) with set_content() and add_alternative() would write,
        but for an encoded Subject (see _subject) and text with control characters (transfer_encoding).

        Writing them directly takes tens of microseconds instead of about a millisecond;
        tests/test_message_equivalence.py proves the output equal over a varied corpus.
        """
        to = recipient(req.to)
        subject = req.subject or DEFAULT_SUBJECT
        if has_control_chars(subject):
            raise SendError("validation_failed", "subject contains a control character")
        # The header parser decodes RFC 2047 words: "=?utf-8?q?=0D=0A?=" would write a line break.
        if "=?" in subject and has_control_chars(str(POLICY.header_store_parse("Subject", subject)[1])):
            raise SendError("validation_failed", "subject contains an encoded control character")
        if len(subject) > MAX_SUBJECT_CHARS:
            raise SendError("validation_failed", f"subject is longer than {MAX_SUBJECT_CHARS} characters")
        head = [self._from_line, _short("To", to), _subject(subject),
                date_line(),
                _short("Message-ID", self.message_id(key)),
                b"Auto-Submitted: auto-generated\r\n"]
        plain = effective_body(req)
        if "\x00" in plain or "\x00" in req.html:  # RFC 2045 allows NUL in no transfer encoding's text
            raise SendError("validation_failed", "body or html contains a NUL character")
        text_head, text = _text_part(plain, "plain")
        if req.html:
            html_head, html = _text_part(req.html, "html")
            b = _boundary(text, html).encode("ascii")
            head.append(b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n boundary="%s"\r\n' % b)
            # EmailMessage gives the part it creates for the alternative a MIME-Version of its own.
            body = b"".join((b"--", b, b"\r\n", text_head, b"\r\n", text, b"\r\n--", b, b"\r\n",
                             html_head, b"MIME-Version: 1.0\r\n\r\n", html, b"\r\n--", b, b"--\r\n"))
        else:
            head += (text_head, b"MIME-Version: 1.0\r\n")
            body = text
        if _LANGUAGE_TAG.fullmatch(req.locale):
            head.append(_fold_cached("Content-Language", req.locale))
        head += (b"\r\n", body)
        return Envelope(self.sender, to, b"".join(head))


_date = (None, b"")  # (second, its Date line): the line is formatted once a second


def date_line() -> bytes:
    """`Date: Sun, 06 Dec 2026 09:18:02 +0000`, for now, formatted once a second (it has no finer part)."""
    global _date
    second, line = _date
    now = int(time.time())
    if second != now:
        line = _short("Date", format_datetime(datetime.fromtimestamp(now, timezone.utc)))
        _date = (now, line)  # one assignment: a thread reads the old pair or the new, never half
    return line


# Folding with the modern policy (parse, RFC 2047, refold) is what made building cost ~1 ms.
# It stays the authority for every header; only values that fold to themselves skip it.
def _fold(name: str, value) -> bytes:
    return POLICY.fold_binary(*POLICY.header_store_parse(name, value))


_fold_cached = functools.lru_cache(maxsize=512)(_fold)  # locales repeat
_LONG_WORD = re.compile(r"\S{60}")


def _encoded_words(name: str, text: str) -> str:
    """`text` as RFC 2047 encoded words that each carry their own spaces, folded for header `name`."""
    return Header(text, "utf-8", header_name=name).encode(linesep="\r\n", maxlinelen=76)


def _needs_encoded_words(text: str) -> bool:
    return not text.isascii() or _LONG_WORD.search(text) is not None


@functools.lru_cache(maxsize=512)  # subjects repeat
def _subject(subject: str) -> bytes:
    """The Subject line, so that every space survives decoding. The policy's folder writes the
    space between two words it must encode as the folding whitespace between two encoded words,
    which decoders drop (RFC 2047, 6.2): "учётную запись пользователя" became "записьпользователя".
    Text it must encode (not ASCII, or a word too long for a line) goes out as encoded words that
    each carry their own spaces, none longer than RFC 2047's 75 characters."""
    if not _needs_encoded_words(subject):
        return _fold("Subject", subject)
    return f"Subject: {_encoded_words('Subject', subject)}\r\n".encode("ascii")


def from_value(address) -> str:
    """The From value when the display name needs encoded words (else None): as for a subject, the
    policy's folder loses spaces between them ("été κωδικός" read as "étéκωδικός")."""
    if address is None or not _needs_encoded_words(address.display_name):
        return None
    value = f"{_encoded_words('From', address.display_name)} <{address.addr_spec}>"
    if len(("From: " + value).rpartition("\n")[2]) > POLICY.max_line_length:
        value = value.replace(" <", "\r\n <")
    return value


def _from(address) -> bytes:
    value = from_value(address)
    return _fold("From", address) if value is None else f"From: {value}\r\n".encode("ascii")


def _short(name: str, value: str) -> bytes:
    """A short ASCII value with nothing the parser would decode (an RFC 2047 "=?") is its own fold."""
    line = f"{name}: {value}"
    if len(line) <= POLICY.max_line_length and value.isascii() and "=?" not in value:
        return line.encode("ascii") + b"\r\n"
    return _fold(name, value)


_RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 but tab and line ends, and DEL


def transfer_encoding(text: str):
    """None (the stdlib's choice of 7bit, quoted-printable or base64), or quoted-printable for text
    with control characters, which the stdlib would send raw under 7bit."""
    return "quoted-printable" if _RAW_CONTROL.search(text) else None


def _text_part(text: str, subtype: str):
    """(headers, body) of a text/* part: the stdlib's encoder, as set_content() runs it."""
    cte, payload = _encode_text(text, "utf-8", transfer_encoding(text), POLICY)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    return head.encode("ascii"), payload.replace("\n", "\r\n").encode("ascii")


def _boundary(*parts: bytes) -> str:
    """email.generator's boundary shape, never a line of the parts it separates."""
    while True:
        boundary = "=" * 15 + "%019d" % random.randrange(sys.maxsize) + "=="
        if not any(b"--" + boundary.encode("ascii") in part for part in parts):
            return boundary
