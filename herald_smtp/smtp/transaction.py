"""One mail on an open session: MAIL, RCPT, then the message by DATA or BDAT, reply by reply.

With PIPELINING (RFC 2920) the commands go out together and the replies are read in order.
With CHUNKING (RFC 3030) as well, MAIL, RCPT and `BDAT <size> LAST` with the message go out in
one write: one round trip per mail. Every path sends its steps and reads their replies in one
loop; what a reply that does not let the mail go on means is the decision table's (decisions.py).
Once the message has been written the server may accept it: from there on a reply that never
comes is DeliveryUnknown, and nothing is sent again.
"""

import dataclasses
import re
import smtplib

from ..errors import SendError
from . import decisions
from .decisions import DEADLINE, KEEP, LOST, OK, RelayFailed, Stale
from .deadline import timed_out
from .session import Session


@dataclasses.dataclass(frozen=True)
class Delivery:
    """How a mail went out: by which relay, on a reused session or not, in how many round trips
    (the replies waited for; a new session's from its greeting on)."""
    relay: str
    reused: bool
    round_trips: int
    bytes: int
    chunking: bool


def path(session: Session, chunking: bool = True) -> str:
    """How a mail goes out on this session: "DATA" or "BDAT", pipelined or not."""
    way = "BDAT" if chunking and session.extension("chunking") else "DATA"
    return way + (" pipelined" if session.extension("pipelining") else "")


def deliver(session: Session, sender: str, recipient: str, data: bytes, attempt_deadline: float,
            deadline: float, chunking: bool = True) -> Delivery:
    """Send one mail. Until the message goes out, the session works to `attempt_deadline` (what
    this relay may use of the send's time); the message and its reply get the whole `deadline`.

    Raises what the decision table says: RelayFailed (another relay may take it), Stale (a
    reused session could not: open another), or the answer (SendError, DeliveryUnknown).
    """
    reused = session.sent > 0
    session.until(attempt_deadline)
    smtp = session.smtp
    turns = smtp.turns if reused else 0  # a new session's count starts at its greeting
    way = path(session, chunking)
    bdat = way.startswith("BDAT")
    # Both addresses are validated plain addr-specs: no quoteaddr() parse needed.
    steps = [("MAIL", f"MAIL FROM:<{sender}>\r\n".encode("ascii")),
             ("RCPT", f"RCPT TO:<{recipient}>\r\n".encode("ascii"))]
    steps += [("message", _bdat(data))] if bdat else [("DATA", b"DATA\r\n"), ("message", _dot_stuff(data))]
    if way == "BDAT pipelined":
        batches = [steps]  # one write, one round trip
    elif way == "DATA pipelined":
        batches = [steps[:-1], steps[-1:]]  # the message waits for DATA's 354
    else:
        batches = [[step] for step in steps]
    written, stage = False, "MAIL"
    try:
        for batch in batches:
            stage = batch[0][0]
            if batch[-1][0] == "message":
                session.until(deadline)
                written = True
            smtp.send(b"".join(command for _, command in batch))
            for i, (stage, _) in enumerate(batch):
                code = smtp.getreply()[0]
                if decisions.outcome(stage, code) != OK:
                    raise _refused(session, stage, code, reused, written, [s for s, _ in batch[i + 1:]])
    except (SendError, RelayFailed, Stale):
        raise
    except Exception as e:
        session.close()
        late = timed_out(e, deadline if written else attempt_deadline)
        if not (written or late or isinstance(e, (OSError, smtplib.SMTPException))):
            raise SendError("send_failed", "unexpected error while talking to the SMTP server") from None
        raise decisions.failure(stage, DEADLINE if late else LOST, session.relay, reused=reused,
                                written=written) from None
    session.sent += 1
    return Delivery(session.relay.name, reused, smtp.turns - turns, len(data), bdat)


def _refused(session, stage, code, reused, written, pending) -> Exception:
    """A reply that does not let the mail go on: keep the session in step or drop it, as the
    table says, and return what to raise. `pending`: the stages whose replies are still due."""
    if decisions.decide(stage, code, written).session == KEEP:
        _settle(session, pending)
    else:  # a 452 leaves the connection open: say QUIT, without waiting for its 221
        if code != 421:  # a 421 closes the connection: nothing more will come
            _read_all(session, pending)
        session.close(polite=True, wait=False, until=session.smtp.deadline.at)
    return decisions.failure(stage, code, session.relay, reused=reused, written=written)


def _settle(session, pending) -> None:
    """Keep a session after a refusal: read the replies still due to pipelined commands, then
    RSET (within the session's deadline) so the next mail starts clean. A server that opened
    DATA or took the message after refusing the envelope is out of step: close it instead."""
    if _read_all(session, pending) and session.smtp.sock is not None:
        try:
            if session.smtp.rset()[0] == 250:
                return
        except (OSError, smtplib.SMTPException):
            pass
    session.close()


def _read_all(session, pending) -> bool:
    """Read the replies still due to pipelined commands (RFC 2920: a client reads them all),
    within the session's deadline. Also before a QUIT: a socket closed with replies unread goes
    out as a reset, which can take the QUIT with it. False when the session is out of step (the
    server opened DATA or took the message after refusing the envelope) or lost."""
    try:
        for stage in pending:
            if decisions.outcome(stage, session.smtp.getreply()[0]) == OK and stage in ("DATA", "message"):
                return False
    except (OSError, smtplib.SMTPException):
        return False
    return True


def _bdat(data: bytes) -> bytes:
    return b"BDAT %d LAST\r\n" % len(data) + data


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _dot_stuff(data: bytes) -> bytes:
    """RFC 5321 transparency (a line starting with '.' gets another) plus the end marker."""
    data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
