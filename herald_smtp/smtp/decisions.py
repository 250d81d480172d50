"""What each reply of the SMTP dialogue means for the session and for the send: one table, read
by the session (connect to AUTH) and by every way a mail goes out (DATA or BDAT, pipelined or
not), and printed in the README ("What each reply means").

Before the message goes out, a relay that cannot take the mail hands it to the next relay (and
sits out a cool-down); a reused session that died, or hit the server's per-session limit, gets
one fresh session of the same relay first. With BDAT pipelined, the message goes out with MAIL
and RCPT: a refusal of either still proves the mail was not taken, but a reply lost from there
on is the message's.
"""

import dataclasses

from ..errors import DeliveryUnknown, SendError

STAGES = ("connect", "greeting", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "message")
OK, LOST, DEADLINE = "ok", "lost", "deadline"
OUTCOMES = (OK, "421", "452", "4xx", "5xx", LOST, DEADLINE)

KEEP, DROP, NONE = "keep", "drop", "none"  # the session: RSET and reuse it; close it; there is none yet
GO_ON, SENT = "goes on", "sent"
NEXT = "next relay"  # this relay sits out its cool-down; `code` answers when no relay is left
FRESH = "fresh session, else next relay"  # a reused session: once more on a new one; a new one: NEXT
ANSWER = "answer"  # the relay answered: no other relay, no cool-down
UNKNOWN = "answer, delivery unknown"  # the message went out: never sent again


@dataclasses.dataclass(frozen=True)
class Decision:
    session: str
    then: str
    code: str  # the contract's error_code when the send ends here


# stage, the replies, what happens to the session, what the send does, its answer
ROWS = (
    ("connect", (LOST,), NONE, NEXT, "provider_down"),
    ("connect", (DEADLINE,), NONE, NEXT, "timeout"),
    ("greeting", (OK,), KEEP, GO_ON, ""),
    ("greeting", ("421", "4xx", "5xx", LOST), DROP, NEXT, "provider_down"),
    ("greeting", (DEADLINE,), DROP, NEXT, "timeout"),
    ("EHLO", (OK,), KEEP, GO_ON, ""),
    ("EHLO", ("421", "4xx", LOST), DROP, NEXT, "provider_down"),
    ("EHLO", ("5xx",), DROP, NEXT, "send_failed"),
    ("EHLO", (DEADLINE,), DROP, NEXT, "timeout"),
    ("STARTTLS", (OK,), KEEP, GO_ON, ""),
    ("STARTTLS", ("421", "4xx", LOST), DROP, NEXT, "provider_down"),
    ("STARTTLS", ("5xx",), DROP, NEXT, "send_failed"),
    ("STARTTLS", (DEADLINE,), DROP, NEXT, "timeout"),
    ("AUTH", (OK,), KEEP, GO_ON, ""),
    ("AUTH", ("421", "4xx", LOST), DROP, NEXT, "provider_down"),
    ("AUTH", ("5xx",), DROP, NEXT, "send_failed"),
    ("AUTH", (DEADLINE,), DROP, NEXT, "timeout"),
    ("MAIL", (OK,), KEEP, GO_ON, ""),
    ("MAIL", ("421", "452", LOST), DROP, FRESH, "provider_down"),  # 452: a per-session limit
    ("MAIL", ("4xx",), KEEP, NEXT, "provider_down"),
    ("MAIL", ("5xx",), KEEP, NEXT, "send_failed"),
    ("MAIL", (DEADLINE,), DROP, NEXT, "timeout"),
    ("RCPT", (OK,), KEEP, GO_ON, ""),
    ("RCPT", ("421", LOST), DROP, FRESH, "provider_down"),
    ("RCPT", ("4xx",), KEEP, NEXT, "provider_down"),
    ("RCPT", ("5xx",), KEEP, ANSWER, "invalid_destination"),  # about the address, not the relay
    ("RCPT", (DEADLINE,), DROP, NEXT, "timeout"),
    ("DATA", (OK,), KEEP, GO_ON, ""),
    ("DATA", ("421", LOST), DROP, FRESH, "provider_down"),
    ("DATA", ("4xx",), KEEP, NEXT, "provider_down"),
    ("DATA", ("5xx",), KEEP, NEXT, "send_failed"),
    ("DATA", (DEADLINE,), DROP, NEXT, "timeout"),
    ("message", (OK,), KEEP, SENT, ""),
    ("message", ("421",), DROP, ANSWER, "provider_down"),
    ("message", ("4xx",), KEEP, ANSWER, "provider_down"),
    ("message", ("5xx",), KEEP, ANSWER, "send_failed"),
    ("message", (LOST,), DROP, UNKNOWN, "send_failed"),
    ("message", (DEADLINE,), DROP, UNKNOWN, "timeout"),
)

TABLE = {(stage, outcome): Decision(session, then, code)
         for stage, outcomes, session, then, code in ROWS for outcome in outcomes}


def outcome(stage: str, reply) -> str:
    """The table's column for a reply code (or LOST, DEADLINE) at a stage. 452 has a column of
    its own only where the table gives it one (MAIL); a code that is neither 2xx (354 to DATA)
    nor 4xx counts as a permanent refusal."""
    if reply in OUTCOMES:  # already a column: LOST, DEADLINE, or "5xx" for AUTH not offered
        return reply
    if (300 <= reply < 400) if stage == "DATA" else (200 <= reply < 300):
        return OK
    if reply == 421 or (reply == 452 and (stage, "452") in TABLE):
        return str(reply)
    return "4xx" if 400 <= reply < 500 else "5xx"


def decide(stage: str, reply, written: bool = False) -> Decision:
    """What a reply (a code, LOST or DEADLINE) at `stage` means. `written`: the message already
    went out (BDAT pipelined), so a lost or late reply is the message's, whatever its stage."""
    return TABLE[_cell(stage, reply, written)]


def _cell(stage, reply, written):
    column = outcome(stage, reply)
    return ("message" if written and column in (LOST, DEADLINE) else stage), column


# -- what the answer says, and under which reason the relay's metrics count it -------------

WHAT = {"greeting": "the session", "EHLO": "the session", "STARTTLS": "STARTTLS", "AUTH": "authentication",
        "MAIL": "the sender", "RCPT": "the recipient", "DATA": "DATA", "message": "the message"}
TIMEOUT = "SMTP server did not answer before the deadline"


class RelayFailed(Exception):
    """NEXT: this relay cannot take the mail, and the server has not taken it: another relay may.
    `error` is the answer if none can; `reason` names the failure for metrics."""

    def __init__(self, error: SendError, reason: str):
        super().__init__(error.message)
        self.error, self.reason = error, reason


class Stale(Exception):
    """FRESH on a reused session: the server has not taken the mail, and a new session may."""


def failure(stage: str, reply, relay, *, reused: bool = False, written: bool = False, tls: bool = False,
            message: str = "", why: str = "") -> Exception:
    """What to raise for a reply that does not let the send go on: RelayFailed, Stale, or the
    answer (a SendError; DeliveryUnknown after the message). `tls`: the connection was lost in a
    TLS handshake. `message` and `why` (the metrics reason) replace the usual ones. The session
    is the caller's to keep or drop (decide(...).session)."""
    stage, column = _cell(stage, reply, written)
    decision = TABLE[(stage, column)]
    if decision.then == FRESH and reused:
        return Stale()
    err = (DeliveryUnknown if decision.then == UNKNOWN else SendError)(
        decision.code, message or _message(stage, reply, column, relay, decision, tls))
    if decision.then in (NEXT, FRESH):
        return RelayFailed(err, why or _reason(stage, column, tls))
    return err


def _message(stage, reply, column, relay, decision, tls):
    if decision.then == UNKNOWN:
        return (TIMEOUT if column == DEADLINE else "connection lost") + " after the message was sent; delivery unknown"
    if column == DEADLINE:
        return TIMEOUT
    if column == LOST:
        if tls:
            return "TLS handshake with the SMTP server failed"
        if stage in ("connect", "greeting"):
            return "SMTP server unreachable"
        return "connection to the SMTP server was lost"
    if stage == "greeting":
        return f"SMTP server refused the session ({reply})"
    if stage == "AUTH" and column == "5xx":
        return f"SMTP authentication failed; check {relay.prefix}USER and {relay.prefix}PASSWORD"
    if column == "5xx":
        return f"SMTP server rejected {WHAT[stage]} ({reply})"
    return f"SMTP server deferred {WHAT[stage]} (temporary {reply})"


def _reason(stage, column, tls):
    """The relay failure's `reason` label (README "Metrics")."""
    if column == DEADLINE:
        return "timeout"
    if column == LOST:
        return "tls" if tls else "unreachable" if stage in ("connect", "greeting") else "lost"
    if column == "5xx":
        return "auth" if stage == "AUTH" else "refused"
    return "deferred"
