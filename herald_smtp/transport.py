"""SMTP transport: stdlib smtplib on one reused connection per thread.

Like Postfix's connection cache, a session is reused for a bounded time and number of
messages, and a cached session the server has dropped is normal, not an error: if it fails
before the message data was handed over, we reconnect and try once more. Once the data has
been sent the mail may have been accepted, so we never retry after that point.
Knows nothing about HTTP; failures leave as SendError with a contract code.
"""

import logging
import re
import select
import smtplib
import socket
import ssl
import threading
import time

from .config import Config
from .errors import SendError
from .tls import tls_context

log = logging.getLogger("herald_smtp.transport")


class _Stale(Exception):
    """A reused connection died before the message data was sent: safe to retry once."""


class _Session:
    __slots__ = ("smtp", "opened", "last_used", "sent")

    def __init__(self, smtp):
        self.smtp = smtp
        self.opened = self.last_used = time.monotonic()
        self.sent = 0


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _ehlo(smtp) -> None:
    """EHLO, and a refusal is the session's failure (smtplib only returns the code)."""
    code, message = smtp.ehlo()
    if code != 250:
        raise smtplib.SMTPResponseException(code, message)


def _timed_out(e: BaseException, deadline: float) -> bool:
    """smtplib wraps socket timeouts in SMTPServerDisconnected; look through the chain."""
    while e is not None:
        if isinstance(e, TimeoutError):
            return True
        e = e.__cause__ or e.__context__
    return time.monotonic() >= deadline


def _reply_error(stage: str, code: int, *, permanent_code: str = "send_failed") -> SendError:
    # 421 and other 4xx are transient: the provider is (for now) down. 5xx is permanent.
    if 400 <= code < 500:
        return SendError("provider_down", f"SMTP server deferred {stage} (temporary {code})")
    return SendError(permanent_code, f"SMTP server rejected {stage} ({code})")


class Transport:
    def __init__(self, cfg: Config, metrics=None):
        self.cfg = cfg
        self.metrics = metrics
        self.helo = cfg.smtp_helo_name or socket.gethostname() or "localhost"
        self._local = threading.local()
        self._slots = threading.BoundedSemaphore(cfg.smtp_max_concurrent_sends)
        self._sessions = set()  # every open session, so a worker can QUIT them all on exit
        self._lock = threading.Lock()
        self._tls = tls_context(cfg)

    # -- public ------------------------------------------------------------------

    def send(self, sender: str, recipient: str, data: bytes, deadline: float) -> None:
        """Deliver one message before `deadline` (time.monotonic()) or raise SendError."""
        if not self._slots.acquire(blocking=False):
            raise SendError("rate_limited", "too many sends in progress; retry later")
        try:
            session = self._cached()
            try:
                if session is None:
                    session = self._open(deadline)
                try:
                    self._transaction(session, sender, recipient, data, deadline)
                except _Stale:
                    session = self._open(deadline)
                    self._transaction(session, sender, recipient, data, deadline, reused=False)
            except TimeoutError:
                raise SendError("timeout", "SMTP server did not answer before the deadline") from None
        finally:
            self._slots.release()

    def close_all(self) -> None:
        """QUIT every connection this process holds (gunicorn's worker_exit)."""
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            self._drop(s, polite=True)

    def probe(self, sender: str, deadline: float) -> None:
        """Go as far as a send without sending: connect, EHLO, STARTTLS, AUTH, MAIL FROM, then
        RSET and QUIT. Raises the SendError a send would (`python -m herald_smtp check`)."""
        try:
            session = self._open(deadline)
            try:
                self._step(session.smtp, deadline)
                code, _ = session.smtp.mail(sender)
                if code != 250:
                    raise _reply_error("the sender", code)
                self._step(session.smtp, deadline)
                session.smtp.rset()
            except (OSError, smtplib.SMTPException) as e:
                if _timed_out(e, deadline):
                    raise TimeoutError from None
                raise self._open_error(e) from None
            finally:
                self._drop(session, polite=True)
        except TimeoutError:
            raise SendError("timeout", "SMTP server did not answer before the deadline") from None

    # -- connections -------------------------------------------------------------

    def _cached(self):
        session = getattr(self._local, "session", None)
        if session is None:
            return None
        now = time.monotonic()
        if (now - session.last_used > self.cfg.smtp_max_idle_seconds
                or session.sent >= self.cfg.smtp_max_messages_per_connection):
            self._drop(session, polite=True, wait=False)  # a request is waiting: say QUIT, don't wait for 221
            return None
        if self._readable(session):
            # The server spoke unasked (a 421 before closing) or closed: it is gone.
            self._drop(session)
            return None
        return session

    @staticmethod
    def _readable(session) -> bool:
        sock = session.smtp.sock
        try:
            return sock is None or bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def _open(self, deadline: float) -> _Session:
        cfg = self.cfg
        smtp = None
        try:
            timeout = _remaining(deadline)
            cls = smtplib.SMTP_SSL if cfg.smtp_use_tls else smtplib.SMTP
            extra = {"context": self._tls} if cfg.smtp_use_tls else {}
            # Connects and reads the greeting (SMTPConnectError unless 220).
            smtp = cls(cfg.smtp_host, cfg.smtp_port, local_hostname=self.helo, timeout=timeout, **extra)
            self._step(smtp, deadline)
            _ehlo(smtp)
            if cfg.smtp_use_starttls:
                if not smtp.has_extn("starttls"):
                    raise SendError("provider_down", "SMTP server does not offer STARTTLS; refusing to send in clear")
                self._step(smtp, deadline)
                smtp.starttls(context=self._tls)
                self._step(smtp, deadline)
                _ehlo(smtp)
            if cfg.smtp_user:
                self._step(smtp, deadline)
                smtp.login(cfg.smtp_user, cfg.smtp_password)
        except SendError:
            self._discard(smtp)
            raise
        except Exception as e:
            self._discard(smtp)
            if _timed_out(e, deadline):
                raise TimeoutError from None
            raise self._open_error(e) from None
        session = _Session(smtp)
        self._local.session = session
        with self._lock:
            self._sessions.add(session)
        if self.metrics:
            self.metrics.connection("opened")
        return session

    @staticmethod
    def _open_error(e: BaseException) -> SendError:
        if isinstance(e, smtplib.SMTPAuthenticationError):
            if 400 <= e.smtp_code < 500:
                return SendError("provider_down", f"SMTP server deferred authentication (temporary {e.smtp_code})")
            return SendError("send_failed", "SMTP authentication failed; check SMTP_USER and SMTP_PASSWORD")
        if isinstance(e, smtplib.SMTPNotSupportedError):
            return SendError("send_failed", "SMTP server does not offer AUTH")
        if isinstance(e, (ssl.SSLError, ssl.CertificateError)):
            return SendError("provider_down", "TLS handshake with the SMTP server failed")
        if isinstance(e, smtplib.SMTPConnectError):
            return SendError("provider_down", f"SMTP server refused the session ({e.smtp_code})")
        if isinstance(e, smtplib.SMTPResponseException):
            return _reply_error("the session", e.smtp_code)
        if isinstance(e, (OSError, smtplib.SMTPException)):
            return SendError("provider_down", "SMTP server unreachable")
        return SendError("send_failed", "unexpected error while connecting to the SMTP server")

    @staticmethod
    def _step(smtp, deadline: float) -> None:
        """Bound the next exchange by what is left of the whole send's deadline."""
        if smtp.sock is not None:
            smtp.sock.settimeout(_remaining(deadline))

    def _drop(self, session: _Session, polite: bool = False, wait: bool = True) -> None:
        """Forget a session; `polite` ends it with QUIT (and, with `wait`, reads the 221)."""
        with self._lock:
            self._sessions.discard(session)
        if getattr(self._local, "session", None) is session:
            self._local.session = None
        smtp = session.smtp
        if polite and smtp.sock is not None:
            try:
                smtp.sock.settimeout(2)
                if wait:
                    smtp.quit()
                    return
                smtp.send("QUIT\r\n")
            except (OSError, smtplib.SMTPException):
                pass
        self._discard(smtp)

    @staticmethod
    def _discard(smtp) -> None:
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass

    # -- one mail ----------------------------------------------------------------

    def _transaction(self, session, sender, recipient, data, deadline, reused=None) -> None:
        reused = session.sent > 0 if reused is None else reused
        if reused and self.metrics:
            self.metrics.connection("reused")
        smtp = session.smtp
        committed = False
        try:
            mail, rcpt, data_reply = self._envelope(smtp, sender, recipient, deadline)
            if mail == 421 and reused:
                raise smtplib.SMTPServerDisconnected("cached session closing")
            failure = (("the sender", mail, "send_failed") if mail != 250 else
                       ("the recipient", rcpt, "invalid_destination") if rcpt not in (250, 251) else
                       ("DATA", data_reply, "send_failed") if data_reply != 354 else None)
            if failure:
                if data_reply == 354:
                    # A broken server opened DATA without a valid recipient: abandon the session.
                    self._drop(session)
                    raise _reply_error(*failure[:2], permanent_code=failure[2])
                raise self._refused(session, *failure)
            committed = True  # from here on the server may accept the mail: no retry
            self._step(smtp, deadline)
            smtp.send(_dot_stuff(data))
            code, _ = smtp.getreply()
            if code != 250:
                raise self._refused(session, "the message", code)
        except SendError:
            raise
        except Exception as e:
            self._drop(session)
            if _timed_out(e, deadline):
                raise TimeoutError from None
            if committed:
                raise SendError("send_failed", "connection lost after the message was sent; delivery unknown") from None
            if reused and isinstance(e, (OSError, smtplib.SMTPServerDisconnected)):
                raise _Stale() from None
            if isinstance(e, (OSError, smtplib.SMTPException)):
                raise SendError("provider_down", "connection to the SMTP server was lost") from None
            raise SendError("send_failed", "unexpected error while talking to the SMTP server") from None
        session.sent += 1
        session.last_used = time.monotonic()

    def _envelope(self, smtp, sender, recipient, deadline):
        """Replies to MAIL, RCPT and DATA (None where not sent).

        When the server offers PIPELINING (RFC 2920) the three go out in one round trip and
        the replies are read in order; otherwise each waits for the one before.
        """
        self._step(smtp, deadline)
        if smtp.has_extn("pipelining"):
            # Both addresses are validated plain addr-specs: no quoteaddr() parse needed.
            smtp.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n")
            replies = []
            for _ in range(3):
                self._step(smtp, deadline)
                replies.append(smtp.getreply()[0])
            return tuple(replies)
        mail = smtp.mail(sender)[0]
        if mail != 250:
            return mail, None, None
        self._step(smtp, deadline)
        rcpt = smtp.rcpt(recipient)[0]
        if rcpt not in (250, 251):
            return mail, rcpt, None
        self._step(smtp, deadline)
        smtp.putcmd("data")
        return mail, rcpt, smtp.getreply()[0]

    def _refused(self, session, stage, code, permanent_code="send_failed") -> SendError:
        if code == 421:
            self._drop(session)  # the server is closing this session
        else:
            self._reset(session)
        return _reply_error(stage, code, permanent_code=permanent_code)

    def _reset(self, session) -> None:
        """After a refused transaction, RSET so the next one starts clean; drop if that fails."""
        try:
            session.smtp.sock.settimeout(2)
            code, _ = session.smtp.rset()
            if code == 250:
                session.last_used = time.monotonic()
                return
        except (OSError, smtplib.SMTPException, AttributeError):
            pass
        self._drop(session)


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _dot_stuff(data: bytes) -> bytes:
    """RFC 5321 transparency (a line starting with '.' gets another) plus the end marker."""
    data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
