"""One mail on an open session: MAIL, RCPT, then the message by DATA or BDAT, reply by reply.

With PIPELINING (RFC 2920) the commands go out together and the replies are read in order.
With CHUNKING (RFC 3030) as well, MAIL, RCPT and `BDAT <size> LAST` with the message go out in
one write: one round trip per mail. Once the message has been written the server may accept it,
so from there on nothing is retried and no other relay is tried: an answer that never comes is
DeliveryUnknown. Before that, a refusal or a lost connection is the relay's (RelayFailed), except
a permanent refusal of the recipient, which is an answer about the address.
"""

import dataclasses
import re
import smtplib

from ..errors import DeliveryUnknown, SendError
from .deadline import timed_out
from .session import RelayFailed, Session, reply_error


class Stale(Exception):
    """A reused session died before anything of the mail was sent: a fresh one may carry it."""


@dataclasses.dataclass(frozen=True)
class Delivery:
    """How a mail went out: by which relay, on a reused session or not, in how many round trips
    (the replies waited for; a new session's from its greeting on)."""
    relay: str
    reused: bool
    round_trips: int
    bytes: int
    chunking: bool


def deliver(session: Session, sender: str, recipient: str, data: bytes, attempt_deadline: float,
            deadline: float, chunking: bool = True) -> Delivery:
    """Send one mail. Until the message goes out, the session works to `attempt_deadline` (what
    this relay may use of the send's time); the message and its reply get the whole `deadline`.

    Raises SendError (the answer), RelayFailed (another relay may take it), Stale (a reused
    session was dead: open another), DeliveryUnknown, or TimeoutError at `attempt_deadline`.
    """
    reused = session.sent > 0
    session.until(attempt_deadline)
    smtp = session.smtp
    turns = smtp.turns if reused else 0  # a new session's count starts at its greeting
    bdat = chunking and session.extension("chunking")
    written = False
    try:
        if bdat and session.extension("pipelining"):
            session.until(deadline)
            written = True  # the message goes out with the commands: from here, no retry
            smtp.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\n".encode("ascii") + _bdat(data))
            _answered(session, _replies(session, 3))
        else:
            mail, rcpt, opened = _envelope(smtp, sender, recipient, data_command=not bdat)
            _ready(session, reused, mail, rcpt, opened if not bdat else 354)
            session.until(deadline)
            written = True
            smtp.send(_bdat(data) if bdat else _dot_stuff(data))
            code, _ = smtp.getreply()
            if code != 250:
                raise _refused(session, "the message", code)
    except (SendError, RelayFailed, Stale):
        raise
    except Exception as e:
        session.close()
        whole = timed_out(e, deadline)
        if written:
            raise DeliveryUnknown("timeout" if whole else "send_failed",
                                  ("SMTP server did not answer before the deadline" if whole else "connection lost")
                                  + " after the message was sent; delivery unknown") from None
        if timed_out(e, attempt_deadline):
            raise TimeoutError from None
        if reused and isinstance(e, (OSError, smtplib.SMTPServerDisconnected)):
            raise Stale() from None
        if isinstance(e, (OSError, smtplib.SMTPException)):
            raise RelayFailed(SendError("provider_down", "connection to the SMTP server was lost"), "lost") from None
        raise SendError("send_failed", "unexpected error while talking to the SMTP server") from None
    session.sent += 1
    return Delivery(session.relay.name, reused, smtp.turns - turns, len(data), bdat)


def _envelope(smtp, sender, recipient, data_command=True):
    """Replies to MAIL, RCPT and DATA (None where not sent; DATA only with `data_command`).
    With PIPELINING the commands go out together."""
    if smtp.has_extn("pipelining"):
        # Both addresses are validated plain addr-specs: no quoteaddr() parse needed.
        smtp.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\n" + ("DATA\r\n" if data_command else ""))
        return tuple(smtp.getreply()[0] for _ in range(2 + data_command)) + (None,) * (not data_command)
    mail = smtp.mail(sender)[0]
    if mail != 250:
        return mail, None, None
    rcpt = smtp.rcpt(recipient)[0]
    if rcpt not in (250, 251) or not data_command:
        return mail, rcpt, None
    smtp.putcmd("data")
    return mail, rcpt, smtp.getreply()[0]


def _bdat(data: bytes) -> bytes:
    return b"BDAT %d LAST\r\n" % len(data) + data


def _ready(session, reused, mail, rcpt, opened):
    """Raise what the replies to MAIL, RCPT and DATA mean, unless the message may now go out
    (`opened` is 354 without a DATA command, for BDAT)."""
    if mail == 421 and reused:
        raise Stale()  # the cached session was closing
    if mail == 250 and rcpt in (250, 251) and opened == 354:
        return
    if opened == 354:
        session.close()  # a broken server opened DATA without a valid recipient: abandon the session
    if mail != 250:
        raise _failure(session, "the sender", mail)
    if rcpt not in (250, 251):
        if rcpt >= 500:  # about the address, not the relay
            raise _refused(session, "the recipient", rcpt, "invalid_destination")
        raise _failure(session, "the recipient", rcpt)
    raise _failure(session, "DATA", opened)


def _replies(session, n):
    """n reply codes, in order. If the connection fails after a refusal of MAIL or RCPT was read,
    the mail cannot have been taken: that refusal is the answer."""
    codes = []
    try:
        for _ in range(n):
            codes.append(session.smtp.getreply()[0])
    except Exception:
        if codes and (codes[0] != 250 or (len(codes) > 1 and codes[1] not in (250, 251))):
            session.close()
            _answered(session, codes + [None] * (n - len(codes)))
        raise
    return codes


def _answered(session, replies):
    """Raise what the replies to MAIL, RCPT and BDAT LAST mean, unless the mail was accepted.
    A refused MAIL or RCPT is the answer even if the server took the BDAT."""
    mail, rcpt, last = replies
    if mail == 250 and rcpt in (250, 251) and last == 250:
        return
    if last == 250:
        session.close()  # a broken server accepted the message without a valid recipient
    if mail != 250:
        raise _refused(session, "the sender", mail)
    if rcpt not in (250, 251):
        raise _refused(session, "the recipient", rcpt, "invalid_destination")
    raise _refused(session, "the message", last)


def _failure(session, stage, code):
    """A refusal before the message went out: the relay's, so another relay may take the mail."""
    return RelayFailed(_refused(session, stage, code), "deferred" if 400 <= code < 500 else "refused")


def _refused(session, stage, code, permanent_code="send_failed") -> SendError:
    if code == 421:
        session.close()  # the server is closing this session
    elif not session.closed:
        _reset(session)
    return reply_error(stage, code, permanent_code=permanent_code)


def _reset(session) -> None:
    """After a refused transaction, RSET (within the session's deadline) so the next one starts
    clean; close the session if that fails."""
    try:
        code, _ = session.smtp.rset()
        if code == 250:
            return
    except (OSError, smtplib.SMTPException, AttributeError):
        pass
    session.close()


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _dot_stuff(data: bytes) -> bytes:
    """RFC 5321 transparency (a line starting with '.' gets another) plus the end marker."""
    data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
