"""SMTP transport: what the API calls to deliver a mail. Knows nothing about HTTP.

Three jobs, kept apart as Postfix's SMTP client keeps them: choosing a relay and remembering
which failed (relays.py), holding sessions with a relay (session.py), and running one mail on a
session (transaction.py). What each reply means, whether the session is kept, retried fresh or
dropped and whether the send moves to the next relay, is one table (decisions.py). All relays
share the send's one deadline. Failures leave as SendError with a contract code.
"""

import dataclasses
import smtplib
import socket
import threading
import time

from ..config import Config
from ..errors import DeliveryUnknown, SendError
from . import decisions
from .deadline import timed_out, tls_context
from .decisions import DEADLINE, LOST, TIMEOUT, RelayFailed, Stale
from .relays import Relays
from .session import Session, Sessions
from .transaction import Delivery, deliver, path


@dataclasses.dataclass(frozen=True)
class Offer:
    """What a relay offers, as `check` reports it: the extensions that choose a mail's path,
    the TLS version the session spoke ("" in clear), and that path."""
    extensions: tuple
    tls: str
    path: str


class Transport:
    def __init__(self, cfg: Config, metrics=None):
        self.cfg = cfg
        self.metrics = metrics
        self.helo = cfg.smtp_helo_name or socket.gethostname() or "localhost"
        self.relays = Relays(cfg.relays, cfg.smtp_relay_cooldown_seconds)
        self.sessions = Sessions(cfg.smtp_max_idle_seconds, cfg.smtp_max_messages_per_connection)
        self._tls = {relay.name: tls_context(relay) for relay in cfg.relays}
        self._slots = threading.BoundedSemaphore(cfg.smtp_max_concurrent_sends)
        for relay in cfg.relays:
            self._count(relay.name)  # every relay's series from the start, so rate() sees a 0

    def send(self, sender: str, recipient: str, data: bytes, deadline: float) -> Delivery:
        """Deliver one message before `deadline` (time.monotonic()) or raise SendError (its
        `relay` names the last relay tried). DeliveryUnknown: the data went out, its reply did not
        come back."""
        if not self._slots.acquire(blocking=False):
            raise SendError("rate_limited", "too many sends in progress; retry later")
        try:
            return self._send(sender, recipient, data, deadline)
        finally:
            self._slots.release()

    def close_all(self) -> None:
        """QUIT every connection this process holds (gunicorn's worker_exit)."""
        self.sessions.close_all()

    def available(self) -> bool:
        """Some relay is not in cool-down."""
        return self.relays.available()

    def probe(self, relay, sender: str, deadline: float) -> Offer:
        """Go as far as a send through `relay` without sending: connect, EHLO, STARTTLS, AUTH,
        MAIL FROM, then RSET and QUIT. Returns what the relay offers; raises the SendError a
        send would (`check`)."""
        try:
            session = Session.open(relay, self._tls[relay.name], self.helo, deadline)
            try:
                code, _ = session.smtp.mail(sender)
                if code == 250:
                    offer = Offer(session.offered(), session.tls_version(), path(session, self.cfg.smtp_chunking))
                    session.smtp.rset()
            except (OSError, smtplib.SMTPException) as e:  # smtplib wraps a lost socket in the latter
                raise decisions.failure("MAIL", DEADLINE if timed_out(e, deadline) else LOST, relay) from None
            finally:
                session.close(polite=True, until=deadline)
            if code != 250:
                raise decisions.failure("MAIL", code, relay)
            return offer
        except RelayFailed as failed:
            raise failed.error from None

    def _send(self, sender, recipient, data, deadline):
        order = self.relays.order()
        error = SendError("timeout", TIMEOUT)
        for i, relay in enumerate(order):
            now = time.monotonic()
            if now >= deadline:
                break
            # Until the message goes out, a relay may use its share of the time left; then the whole.
            attempt = now + (deadline - now) / (len(order) - i)
            try:
                delivery = self._attempt(relay, sender, recipient, data, attempt, deadline)
            except RelayFailed as failed:  # the decision table's "next relay"
                error = self._failed(relay, failed.error, failed.reason)
                continue
            except SendError as answer:  # the table's answers: about the address, or after the message
                answer.relay = relay.name
                if isinstance(answer, DeliveryUnknown):
                    self._count(relay.name, failure="unknown")
                else:
                    self._succeeded(relay, sent=False)  # it answered
                raise
            self._succeeded(relay, sent=True)
            return delivery
        raise error

    def _attempt(self, relay, sender, recipient, data, attempt, deadline) -> Delivery:
        session = self.sessions.take(relay, attempt)
        if session is not None and self.metrics:
            self.metrics.connection("reused")
        try:
            if session is None:
                session = self._open(relay, attempt)
            try:
                return deliver(session, sender, recipient, data, attempt, deadline, self.cfg.smtp_chunking)
            except Stale:  # the table's "fresh session": once, on a new session of this relay
                self.sessions.drop(session)
                session = self._open(relay, attempt)
                return deliver(session, sender, recipient, data, attempt, deadline, self.cfg.smtp_chunking)
        finally:
            if session is not None:
                self.sessions.drop(session) if session.closed else self.sessions.release(session)

    def _open(self, relay, attempt) -> Session:
        session = Session.open(relay, self._tls[relay.name], self.helo, attempt)
        self.sessions.add(session)
        if self.metrics:
            self.metrics.connection("opened")
        return session

    def _failed(self, relay, error: SendError, reason: str) -> SendError:
        until = self.relays.failed(relay)
        self._count(relay.name, failure=reason, cooldown_until=until)
        error.relay = relay.name
        return error

    def _succeeded(self, relay, sent: bool) -> None:
        ended = self.relays.succeeded(relay)
        self._count(relay.name, sent=sent, cooldown_until=0.0 if ended else None)

    def _count(self, relay: str, sent=False, failure="", cooldown_until=None) -> None:
        if self.metrics:
            self.metrics.relay(relay, sent, failure, cooldown_until)
