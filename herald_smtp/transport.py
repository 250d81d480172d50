"""SMTP transport: stdlib smtplib on one reused connection per thread.

Like Postfix's connection cache, a session is reused for a bounded time and number of
messages, and a cached session the server has dropped is normal, not an error: if it fails
before the message data was handed over, we reconnect and try once more. Once the data has
been sent the mail may have been accepted, so we never retry after that point.
Every byte read or written, at every stage, waits only for what is left of the send's one
deadline, so no server can stretch a send past it.
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
from .errors import DeliveryUnknown, SendError

log = logging.getLogger("herald_smtp.transport")

QUIT_SECONDS = 2  # what a session being closed (too old, idle, worker exit) may take to say goodbye


class _Stale(Exception):
    """A reused connection died before the message data was sent: safe to retry once."""


class Deadline:
    """When (time.monotonic()) the session's current work must be over. One per session, shared
    by its plain socket and the TLS socket that replaces it at STARTTLS."""
    __slots__ = ("at",)

    def __init__(self, at: float):
        self.at = at


class _DeadlineIO:
    """Socket methods that wait only for what is left of the deadline. A socket timeout alone
    restarts at every recv, so a server dribbling a byte at a time would never be cut off."""
    deadline: Deadline

    def _arm(self):
        left = self.deadline.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("SMTP deadline passed")
        self.settimeout(left)

    def recv(self, *args):
        self._arm()
        return super().recv(*args)

    def recv_into(self, *args):
        self._arm()
        return super().recv_into(*args)

    def send(self, *args):
        self._arm()
        return super().send(*args)

    def sendall(self, *args):
        # A plain socket's sendall is bounded as a whole by its timeout; a TLS one calls send().
        self._arm()
        return super().sendall(*args)


class _Socket(_DeadlineIO, socket.socket):
    pass


class _TLSSocket(_DeadlineIO, ssl.SSLSocket):
    """What our TLS context wraps sockets in (its sslsocket_class)."""

    @classmethod
    def _create(cls, sock, *args, **kwargs):
        sock._arm()  # the handshake inside is bounded as a whole by the socket's timeout
        tls = super()._create(sock, *args, **kwargs)
        tls.deadline = sock.deadline
        return tls


def _connect(host: str, port: int, deadline: Deadline) -> _Socket:
    """socket.create_connection on a deadline socket: every address tried shares the deadline."""
    error = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _Socket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock._arm()
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise
            error = e
    raise error or OSError("the SMTP host has no address")


class _SMTP(smtplib.SMTP):
    """smtplib on deadline sockets, from the connect through the greeting, TLS and every command."""

    def __init__(self, deadline: Deadline, helo: str, tls: ssl.SSLContext = None, implicit_tls: bool = False):
        super().__init__(local_hostname=helo)  # no host: open() connects
        self.deadline, self.tls, self.implicit_tls = deadline, tls, implicit_tls

    def open(self, host: str, port: int) -> None:
        self._host = host  # starttls() checks the certificate against it
        code, message = self.connect(host, port)
        if code != 220:
            self.close()
            raise smtplib.SMTPConnectError(code, message)

    def _get_socket(self, host, port, timeout):
        sock = _connect(host, port, self.deadline)
        return self.tls.wrap_socket(sock, server_hostname=host) if self.implicit_tls else sock


class _Session:
    __slots__ = ("smtp", "opened", "last_used", "sent")

    def __init__(self, smtp: _SMTP):
        self.smtp = smtp
        self.opened = self.last_used = time.monotonic()
        self.sent = 0

    def until(self, deadline: float) -> None:
        """Bound everything the session does from now on by `deadline`."""
        self.smtp.deadline.at = deadline


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
        self._tls = None
        if cfg.smtp_use_tls or cfg.smtp_use_starttls:
            self._tls = ssl.create_default_context(cafile=cfg.smtp_ca_file or None)
            if cfg.smtp_skip_tls_verify:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
            self._tls.sslsocket_class = _TLSSocket  # TLS reads and writes keep the deadline too

    # -- public ------------------------------------------------------------------

    def send(self, sender: str, recipient: str, data: bytes, deadline: float) -> None:
        """Deliver one message before `deadline` (time.monotonic()) or raise SendError.
        DeliveryUnknown: the data went out, its reply did not come back."""
        if not self._slots.acquire(blocking=False):
            raise SendError("rate_limited", "too many sends in progress; retry later")
        try:
            session = self._cached(deadline)
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
        """QUIT every connection this process holds (gunicorn's worker_exit), within QUIT_SECONDS."""
        with self._lock:
            sessions = list(self._sessions)
        until = time.monotonic() + QUIT_SECONDS
        for s in sessions:
            self._drop(s, polite=True, until=until)

    def probe(self, sender: str, deadline: float) -> None:
        """Go as far as a send without sending: connect, EHLO, STARTTLS, AUTH, MAIL FROM, then
        RSET and QUIT. Raises the SendError a send would (`python -m herald_smtp check`)."""
        try:
            session = self._open(deadline)
            try:
                code, _ = session.smtp.mail(sender)
                if code != 250:
                    raise _reply_error("the sender", code)
                session.smtp.rset()
            except (OSError, smtplib.SMTPException) as e:
                if _timed_out(e, deadline):
                    raise TimeoutError from None
                raise self._open_error(e) from None
            finally:
                self._drop(session, polite=True, until=deadline)
        except TimeoutError:
            raise SendError("timeout", "SMTP server did not answer before the deadline") from None

    # -- connections -------------------------------------------------------------

    def _cached(self, deadline: float):
        session = getattr(self._local, "session", None)
        if session is None:
            return None
        now = time.monotonic()
        if (now - session.last_used > self.cfg.smtp_max_idle_seconds
                or session.sent >= self.cfg.smtp_max_messages_per_connection):
            # A request is waiting: say QUIT, don't wait for 221.
            self._drop(session, polite=True, wait=False, until=min(deadline, now + QUIT_SECONDS))
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
        smtp = _SMTP(Deadline(deadline), self.helo, self._tls, cfg.smtp_use_tls)
        try:
            smtp.open(cfg.smtp_host, cfg.smtp_port)  # connect and greeting (SMTPConnectError unless 220)
            _ehlo(smtp)
            if cfg.smtp_use_starttls:
                if not smtp.has_extn("starttls"):
                    raise SendError("provider_down", "SMTP server does not offer STARTTLS; refusing to send in clear")
                smtp.starttls(context=self._tls)
                _ehlo(smtp)
            if cfg.smtp_user:
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

    def _drop(self, session: _Session, polite: bool = False, wait: bool = True, until: float = 0) -> None:
        """Forget a session; `polite` ends it with QUIT (and, with `wait`, reads the 221) by `until`."""
        with self._lock:
            self._sessions.discard(session)
        if getattr(self._local, "session", None) is session:
            self._local.session = None
        smtp = session.smtp
        if polite and smtp.sock is not None:
            session.until(until)
            try:
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
        session.until(deadline)
        smtp = session.smtp
        committed = False
        try:
            mail, rcpt, data_reply = self._envelope(smtp, sender, recipient)
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
            smtp.send(_dot_stuff(data))
            code, _ = smtp.getreply()
            if code != 250:
                raise self._refused(session, "the message", code)
        except SendError:
            raise
        except Exception as e:
            self._drop(session)
            timed_out = _timed_out(e, deadline)
            if committed:
                raise DeliveryUnknown("timeout" if timed_out else "send_failed",
                                      ("SMTP server did not answer before the deadline" if timed_out else
                                       "connection lost") + " after the message was sent; delivery unknown") from None
            if timed_out:
                raise TimeoutError from None
            if reused and isinstance(e, (OSError, smtplib.SMTPServerDisconnected)):
                raise _Stale() from None
            if isinstance(e, (OSError, smtplib.SMTPException)):
                raise SendError("provider_down", "connection to the SMTP server was lost") from None
            raise SendError("send_failed", "unexpected error while talking to the SMTP server") from None
        session.sent += 1
        session.last_used = time.monotonic()

    @staticmethod
    def _envelope(smtp, sender, recipient):
        """Replies to MAIL, RCPT and DATA (None where not sent).

        When the server offers PIPELINING (RFC 2920) the three go out in one round trip and
        the replies are read in order; otherwise each waits for the one before.
        """
        if smtp.has_extn("pipelining"):
            # Both addresses are validated plain addr-specs: no quoteaddr() parse needed.
            smtp.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n")
            return tuple(smtp.getreply()[0] for _ in range(3))
        mail = smtp.mail(sender)[0]
        if mail != 250:
            return mail, None, None
        rcpt = smtp.rcpt(recipient)[0]
        if rcpt not in (250, 251):
            return mail, rcpt, None
        smtp.putcmd("data")
        return mail, rcpt, smtp.getreply()[0]

    def _refused(self, session, stage, code, permanent_code="send_failed") -> SendError:
        if code == 421:
            self._drop(session)  # the server is closing this session
        else:
            self._reset(session)
        return _reply_error(stage, code, permanent_code=permanent_code)

    def _reset(self, session) -> None:
        """After a refused transaction, RSET (within the send's deadline) so the next one starts
        clean; drop the session if that fails."""
        try:
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
