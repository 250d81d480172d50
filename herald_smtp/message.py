"""Message building: a validated send request becomes RFC 5322 bytes.

Nothing here knows HTTP or SMTP. Every header value that reaches the wire is checked for
control characters first and refused, never stripped, so no input can add a header line.
"""

import dataclasses
import email.policy
import re
import time
import uuid
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate

from email_validator import EmailNotValidError, validate_email

from .config import Config, has_control_chars
from .errors import SendError

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
    return valid.ascii_email


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

    def build(self, req: SendRequest) -> Envelope:
        to = recipient(req.to)
        subject = req.subject or DEFAULT_SUBJECT
        if has_control_chars(subject):
            raise SendError("validation_failed", "subject contains a control character")
        if len(subject) > MAX_SUBJECT_CHARS:
            raise SendError("validation_failed", f"subject is longer than {MAX_SUBJECT_CHARS} characters")
        msg = EmailMessage(policy=POLICY)
        msg["From"] = self.from_header
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = formatdate(time.time(), usegmt=True)
        # Never raw request text: a fresh id at the sender's own domain.
        msg["Message-ID"] = f"<{uuid.uuid4().hex}@{self.domain}>"
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(effective_body(req), charset="utf-8")
        if req.html:
            msg.add_alternative(req.html, subtype="html", charset="utf-8")
        # After the content: set_content() clears every Content-* header set before it.
        if _LANGUAGE_TAG.fullmatch(req.locale):
            msg["Content-Language"] = req.locale
        return Envelope(self.sender, to, msg.as_bytes())
