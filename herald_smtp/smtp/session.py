"""SMTP sessions: opening one with a relay (connect, greeting, EHLO, STARTTLS, AUTH), holding it
for reuse, and closing it politely.

Like Postfix's connection cache, a session is reused for a bounded time and number of messages:
each worker thread keeps one per relay, and a reaper thread QUITs the ones left idle too long,
so a quiet service holds no connections at the provider. Every byte a session reads or writes
waits only for what is left of its deadline (deadline.py), so no server can stretch a send past
it. What a failed step means is the decision table's (decisions.py).
"""

import select
import smtplib
import ssl
import threading
import time

from ..config import Relay
from ..errors import SendError
from . import decisions
from .decisions import DEADLINE, LOST, RelayFailed
from .deadline import Deadline, connect, timed_out

QUIT_SECONDS = 2  # what a session being closed (too old, idle, worker exit) may take to say goodbye


class _CredentialsRefused(smtplib.SMTPResponseException):
    """535: the server refused the credentials. Not an SMTPAuthenticationError, so smtplib's
    login() stops here rather than try its next mechanism: at the provider, every try counts as
    another failed login (and some lock an account after a few)."""


class _SMTP(smtplib.SMTP):
    """smtplib on deadline sockets, from the connect through the greeting, TLS and every command.
    `turns` counts the times it waited for the server after speaking (round trips)."""

    def __init__(self, deadline: Deadline, helo: str, tls: ssl.SSLContext = None, implicit_tls: bool = False):
        super().__init__(local_hostname=helo)  # no host: open() connects
        self.deadline, self.tls, self.implicit_tls = deadline, tls, implicit_tls
        self.turns, self._spoke = 0, True  # the greeting is the first wait
        self.stage = "connect"  # the step under way, in the decision table's words

    def open(self, host: str, port: int) -> None:
        self._host = host  # starttls() checks the certificate against it
        code, message = self.connect(host, port)
        if code != 220:
            raise smtplib.SMTPConnectError(code, message)

    def _get_socket(self, host, port, timeout):
        sock = connect(host, port, self.deadline)
        if self.implicit_tls:
            sock = self.tls.wrap_socket(sock, server_hostname=host)
        self.stage = "greeting"
        return sock

    def send(self, s):
        self._spoke = True
        super().send(s)

    def auth(self, mechanism, authobject, *, initial_response_ok=True):
        try:
            return super().auth(mechanism, authobject, initial_response_ok=initial_response_ok)
        except smtplib.SMTPAuthenticationError as e:
            if e.smtp_code == 535:
                raise _CredentialsRefused(e.smtp_code, e.smtp_error) from None
            raise

    def getreply(self):
        self.turns += self._spoke
        self._spoke = False
        return super().getreply()


def _ehlo(smtp) -> None:
    """EHLO, and a refusal is the session's failure (smtplib only returns the code)."""
    code, message = smtp.ehlo()
    if code != 250:
        raise smtplib.SMTPResponseException(code, message)


class Session:
    """One open SMTP session with one relay. `starttls`: the server offered STARTTLS."""

    def __init__(self, relay: Relay, smtp: _SMTP, starttls: bool = False):
        self.relay, self.smtp, self.starttls = relay, smtp, starttls
        self.last_used = time.monotonic()
        self.sent = 0
        self.busy = False  # a send holds it (set and read under Sessions' lock)
        self.closed = False

    @classmethod
    def open(cls, relay: Relay, tls, helo: str, deadline: float) -> "Session":
        """Connect, read the greeting, EHLO, STARTTLS (required when configured) and AUTH, all by
        `deadline`. RelayFailed, as the decision table says, when the relay cannot be used."""
        smtp = _SMTP(Deadline(deadline), relay.helo_name or helo, tls, relay.use_tls)
        try:
            smtp.open(relay.host, relay.port)
            smtp.stage = "EHLO"
            _ehlo(smtp)
            starttls = smtp.has_extn("starttls")
            if relay.use_starttls:
                smtp.stage = "STARTTLS"
                if not starttls:
                    raise decisions.failure("STARTTLS", LOST, relay, why="no_starttls", message=(
                        "SMTP server does not offer STARTTLS; refusing to send in clear"))
                smtp.starttls(context=tls)
                smtp.stage = "EHLO"
                _ehlo(smtp)
            if relay.user:
                smtp.stage = "AUTH"
                smtp.login(relay.user, relay.password)
        except RelayFailed:
            _close(smtp, quit=True)
            raise
        except Exception as e:
            _close(smtp, quit=isinstance(e, smtplib.SMTPResponseException))  # a refusal: it still listens
            raise _open_failure(e, smtp.stage, relay, deadline) from None
        return cls(relay, smtp, starttls)

    def offered(self) -> tuple:
        """The extensions that decide how a mail goes out, as the relay's EHLO named them."""
        features = self.smtp.esmtp_features
        offered = [name.upper() for name in ("pipelining", "chunking") if name in features]
        if "size" in features:
            offered.append(" ".join(["SIZE"] + features["size"].split()))
        if "auth" in features:  # smtplib joins "AUTH x" and "AUTH=x" lines: name each mechanism once
            offered.append(" ".join(["AUTH"] + list(dict.fromkeys(features["auth"].upper().split()))))
        return tuple(offered) + (("STARTTLS",) if self.starttls else ())

    def tls_version(self) -> str:
        """The TLS version the session speaks ("TLSv1.3"), or "" in clear."""
        sock = self.smtp.sock
        return (sock.version() or "") if isinstance(sock, ssl.SSLSocket) else ""

    def until(self, deadline: float) -> None:
        """Bound everything the session does from now on by `deadline`."""
        self.smtp.deadline.at = deadline

    def extension(self, name: str) -> bool:
        return self.smtp.has_extn(name)

    def gone(self) -> bool:
        """The server spoke unasked (a 421 before closing) or closed: the session is dead."""
        sock = self.smtp.sock
        try:
            return sock is None or bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def close(self, polite: bool = False, wait: bool = True, until: float = 0) -> None:
        """End the session; `polite` says QUIT first (and, with `wait`, reads the 221) by `until`."""
        self.closed = True
        if polite and self.smtp.sock is not None:
            self.until(until)
            try:
                if wait:
                    self.smtp.quit()
                    return
                self.smtp.send("QUIT\r\n")
            except (OSError, smtplib.SMTPException):
                pass
        _close(self.smtp)


def _close(smtp, quit: bool = False) -> None:
    """Close the connection; with `quit`, say QUIT first, without waiting for its 221."""
    try:
        if quit and smtp.sock is not None:
            smtp.send("QUIT\r\n")
    except (OSError, smtplib.SMTPException):
        pass
    try:
        smtp.close()
    except OSError:
        pass


def _open_failure(e: BaseException, stage: str, relay: Relay, deadline: float) -> RelayFailed:
    if timed_out(e, deadline):
        return decisions.failure(stage, DEADLINE, relay)
    if isinstance(e, smtplib.SMTPResponseException):  # a refusal: the greeting's, EHLO's, AUTH's...
        return decisions.failure(stage, e.smtp_code, relay)
    if stage == "AUTH" and isinstance(e, smtplib.SMTPException) and not isinstance(e, smtplib.SMTPServerDisconnected):
        # smtplib's own refusal: no AUTH offered, or no mechanism it speaks; a permanent one.
        message = ("SMTP server does not offer AUTH" if isinstance(e, smtplib.SMTPNotSupportedError)
                   else "SMTP server offers no AUTH mechanism herald-smtp speaks (PLAIN, LOGIN, CRAM-MD5)")
        return decisions.failure(stage, "5xx", relay, message=message)
    if isinstance(e, (OSError, smtplib.SMTPException)):
        return decisions.failure(stage, LOST, relay, tls=isinstance(e, ssl.SSLError))
    return RelayFailed(SendError("send_failed", "unexpected error while connecting to the SMTP server"),
                       "unexpected")


class Sessions:
    """The sessions of one worker: one per thread and relay, for reuse, and all of them, so the
    reaper can QUIT the idle ones and a worker at exit all of them."""

    def __init__(self, max_idle: float, max_messages: int):
        self.max_idle, self.max_messages = max_idle, max_messages
        self._local = threading.local()
        self._all = set()
        self._lock = threading.Lock()
        self._reaper = None
        self._stop = threading.Event()

    def take(self, relay: Relay, deadline: float):
        """This thread's open session with `relay`, marked busy, or None (a stale one is closed)."""
        session = getattr(self._local, relay.name, None)
        if session is None:
            return None
        now = time.monotonic()
        with self._lock:
            if session.closed:  # the reaper took it
                setattr(self._local, relay.name, None)
                return None
            session.busy = True
        if now - session.last_used > self.max_idle or session.sent >= self.max_messages:
            # A request is waiting: say QUIT, don't wait for 221.
            self.drop(session, polite=True, wait=False, until=min(deadline, now + QUIT_SECONDS))
            return None
        if session.gone():
            self.drop(session)
            return None
        return session

    def add(self, session: Session) -> None:
        """A new session, busy with its first send."""
        session.busy = True
        setattr(self._local, session.relay.name, session)
        with self._lock:
            self._all.add(session)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="herald-smtp-reaper", daemon=True)
                self._reaper.start()

    def release(self, session: Session) -> None:
        """The send is over and the session may be reused."""
        with self._lock:
            session.busy = False
            session.last_used = time.monotonic()

    def drop(self, session: Session, polite: bool = False, wait: bool = True, until: float = 0) -> None:
        with self._lock:
            self._all.discard(session)
        if getattr(self._local, session.relay.name, None) is session:
            setattr(self._local, session.relay.name, None)
        session.close(polite, wait, until)

    def close_all(self) -> None:
        """QUIT every session within QUIT_SECONDS (gunicorn's worker_exit), and stop the reaper."""
        self._stop.set()
        with self._lock:
            sessions, self._all = list(self._all), set()
        until = time.monotonic() + QUIT_SECONDS
        for session in sessions:
            session.close(polite=True, until=until)

    def _reap(self) -> None:
        """QUIT the sessions idle past SMTP_MAX_IDLE_SECONDS, looking again when the next one will be."""
        wait = self.max_idle
        while not self._stop.wait(min(max(wait, 0.05), 1.0)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._all if not s.busy and now - s.last_used > self.max_idle]
                for session in idle:
                    session.closed = True  # its thread sees this at its next take()
                    self._all.discard(session)
                left = [s.last_used + self.max_idle - now for s in self._all if not s.busy]
            for session in idle:
                session.close(polite=True, until=time.monotonic() + QUIT_SECONDS)
            wait = min(left, default=self.max_idle)
