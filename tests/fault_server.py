"""A scripted SMTP server on 127.0.0.1 for byte-exact misbehaviour aiosmtpd cannot be made to show.

One thread per connection; PIPELINING on request. `fault(step, action)` makes the server misbehave at a step
(greeting, ehlo, starttls, handshake, tls-ehlo, auth, mail, rcpt, data, message, dot, rset, quit) until
`heal()`, or `times` times. "handshake" is the TLS handshake after STARTTLS's 220, "tls-ehlo" the EHLO after
it, "message" the reading of the data after DATA's 354 or of a BDAT chunk, "dot" the reply to the data
(after the final dot, or to BDAT LAST). Actions:
  "close"  drop the connection without a reply
  "stall"  stop answering, or at "message" stop reading the data (until the client gives up and closes)
  "dribble"  send the usual reply one byte every DRIBBLE_SECONDS
  "plain"  (starttls) say 220, then keep talking plain text instead of TLS
  "4xx ..." / "5xx ..."  that reply; after a 421 the server closes, as RFC 5321 says
`session_limit=(n, reply)` answers MAIL with `reply` once a session has carried n messages (Exim's
`smtp_accept_max_per_connection` says 421 and closes; OpenSMTPD's `max-mails` says 452 and keeps the
connection open). Otherwise it behaves like a small, correct server. `received` holds every message whose final
'.' arrived; `accepted` those it answered 250 to (what a real server would deliver).
"""

import socket
import threading
import time

DEFAULT_REPLY = {
    "greeting": "220 fault.example ESMTP ready",
    "mail": "250 2.1.0 OK",
    "rcpt": "250 2.1.5 OK",
    "data": "354 End data with <CR><LF>.<CR><LF>",
    "dot": "250 2.0.0 queued",
    "auth": "235 2.7.0 Authentication successful",
    "starttls": "220 2.0.0 Ready to start TLS",
    "rset": "250 2.0.0 OK",
    "quit": "221 2.0.0 Bye",
}
DRIBBLE_SECONDS = 0.4


class FaultServer:
    def __init__(self, certs=None, auth=False, pipelining=False, rcvbuf=None, chunking=False,
                 bdat_without_recipients=False, session_limit=None):
        self.certs, self.auth = certs, auth  # certs: offer STARTTLS with this trustme CA
        self.pipelining = pipelining  # offer PIPELINING: the client sends MAIL, RCPT and DATA at once
        self.chunking = chunking  # offer CHUNKING: the message may come by BDAT (its final reply is "dot")
        self.bdat_without_recipients = bdat_without_recipients  # a broken server: 250 to BDAT after every RCPT was refused
        self.session_limit = session_limit
        self.received, self.accepted = [], []
        self.recipients = []  # RCPT addresses per accepted message
        self.sessions = 0
        self.commands = []  # every command verb received, in order
        self.command_times = []  # time.monotonic() of each, when it arrived
        self._faults = {}
        self._conns = set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        if rcvbuf:  # a small receive window, so a client's writes block once the server stops reading
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    # -- script ------------------------------------------------------------------

    def fault(self, step, action, times=None):
        with self._lock:
            self._faults[step] = [action, times]

    def heal(self):
        with self._lock:
            self._faults.clear()

    def kick(self, reply="421 4.4.2 idle too long, closing"):
        """Say `reply` unasked on every open connection and close it (an idle-timeout drop)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.sendall(reply.encode() + b"\r\n")
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def connections(self) -> int:
        """Sessions open now (a client's close counts once the server has read it)."""
        with self._lock:
            return len(self._conns)

    def stop(self):
        self._stopped.set()
        self._listener.close()
        self.heal()
        self.kick()

    def env(self, **extra):
        env = {"SMTP_HOST": "localhost" if self.certs else "127.0.0.1", "SMTP_PORT": str(self.port),
               "SMTP_FROM": "noreply@example.com", "SMTP_USE_TLS": "false",
               "SMTP_USE_STARTTLS": "true" if self.certs else "false"}
        if self.certs:
            env["SMTP_CA_FILE"] = self.certs.ca_file
        if self.auth:
            env.update(SMTP_USER="herald", SMTP_PASSWORD="fault-password")
        env.update(extra)
        return env

    def _take(self, step):
        with self._lock:
            entry = self._faults.get(step)
            if entry is None:
                return None
            if entry[1] is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._faults[step]
            return entry[0]

    # -- sessions ----------------------------------------------------------------

    def _accept(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self.sessions += 1
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self._session(conn)
        except OSError:
            pass  # the client went away; that is its business
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, conn, step, default=None, on_ok=None):
        """Reply for `step` as scripted: "ok", "refused" (a scripted reply), or None when the session is over.

        `on_ok` runs before a normal reply goes out, so a client never sees a 250 we have not recorded."""
        action = self._take(step)
        if action is None and on_ok:
            on_ok()
        if action == "close":
            return None
        if action == "stall":
            self._stall(conn)
            return None
        reply = (default or DEFAULT_REPLY.get(step)) if action in (None, "plain", "dribble") else action
        if action == "dribble":
            for byte in reply.encode() + b"\r\n":  # until the client gives up (a write then fails)
                conn.sendall(bytes([byte]))
                time.sleep(DRIBBLE_SECONDS)
        else:
            conn.sendall(reply.encode() + b"\r\n")
        if reply.startswith("421"):
            return None
        return "ok" if action is None else ("plain" if action == "plain" else "refused")

    def _arrived(self, conn, message, rcpts) -> bool:
        """A whole message: recorded, then answered as scripted ("dot"); False if the session is over."""
        self.received.append(message)

        def accept():
            self.accepted.append(message)
            self.recipients.append(rcpts)

        return self._answer(conn, "dot", on_ok=accept) is not None

    def _stall_reading(self):
        """Keep the connection open without reading from it (the client's close stays unseen
        behind the unread data), until the server stops."""
        self._stopped.wait()

    @staticmethod
    def _stall(conn):
        conn.settimeout(None)
        while conn.recv(4096):  # until the client closes its end
            pass

    def _session(self, conn):
        rfile = conn.makefile("rb")
        if not self._answer(conn, "greeting"):
            return
        tls, greeted, mail_from, rcpts, chunks = False, False, None, [], []
        carried = 0  # messages this session carried
        while True:
            line = rfile.readline(4096)
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper()
            self.command_times.append(time.monotonic())
            self.commands.append(verb.decode("ascii", "replace"))
            if verb in (b"EHLO", b"HELO"):
                lines = (["fault.example"] + (["STARTTLS"] if self.certs and not tls else [])
                         + (["AUTH PLAIN LOGIN"] if self.auth else [])
                         + (["PIPELINING"] if self.pipelining else []) + (["CHUNKING"] if self.chunking else [])
                         + ["8BITMIME"])
                ehlo = "\r\n".join(f"250{' ' if i == len(lines) - 1 else '-'}{x}" for i, x in enumerate(lines))
                outcome = self._answer(conn, "tls-ehlo" if tls else "ehlo", ehlo)
                if outcome is None:
                    return
                greeted = outcome == "ok"
            elif verb == b"STARTTLS":
                outcome = self._answer(conn, "starttls")
                if outcome is None:
                    return
                if outcome == "ok" and self._take("handshake") == "stall":
                    self._stall(conn)
                    return
                if outcome == "ok":
                    with self._lock:
                        self._conns.discard(conn)
                        conn = self.certs.server_context().wrap_socket(conn, server_side=True)
                        self._conns.add(conn)
                    rfile, tls, greeted = conn.makefile("rb"), True, False  # RFC 3207: EHLO again
                elif outcome == "plain":
                    conn.sendall(b"this is not a TLS handshake\r\n")
            elif verb == b"AUTH":
                if not self._answer(conn, "auth"):
                    return
            elif verb == b"MAIL" and not greeted:
                conn.sendall(b"503 5.5.1 EHLO/HELO first\r\n")  # as real servers do
            elif verb == b"MAIL" and self.session_limit and carried >= self.session_limit[0]:
                conn.sendall(self.session_limit[1].encode() + b"\r\n")
                if self.session_limit[1].startswith("421"):
                    return
            elif verb == b"MAIL":
                outcome = self._answer(conn, "mail")
                if outcome is None:
                    return
                mail_from, rcpts = (line, []) if outcome == "ok" else (None, [])
            elif verb == b"RCPT" and mail_from is None:
                conn.sendall(b"503 5.5.1 MAIL first\r\n")
            elif verb == b"RCPT":
                outcome = self._answer(conn, "rcpt")
                if outcome is None:
                    return
                if outcome == "ok":
                    rcpts.append(line[8:].strip().decode())
            elif verb == b"DATA" and (mail_from is None or not rcpts):
                conn.sendall(b"503 5.5.1 no valid recipients\r\n")
            elif verb == b"DATA":
                outcome = self._answer(conn, "data")
                if outcome is None:
                    return
                if outcome != "ok":
                    continue
                if self._take("message") == "stall":
                    rfile.read(65536)  # some of the data, then no more
                    self._stall_reading()
                    return
                data = []
                while True:
                    chunk = rfile.readline(65536)
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    data.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                carried += 1
                if not self._arrived(conn, b"".join(data), rcpts):
                    return
                mail_from, rcpts = None, []
            elif verb == b"BDAT":
                size, last = int(line.split()[1]), line.split()[-1].upper() == b"LAST"
                if self._take("message") == "stall":
                    self._stall_reading()
                    return
                chunk = rfile.read(size)
                if len(chunk) < size:
                    return
                if (mail_from is None or not rcpts) and not self.bdat_without_recipients:
                    conn.sendall(b"554 5.5.1 no valid recipients\r\n")  # RFC 3030: the chunk is discarded
                    mail_from, rcpts, chunks = None, [], []
                    continue
                chunks.append(chunk)
                if not last:
                    conn.sendall(b"250 2.0.0 chunk received\r\n")
                    continue
                message, chunks = b"".join(chunks), []
                carried += 1
                if not self._arrived(conn, message, rcpts):
                    return
                mail_from, rcpts = None, []
            elif verb == b"RSET":
                mail_from, rcpts, chunks = None, [], []
                if self._answer(conn, "rset") is None:
                    return
            elif verb == b"NOOP":
                conn.sendall(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                self._answer(conn, "quit")
                return
            else:
                conn.sendall(b"502 5.5.2 command not recognised\r\n")
