"""gunicorn's gthread worker, taking a request to a thread only once all of it has arrived.

The stock worker gives a connection to a thread at its first byte, and the thread then reads the
headers on a blocking socket with no time limit: a few clients sending a byte a second hold every
thread, and nothing restarts the worker (its main loop still beats). Here the main loop reads each
request, head and body, without blocking, beside the listening socket; a request that has not
arrived by its deadline has its connection closed. A thread only ever gets a whole request, so
slow clients cost a little memory each, bounded per worker, never a thread.

    `gunicorn -c gunicorn.conf.py app:app` (worker_class = "herald_smtp.http.worker.ThreadWorker")
"""

import re
import selectors
import socket
import time
from functools import partial

from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers import gthread

from ..config import server_config

# Per worker. Connections waiting for a request (kept alive between requests, or a request under
# way): one more closes the oldest, so a flood of idle or half-open connections can never stop the
# worker accepting; a real request waits in this state for microseconds, a slow one for seconds.
MAX_WAITING = 100
# Connections answered and half-closed, waiting up to CLOSE_LINGER for the client to close too
# (so the answer is not cut off by a reset); one more closes the oldest at once.
MAX_CLOSING = 100
CLOSE_LINGER = 2.0
# Workers share one listening socket and every one of them is woken for a new connection, and a
# kept-alive connection stays with the worker that accepted it: left to chance, a client's pool of
# connections can land mostly on one worker, which then does the work of all on one core. So a
# worker holding connections lets a new one wait a moment that grows with how many it holds: the
# worker holding the fewest accepts it first; a worker takes it anyway at the end of its wait if no
# other did. A millisecond a connection: the poller's own resolution, so every count waits a
# different time.
ACCEPT_DELAY_PER_CONNECTION = 0.001  # seconds
ACCEPT_DELAY_MAX = 0.03
# An answer the client does not take in this long ends its connection (it only happens to a
# client that sends many requests and reads no answer, until the socket's buffer is full).
SEND_TIMEOUT = 10.0

_CHUNKED = re.compile(rb"\r\ntransfer-encoding:", re.I)
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.I)
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*\r\n", re.I)


def received(data, body_limit: int):
    """How much of one HTTP/1.1 request `data` starts with: (head_end, whole). head_end is the
    index after the blank line that ends the head, -1 until it arrives; whole: the body is here
    too, or is larger than body_limit (the app refuses it unread)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return -1, False
    head, start = bytes(data[:end + 2]), end + 4
    if _CHUNKED.search(head):
        return start, len(data) - start > body_limit or _chunked_end(data, start) is not None
    length = _LENGTH.search(head)
    length = int(length.group(1)) if length else 0
    return start, length > body_limit or len(data) - start >= length


def _chunked_end(data, pos):
    """Index after the last chunk and its trailers, None while they have not all arrived."""
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(data[pos:eol]).split(b";")[0], 16)
        except ValueError:
            return len(data)  # not chunked encoding: the parser answers 400
        if size == 0:  # then trailer fields, if any, and an empty line
            trailers = eol + 2
            if data[trailers:trailers + 2] == b"\r\n":
                return trailers + 2
            end = data.find(b"\r\n\r\n", trailers)
            return None if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if pos > len(data):
            return None


class _BufferedUnreader(SocketUnreader):
    """What the main loop read, then (only for a body it did not hold) the socket, until the deadline."""
    deadline = 0.0

    def chunk(self, size_hint=None):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return b""  # as if the client had closed: the request fails and its connection closes
        previous = self.sock.gettimeout()
        self.sock.settimeout(remaining if previous is None else min(previous, remaining))
        try:
            return super().chunk(size_hint)
        except (socket.timeout, BlockingIOError):
            return b""
        finally:
            self.sock.settimeout(previous)


class ThreadWorker(gthread.ThreadWorker):
    """gthread, with requests read in the main loop; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = server_config()  # the master's, inherited
        self.header_timeout = cfg.http_header_timeout_seconds
        self.body_timeout = cfg.http_body_timeout_seconds
        self.body_limit = cfg.http_body_limit_bytes
        # The largest head gunicorn's parser accepts (request line, fields): beyond it, no request.
        self.head_limit = (self.cfg.limit_request_line + 4 +
                           self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2))
        self.waiting = {}  # TConn -> None, oldest first
        self.closing = {}
        # The stock loop stops accepting at worker_connections; a full waiting set makes room instead.
        self.worker_connections = min(self.cfg.worker_connections, MAX_WAITING + MAX_CLOSING + self.cfg.threads + 1)
        # Waiting before an accept (see ACCEPT_DELAY_PER_CONNECTION): since when a connection has
        # been waiting, and until when; `waited`: the wait just ended, so the next one is taken.
        self.accept_pending_since, self.accept_again, self.accept_waited = None, 0.0, False
        self.unserved = {}  # connections no whole request has come on yet: conn -> accepted at

    @classmethod
    def check_config(cls, cfg, log):
        if cfg.is_ssl:
            raise RuntimeError("herald_smtp.http.worker reads requests before any TLS; terminate TLS in a proxy")
        super().check_config(cfg, log)

    # -- the main loop: waiting for a request --------------------------------------------

    def accept(self, listener):
        now = time.monotonic()
        held = self.held(now)
        if self.cfg.workers > 1 and held and not self.accept_waited:
            since = self.accept_pending_since = self.accept_pending_since or now
            self.accept_again = since + min(held * ACCEPT_DELAY_PER_CONNECTION, ACCEPT_DELAY_MAX)
            if now < self.accept_again:
                self.set_accept_enabled(False)  # a worker holding fewer may take it meanwhile
                return
        self.accept_pending_since, self.accept_waited = None, False
        try:
            sock, client = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.nr_conns += 1
        conn = gthread.TConn(self.cfg, sock, client, listener.getsockname())  # non-blocking
        conn.data = bytearray()
        self.unserved[conn] = time.monotonic()
        self.wait(conn, time.monotonic() + self.header_timeout, idle=False)

    def held(self, now):
        """The connections a new one is weighed against: not those closing, nor those that have
        not sent a whole request in a second (a slow or idle client is no load to balance)."""
        stale = 0
        for accepted in self.unserved.values():  # oldest first
            if now - accepted < 1.0:
                break
            stale += 1
        return self.nr_conns - len(self.closing) - stale

    def set_accept_enabled(self, enabled):
        # The stock loop turns accepting back on whenever it is below worker_connections.
        enabled = enabled and time.monotonic() >= self.accept_again
        if enabled and not self._accepting and self.accept_pending_since is not None:
            self.accept_waited = True  # what is still there after the wait is this worker's
        super().set_accept_enabled(enabled)

    def wait(self, conn, deadline, idle):
        """Read conn's next request here until `deadline`. idle: nothing sent yet on a kept-alive
        connection (its header clock starts at the first byte)."""
        if len(self.waiting) >= MAX_WAITING:
            self.close(next(iter(self.waiting)))
        conn.deadline, conn.idle, conn.head_end, conn.continued = deadline, idle, -1, False
        if not self.alive:  # a stopping worker answers what is on its way, briefly
            conn.deadline = min(deadline, time.monotonic() + gthread.STOP_KEEPALIVE_LINGER)
        self.waiting[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_readable, conn))
        if conn.data:
            self.advance(conn)  # pipelined: the next request may be here already

    def on_readable(self, conn, sock):
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        if conn.idle:
            conn.idle, conn.deadline = False, time.monotonic() + self.header_timeout
        conn.data += data
        self.advance(conn)

    def advance(self, conn):
        head_end, whole = received(conn.data, self.body_limit)
        if head_end < 0:
            if len(conn.data) > self.head_limit:
                self.close(conn)  # no request of ours has a head this large
            return
        if conn.head_end < 0:  # the head is here: the body's clock starts
            conn.head_end, conn.deadline = head_end, time.monotonic() + self.body_timeout
        if whole:
            self.dispatch(conn, body_read=len(conn.data) - head_end <= self.body_limit)
        elif not conn.continued and _EXPECT_CONTINUE.search(bytes(conn.data[:head_end])):
            # The client waits for this before it sends the body (gunicorn sends another later;
            # clients read any number of 1xx answers).
            conn.continued = True
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass

    def dispatch(self, conn, body_read):
        """Give a thread the whole request; the stock handle() parses it from memory."""
        self.forget(conn)
        self.unserved.pop(conn, None)
        if conn.parser is None:
            conn.parser = RequestParser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader = _BufferedUnreader(conn.sock)
        conn.parser.unreader.deadline = conn.deadline
        conn.parser.unreader.unread(bytes(conn.data))
        conn.data = bytearray()
        conn.body_read = body_read  # False: a body too large to hold; the connection closes after
        conn.initialized = conn.data_ready = True  # no TLS, no HTTP/2: nothing for init() to do
        self.enqueue_req(conn)

    # -- a thread: the request, then back to the loop ---------------------------------------

    def handle_request(self, req, conn):
        conn.sock.settimeout(SEND_TIMEOUT)
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn, keepalive):
        return conn.body_read and super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn, fs):
        try:
            keep = not fs.cancelled() and fs.result() is True
        except Exception:
            keep = False
        if not keep:
            self.close_gently(conn)
            return
        conn.sock.setblocking(False)
        conn.data = bytearray(conn.parser.unreader.take_buffered())  # a pipelined next request
        if conn.data:
            self.wait(conn, time.monotonic() + self.header_timeout, idle=False)
        else:
            self.wait(conn, time.monotonic() + self.cfg.keepalive, idle=True)

    # -- closing --------------------------------------------------------------------------

    def close_gently(self, conn):
        """Half-close and wait here for the client to close, up to CLOSE_LINGER. (gunicorn's own
        graceful close waits up to 2 s in the main loop, where one client could stall the rest.)"""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.nr_conns -= 1
            conn.close()
            return
        if len(self.closing) >= MAX_CLOSING:
            self.close(next(iter(self.closing)))
        conn.deadline = time.monotonic() + CLOSE_LINGER
        self.closing[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_closing_readable, conn))

    def on_closing_readable(self, conn, sock):
        try:
            if sock.recv(65536):
                return  # the rest of a request already answered: dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close(conn)

    def forget(self, conn):
        for group in (self.waiting, self.closing):
            if conn in group:
                del group[conn]
                self.poller.unregister(conn.sock)

    def close(self, conn):
        self.forget(conn)
        self.unserved.pop(conn, None)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """Called by the stock loop at least once a second: close what is past its deadline."""
        super().murder_pending()
        now = time.monotonic()
        for group in (self.waiting, self.closing):
            for conn in [c for c in group if c.deadline <= now]:
                self.close(conn)

    def murder_keepalived(self, force=False):
        super().murder_keepalived(force)
        if force:  # the worker is done
            for conn in [*self.waiting, *self.closing]:
                self.close(conn)

    def _cap_keepalive(self, deadline):
        super()._cap_keepalive(deadline)
        for conn in self.waiting:
            conn.deadline = min(conn.deadline, deadline)

    def wait_for_and_dispatch_events(self, timeout):
        # Wake at the next deadline, so a connection is closed at it, not up to a second late.
        deadlines = [c.deadline for group in (self.waiting, self.closing) for c in group]
        if self.alive and not self._accepting and self.accept_again > time.monotonic():
            deadlines.append(self.accept_again)  # and when it is time to accept again
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        if self.accept_waited:  # another worker took what this one waited for
            self.accept_pending_since, self.accept_waited = None, False
        self.murder_pending()
