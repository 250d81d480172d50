"""gunicorn's gthread worker with the HTTP/1.1 framing done by h11, in the main loop, and the
answers written by the main loop too: a thread only ever runs the app on a whole request.

The main loop (one per worker process, never blocking):
  - accepts new connections, as long as no other worker holds fewer (see LoadBoard);
  - reads each request from every connection without blocking and gives its bytes to h11, which
    alone decides where the request ends; the request line and headers then pass gunicorn's own
    checks and header policy (limits, forwarded_allow_ips / secure_scheme_headers, Expect);
  - hands the whole request to a thread, and stops reading that connection meanwhile;
  - writes the answer the thread produced without blocking, then reads the next request;
  - closes a connection at its deadline: a request that has not arrived in full, an answer the
    client does not take, an idle kept-alive connection.
A thread: builds the WSGI environ with gunicorn's `wsgi.create`, runs the app, has gunicorn's
`Response` write the answer into memory and logs the access line; then it is free.

    `gunicorn -c gunicorn.conf.py app:app` (worker_class = "herald_smtp.http.worker.ThreadWorker")
"""

import heapq
import http
import io
import json
import logging
import mmap
import selectors
import socket
import sys
import threading
import time
from functools import partial

import h11
from gunicorn import util
from gunicorn.errors import AppImportError
from gunicorn.http import errors as gerrors
from gunicorn.http.message import Request
from gunicorn.workers import gthread

from .. import logs
from ..config import server_config

# Per worker. Connections waiting for a request (kept alive between requests, or a request under
# way): one more closes the oldest, so a flood of idle or half-open connections can never stop the
# worker accepting; a real request waits in this state for microseconds, a slow one for seconds.
MAX_WAITING = 100
# Connections whose answer the client has not taken yet (its socket buffer is full): one more
# closes the oldest. Each holds one answer; the next request on it is not read meanwhile.
MAX_SENDING = 100
# An answer the client does not take in this long ends its connection.
SEND_TIMEOUT = 10.0
# The kernel's send buffer for each connection (it doubles this), fixed so that a client that
# pipelines requests and reads no answer stops being served once this much waits for it, rather
# than once the kernel has grown the buffer to megabytes. An answer of ours is a few hundred bytes.
SEND_BUFFER = 65536
# Connections answered and half-closed, waiting up to CLOSE_LINGER for the client to close too
# (so the answer is not cut off by a reset); one more closes the oldest at once.
MAX_CLOSING = 100
CLOSE_LINGER = 2.0
# A worker that holds more connections than another lets a new one wait this long for the other
# to take it, then takes it itself (the other may be busy): a fixed wait, paid only by the busier
# worker, so a flood of connections never slows accepting.
ACCEPT_YIELD = 0.02
# Meanwhile it looks again this often: once another worker has taken connections and holds as
# many as this one, this one accepts again at once (else both could be waiting for each other).
PAUSED_POLL = 0.001
# A connection that has sent no whole request this long after its accept is no load to balance.
UNSERVED_GRACE = 1.0
RECV_SIZE = 65536
# A request still arriving SLOW_AFTER after its first byte is read on an allowance: all such reads
# together get at most SLOW_SHARE of the main loop's time, SLOW_RECV bytes a read. Reading a body
# sent in 1-byte chunks costs h11 about a microsecond a byte: unrationed, a few dozen clients
# dripping chunks would take a whole core and every request would queue behind them. A slow
# connection left unread waits in the kernel (its client's writes stall) for its turn, or its
# deadline. A request that arrives at the speed of a network never waits for an allowance.
SLOW_AFTER = 0.05
SLOW_SHARE = 0.1
SLOW_BURST = 0.01  # seconds of allowance that can build up
SLOW_RECV = 4096

# Client errors gunicorn's own checks raise, and their status (else 400), as gunicorn answers them.
_STATUS = {gerrors.LimitRequestLine: 414, gerrors.LimitRequestHeaders: 431, gerrors.ExpectationFailed: 417,
           gerrors.UnsupportedTransferCoding: 501}
_CLIENT_ERRORS = (gerrors.ParseException, h11.ProtocolError)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
log = logging.getLogger("herald_smtp.http")


class Settings:
    """gunicorn's settings for reading requests, each read once: a read of gunicorn's Config costs
    a microsecond, and so does parsing the peer's address to see whether it is a trusted proxy."""

    def __init__(self, cfg):
        self._cfg = cfg
        self._networks = cfg.forwarded_allow_networks()
        self._trusted = {}
        line_limit = cfg.limit_request_line
        self.line_limit = line_limit if 0 < line_limit < 8190 else 8190  # as gunicorn's Request

    def __getattr__(self, name):  # the first read of a setting; then it is an attribute
        value = getattr(self._cfg, name)
        setattr(self, name, value)
        return value

    def forwarded_allow_networks(self):
        return self._networks

    def trusted(self, ip, check):
        if ip not in self._trusted:
            if len(self._trusted) > 1024:
                self._trusted.clear()
            self._trusted[ip] = check()
        return self._trusted[ip]


class _Request(Request):
    """A request h11 framed, with gunicorn's checks and header policy applied to its line and
    fields: what gunicorn's wsgi.create, Response and access log read. Nothing is re-parsed."""

    def __init__(self, cfg, peer_addr, event, req_number):  # not Request.__init__: it reads a socket
        """cfg: a Settings."""
        self.cfg, self.peer_addr, self.remote_addr, self.req_number = cfg, peer_addr, peer_addr, req_number
        self.scheme, self.must_close, self._expected_100_continue = "http", False, False
        self.headers, self.trailers, self.body, self.proxy_protocol_info = [], [], None, None
        line = b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)
        if len(line) > cfg.line_limit:
            raise gerrors.LimitRequestLine(len(line), cfg.line_limit)
        self.parse_request_line(line)  # gunicorn's: method, target form, version
        fields, field_size = cfg.limit_request_fields, cfg.limit_request_field_size
        scheme_state, seen = [False], set()
        secure_scheme_headers, forwarder_headers = self._peer_trusted_for_forwarded()
        chunked, self.content_length = False, None
        for name, value in event.headers.raw_items():
            if len(self.headers) >= fields:
                raise gerrors.LimitRequestHeaders("limit request headers fields")
            if len(name) + len(value) + 4 > field_size > 0:
                raise gerrors.LimitRequestHeaders("limit request headers fields size")
            name = name.decode("latin-1").upper()
            kept = self._apply_header_policy(name, value.decode("latin-1"), scheme_state, seen,
                                             secure_scheme_headers, forwarder_headers)
            if name == "CONTENT-LENGTH":
                self.content_length = int(value)  # h11 checked it: at most 20 digits
            chunked |= name == "TRANSFER-ENCODING"
            if kept is not None:
                self.headers.append(kept)
        # RFC 9112 6.1 and 6.3: both framings at once, or chunked in HTTP/1.0, is no length at all.
        if chunked and (self.content_length is not None or self.version < (1, 1)):
            raise gerrors.InvalidHeader("TRANSFER-ENCODING")

    def _peer_is_trusted_proxy(self):
        if not isinstance(self.peer_addr, tuple):
            return super()._peer_is_trusted_proxy()
        return self.cfg.trusted(self.peer_addr[0], super()._peer_is_trusted_proxy)


class RequestReader:
    """One request off one connection: bytes in, framed by h11; no I/O of its own. feed() returns
    None (more is needed), CONTINUE (the client waits for `100 Continue`), READY (self.request is
    whole, or its body is over the limit: self.whole False), CLOSE, or (REFUSE, status, reason)."""

    CONTINUE, READY, CLOSE, REFUSE = "continue", "ready", "close", "refuse"

    def __init__(self, cfg, peer_addr, body_limit, head_limit, req_number=1):
        """cfg: a Settings (of gunicorn's Config)."""
        self.cfg, self.peer_addr, self.body_limit, self.req_number = cfg, peer_addr, body_limit, req_number
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=head_limit)
        self.request = None  # the _Request, once its head has arrived
        self.body = []
        self.size = 0
        self.whole = False
        self.continued = False

    def feed(self, data: bytes):
        """data: what arrived; b"" when the client closed its side."""
        self.h11.receive_data(data)
        try:
            return self._next()
        except _CLIENT_ERRORS as exc:
            if not data:
                return self.CLOSE  # a partial request, then the client left: nothing to answer
            status = getattr(exc, "error_status_hint", None) or _STATUS.get(type(exc), 400)
            return self.REFUSE, status, exc

    def leftover(self):
        """(bytes received after this request, whether the client has closed its side)"""
        return self.h11.trailing_data

    def _next(self):
        while True:
            event = self.h11.next_event()
            kind = type(event)
            if kind is h11.Data:
                self.body.append(event.data)
                self.size += len(event.data)
                if self.size > self.body_limit:  # the app answers 413 without reading more
                    return self._ready(False)
            elif kind is h11.EndOfMessage:
                return self._ready(True)
            elif kind is h11.Request:
                self.request = _Request(self.cfg, self.peer_addr, event, self.req_number)
                if (self.request.content_length or 0) > self.body_limit:
                    return self._ready(False)
            elif event is h11.NEED_DATA:
                if self.request is not None and self.request._expected_100_continue and not self.size \
                        and not self.continued:
                    self.continued = True
                    return self.CONTINUE
                return None
            elif kind is h11.ConnectionClosed:
                return self.CLOSE
            else:  # PAUSED cannot come before EndOfMessage; nothing else is sent by a client
                return self.CLOSE

    def _ready(self, whole):
        self.whole = whole
        self.request._expected_100_continue = False  # answered here, if at all, not by wsgi.create
        self.request.body = io.BytesIO(b"".join(self.body))
        self.body = []
        return self.READY


class LoadBoard:
    """How many connections each worker holds, and when it last said so, in memory the workers
    share (made in the master before they fork). A worker accepts a new connection only while no
    live worker holds fewer: the kernel wakes every worker for it, the least loaded takes it."""

    SLOTS = 64
    LIVE = 2.5  # seconds: a worker that has not published in this long is gone or stopped

    def __init__(self):
        self._memory = mmap.mmap(-1, self.SLOTS * 16)
        self.cells = memoryview(self._memory).cast("d")

    def publish(self, slot, load, now):
        self.cells[2 * slot] = load
        self.cells[2 * slot + 1] = now

    def leave(self, slot):
        self.cells[2 * slot + 1] = 0.0

    def least_loaded(self, slot, load, now):
        # Within an eighth: strict for a client's few kept-alive connections, and in a flood of
        # hundreds a worker takes them in batches rather than handing every one to the other.
        cells, fresh, floor = self.cells.tolist(), now - self.LIVE, load - load // 8
        for i in range(0, 2 * self.SLOTS, 2):
            if cells[i] < floor and cells[i + 1] > fresh and i != 2 * slot:
                return False
        return True


class _Output:
    """The socket a thread's gunicorn Response writes to: memory, sent by the main loop."""

    def __init__(self):
        self.parts = []

    def sendall(self, data):
        self.parts.append(bytes(data))

    def send(self, data):
        self.sendall(data)
        return len(data)

    def gettimeout(self):
        return 0.0

    def setblocking(self, flag):
        pass

    def shutdown(self, how):
        raise OSError("the main loop closes the connection")  # util.close_graceful then stops


class _Peer:
    """What gthread's handle_request reads of a connection."""
    __slots__ = ("sock", "client", "server")

    def __init__(self, sock, client, server):
        self.sock, self.client, self.server = sock, client, server


class _Conn:
    __slots__ = ("sock", "client", "server", "reader", "state", "deadline", "idle", "head", "out", "keep",
                 "watched", "requests", "since")

    def __init__(self, sock, client, server):
        self.sock, self.client, self.server = sock, client, server
        self.reader = self.out = None
        self.state = self.deadline = self.since = None
        self.idle = self.head = self.keep = self.watched = False
        self.requests = 0


WAITING, BUSY, SENDING, CLOSING = "waiting", "busy", "sending", "closing"


class ThreadWorker(gthread.ThreadWorker):
    """gthread's process, pool and signals; our own main loop (see the module docstring)."""

    board = None  # the LoadBoard, made in the master by the first worker object

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = server_config()  # the master's, inherited
        self.header_timeout = cfg.http_header_timeout_seconds
        self.body_timeout = cfg.http_body_timeout_seconds
        self.body_limit = cfg.http_body_limit_bytes
        # The largest head gunicorn's parser accepts (request line, fields): beyond it, no request.
        self.head_limit = (self.cfg.limit_request_line + 4 +
                           self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2))
        if ThreadWorker.board is None:
            ThreadWorker.board = LoadBoard()
        self.slot = self.age % LoadBoard.SLOTS
        self.balancing = self.cfg.workers > 1
        self.groups = {WAITING: {}, SENDING: {}, CLOSING: {}}  # oldest first
        self.caps = {WAITING: MAX_WAITING, SENDING: MAX_SENDING, CLOSING: MAX_CLOSING}
        self.busy = 0  # requests given to threads and not yet answered
        self.deadlines = []  # heap of (deadline, sequence, conn); stale entries are skipped
        self.sequence = 0
        self.unserved = {}  # connections no whole request has come on yet: conn -> accepted at
        self.stale = set()  # of those, the ones accepted more than UNSERVED_GRACE ago
        self.gone = set()  # connections whose client closed while a thread had its request
        self.accept_again = 0.0  # while accepting is paused: until when
        self.yielding = False  # paused for a less loaded worker (not after a failed accept)
        self.servers = {}
        self.settings = Settings(self.cfg)
        self.allowance, self.refilled = SLOW_BURST, time.monotonic()  # for slow requests (SLOW_SHARE)
        self.starved = {}  # slow connections not read until the allowance grows again

    @classmethod
    def check_config(cls, cfg, log):
        if cfg.is_ssl:
            raise RuntimeError("herald_smtp.http.worker reads requests before any TLS; terminate TLS in a proxy")
        if cfg.proxy_protocol != "off":
            raise RuntimeError("herald_smtp.http.worker does not read the PROXY protocol")
        super().check_config(cfg, log)

    # -- the process: every line on stderr is JSON ----------------------------------------

    def init_process(self):
        # An exception no one catches, in any thread, is one JSON line, not a printed traceback.
        sys.excepthook = lambda *exc: log.critical("uncaught exception", exc_info=exc)
        threading.excepthook = lambda a: log.critical("uncaught exception in a thread",
                                                      exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
        sys.unraisablehook = lambda u: log.error("exception ignored", exc_info=(
            type(u.exc_value), u.exc_value, u.exc_traceback) if u.exc_value is not None else None)
        try:
            super().init_process()
        except SystemExit:
            raise
        except AppImportError:  # the arbiter would print its text: the same exit, one JSON line
            self.log.exception("Exception while loading the application")
            sys.exit(4)  # Arbiter.APP_LOAD_ERROR: the arbiter stops
        except Exception:
            self.log.exception("Exception in worker process")
            sys.exit(-1 if self.booted else 3)  # 3: Arbiter.WORKER_BOOT_ERROR

    def handle_quit(self, sig, frame):
        """SIGQUIT and SIGINT (Ctrl-C) stop the worker as SIGTERM does: the main loop sees it and
        stops (see stop). gunicorn's quick stop raises SystemExit wherever the loop happens to be,
        which can leave a connection or a request's count half updated (the stop then waits out
        graceful_timeout for it) and, raised again by a second Ctrl-C, cuts the sends in flight.
        The arbiter still kills a worker that outlives graceful_timeout."""
        self.alive = False
        self.cfg.worker_int(self)

    # -- the main loop --------------------------------------------------------------------

    def run(self):
        # A sent mail's fields go on its access line when our logger writes one (logs.send_fields).
        self.merged_lines = isinstance(self.log, logs.GunicornLogger) and self.log.access_log_enabled
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks)
        for listener in self.sockets:
            listener.setblocking(False)
            self.servers[listener] = listener.getsockname()
        self.set_accept_enabled(True)
        if self.balancing:  # the app is loaded: this worker counts from now on
            self.board.publish(self.slot, 0, time.monotonic())
        try:
            while self.alive:
                self.notify()
                self.loop_once(1.0)
                if not self.is_parent_alive():
                    break
        except Exception:
            self.log.exception("Error in the worker's main loop")
        finally:
            self.stop()

    def loop_once(self, timeout):
        now = time.monotonic()
        self.allowance = min(SLOW_BURST, self.allowance + (now - self.refilled) * SLOW_SHARE)
        self.refilled = now
        if self.starved:
            if self.allowance > 0:  # their turn again
                for conn in list(self.starved):
                    del self.starved[conn]
                    self.watch(conn, selectors.EVENT_READ, self.on_readable)
            else:
                timeout = min(timeout, -self.allowance / SLOW_SHARE)
        if self.deadlines:
            timeout = min(timeout, self.deadlines[0][0] - now)
        paused = self.alive and not self._accepting and self.nr_conns < self.worker_connections
        if paused:  # look again each millisecond (see accept)
            timeout = min(timeout, self.accept_again - now, PAUSED_POLL)
        try:
            events = self.poller.select(max(0.0, timeout))
        except InterruptedError:
            events = ()
        for key, _ in events:
            try:
                key.data(key.fileobj)
            except Exception:  # a fault here ends one connection, never the loop
                self.log.exception("Error handling a connection")
                conn = getattr(key.data, "args", (None,))[0]
                if isinstance(conn, _Conn):
                    self.close(conn)
        now = time.monotonic()
        self.expire(now)
        if self.alive:
            if not self._accepting and self.nr_conns < self.worker_connections:
                waited = now >= self.accept_again  # what is still there is this worker's
                if waited or (self.yielding and self.board.least_loaded(self.slot, self.load(now), now)):
                    self.set_accept_enabled(True)
                    for listener in self.sockets:
                        self.accept(listener, waited=waited)
            if self.balancing:
                self.board.publish(self.slot, self.load(now), now)

    def stop(self):
        """Stop accepting; answer what is on its way; let every thread finish (its send has a
        deadline shorter than graceful_timeout), and only then return to close the SMTP sessions."""
        self.alive = False
        self.set_accept_enabled(False)
        self.board.leave(self.slot)
        for listener in self.sockets:
            listener.close()
        linger = time.monotonic() + gthread.STOP_KEEPALIVE_LINGER
        for conn in list(self.groups[WAITING]):
            self.set_deadline(conn, min(conn.deadline, linger))
        graceful = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 or self.busy:
            if time.monotonic() > graceful:
                break
            self.notify()
            try:
                self.loop_once(1.0)
            except Exception:
                self.log.exception("Error in the worker's main loop")
        for group in self.groups.values():
            for conn in list(group):
                self.close(conn)
        self.tpool.shutdown(wait=self.busy > 0)  # past graceful_timeout the arbiter kills us anyway
        self.poller.close()
        self.method_queue.close()

    def set_accept_enabled(self, enabled):
        if enabled == self._accepting:
            return
        for listener in self.sockets:
            if enabled:
                self.poller.register(listener, selectors.EVENT_READ, self.accept)
            else:
                self.poller.unregister(listener)
        self._accepting = enabled

    # -- accepting ------------------------------------------------------------------------

    def load(self, now):
        """The connections that count for balance: not those closing or whose client has gone, nor
        those that have not sent a whole request within UNSERVED_GRACE (a slow or idle client is
        no load to balance)."""
        unserved = self.unserved
        while unserved:
            conn, accepted = next(iter(unserved.items()))
            if now - accepted < UNSERVED_GRACE:
                break
            del unserved[conn]
            self.stale.add(conn)
        return self.nr_conns - len(self.groups[CLOSING]) - len(self.stale) - len(self.gone)

    def accept(self, listener, waited=False):
        for _ in range(64):  # then let the rest of the loop run
            now = time.monotonic()
            if self.nr_conns >= self.worker_connections:  # gunicorn's cap: the others accept meanwhile
                self.set_accept_enabled(False)
                self.accept_again, self.yielding = now, False
                return
            if self.balancing and not waited and not self.board.least_loaded(self.slot, self.load(now), now):
                self.set_accept_enabled(False)  # the least loaded worker takes it meanwhile
                self.accept_again, self.yielding = now + ACCEPT_YIELD, True
                return
            waited = False
            waiting = self.groups[WAITING]
            if len(waiting) >= MAX_WAITING and now - self.unserved.get(next(iter(waiting)), 0.0) < SLOW_AFTER:
                # Full of connections just accepted, their requests most likely in: read them
                # first (the next loop) rather than close the oldest of them unread.
                self.set_accept_enabled(False)
                self.accept_again, self.yielding = now + PAUSED_POLL, False
                return
            try:
                sock, client = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of file descriptors, say: wait a moment rather than spin
                self.log.error("accept failed: %s", e)
                self.set_accept_enabled(False)
                self.accept_again, self.yielding = now + 0.1, False
                return
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self.nr_conns += 1
            conn = _Conn(sock, client, self.servers[listener])
            self.unserved[conn] = now
            if self.balancing:
                self.board.publish(self.slot, self.load(now), now)
            self.wait(conn, now + self.header_timeout, idle=False)

    # -- reading a request ----------------------------------------------------------------

    def wait(self, conn, deadline, idle, leftover=(b"", False)):
        """Read conn's next request here until `deadline`. idle: nothing sent yet on a kept-alive
        connection (its header clock starts at the first byte). leftover: what came after the
        previous request (pipelined), and whether the client has closed its side since."""
        if not self.alive:  # a stopping worker answers what is on its way, briefly
            deadline = min(deadline, time.monotonic() + gthread.STOP_KEEPALIVE_LINGER)
        conn.requests += 1
        conn.reader = RequestReader(self.settings, conn.client, self.body_limit, self.head_limit, conn.requests)
        conn.idle, conn.head, conn.since = idle, False, None
        self.enter(conn, WAITING, deadline)
        self.watch(conn, selectors.EVENT_READ, self.on_readable)
        data, closed = leftover
        if data:
            self.received(conn, data)
        if closed and conn.state is WAITING:
            self.received(conn, b"")

    def on_readable(self, conn, sock):
        slow = conn.since is not None and time.monotonic() - conn.since > SLOW_AFTER
        if slow and self.allowance <= 0:
            self.unwatch(conn)
            self.starved[conn] = None
            return
        try:
            data = sock.recv(SLOW_RECV if slow else RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if slow:
            started = time.perf_counter()
            self.received(conn, data)
            self.allowance -= time.perf_counter() - started
        else:
            self.received(conn, data)

    def received(self, conn, data):
        if conn.since is None:
            conn.since = time.monotonic()
        if conn.idle and not data:
            self.close(conn)
            return
        reader = conn.reader
        outcome = reader.feed(data)
        if outcome is reader.READY:  # the usual case: the whole request in one read
            self.dispatch(conn)
            return
        if conn.idle:  # the first bytes on a kept-alive connection: the header clock starts
            conn.idle = False
            self.set_deadline(conn, time.monotonic() + self.header_timeout)
        if outcome is None:
            if reader.request is not None and not conn.head:  # the head is here: the body's clock starts
                conn.head = True
                self.set_deadline(conn, time.monotonic() + self.body_timeout)
        elif outcome is reader.CONTINUE:
            conn.head = True
            self.set_deadline(conn, time.monotonic() + self.body_timeout)
            try:  # 25 bytes on a connection with nothing else unsent: they fit
                conn.sock.send(_CONTINUE)
            except OSError:
                pass
        elif outcome is reader.CLOSE:
            self.close(conn)
        else:
            self.refuse(conn, *outcome[1:])

    def refuse(self, conn, status, exc):
        """A request no one can serve: the contract's envelope, then the connection closes."""
        self.log.warning("Invalid request from ip=%s: %s", conn.client[0] if isinstance(conn.client, tuple)
                         else conn.client, exc)
        phrase = http.HTTPStatus(status).phrase
        body = json.dumps({"ok": False, "error_code": "invalid_request",
                           "error_message": f"malformed HTTP request ({phrase.lower()})"}).encode()
        head = (f"HTTP/1.1 {status} {phrase}\r\nServer: gunicorn\r\nDate: {util.http_date()}\r\n"
                f"Connection: close\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.send(conn, head.encode("latin-1") + body, keep=False)

    def dispatch(self, conn):
        """Give a thread the whole request; this connection is not read until it is answered."""
        self.leave(conn)
        # Watched meanwhile only to see the client leave: a pool that closes all at once (a
        # restarting client) then stops counting here at once, not when each answer is written.
        self.watch(conn, selectors.EVENT_READ, self.on_busy_readable)
        conn.state = BUSY
        if self.unserved.pop(conn, None) is None:
            self.stale.discard(conn)
        self.busy += 1
        future = self.tpool.submit(self.serve, conn.reader.request, conn)
        future.add_done_callback(lambda f: self.method_queue.defer(self.served, conn, f))

    def on_busy_readable(self, conn, sock):
        try:
            gone = not sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            gone = True
        self.unwatch(conn)  # the next request, or the end: either is read once this one is answered
        if gone:
            self.gone.add(conn)

    # -- a thread -------------------------------------------------------------------------

    def serve(self, req, conn):
        """gthread's handle_request (environ, app, access log), answering into memory."""
        out = _Output()
        carries = logs.access_carries_send(self.merged_lines)
        try:
            keep = self.handle_request(req, _Peer(out, conn.client, conn.server))
        except StopIteration:  # failed after the answer started: what was written goes, then close
            keep = False
        except Exception as e:
            self.handle_error(req, out, conn.client, e)  # gunicorn's: logged, a 500
            keep = False
        finally:
            logs.access_carries_send_reset(carries)
        return b"".join(out.parts), keep

    # -- writing the answer ---------------------------------------------------------------

    def served(self, conn, future):
        self.busy -= 1
        if conn.sock is None:
            return
        try:
            data, keep = future.result()
        except BaseException:
            self.close(conn)
            return
        self.send(conn, data, keep and conn.reader.whole)

    def send(self, conn, data, keep):
        conn.out, conn.keep = memoryview(data), keep
        self.flush(conn)

    def flush(self, conn, sock=None):
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            if conn.state is not SENDING:
                self.enter(conn, SENDING, time.monotonic() + SEND_TIMEOUT)
                self.watch(conn, selectors.EVENT_WRITE, self.flush)
            return
        conn.out = None
        self.leave(conn)
        if not conn.keep:
            self.close_gently(conn)
            return
        leftover = conn.reader.leftover()
        now = time.monotonic()
        if leftover[0]:  # pipelined: the next request may be here already
            self.wait(conn, now + self.header_timeout, idle=False, leftover=leftover)
        else:
            self.wait(conn, now + self.cfg.keepalive, idle=True, leftover=leftover)

    # -- closing --------------------------------------------------------------------------

    def close_gently(self, conn):
        """Half-close and wait here for the client to close, up to CLOSE_LINGER, so the answer is
        not cut off by a reset. (gunicorn's own graceful close waits in the calling thread.)"""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        self.enter(conn, CLOSING, time.monotonic() + CLOSE_LINGER)
        self.watch(conn, selectors.EVENT_READ, self.on_closing_readable)

    def on_closing_readable(self, conn, sock):
        try:
            if sock.recv(RECV_SIZE):
                return  # the rest of a request already answered: dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close(conn)

    def close(self, conn):
        if conn.sock is None:
            return
        self.starved.pop(conn, None)
        self.gone.discard(conn)
        self.leave(conn)
        self.unwatch(conn)
        if self.unserved.pop(conn, None) is None:
            self.stale.discard(conn)
        self.nr_conns -= 1
        util.close(conn.sock)
        conn.sock = conn.reader = conn.out = None

    # -- states, deadlines, the poller ------------------------------------------------------

    def enter(self, conn, state, deadline):
        """conn is now in `state` (one of the bounded groups) until `deadline`."""
        self.leave(conn)
        group = self.groups[state]
        if len(group) >= self.caps[state]:
            self.close(next(iter(group)))
        group[conn] = None
        conn.state = state
        self.set_deadline(conn, deadline)

    def leave(self, conn):
        group = self.groups.get(conn.state)
        if group is not None:
            group.pop(conn, None)
        conn.state, conn.deadline = None, None

    def set_deadline(self, conn, deadline):
        conn.deadline = deadline
        self.sequence += 1
        heapq.heappush(self.deadlines, (deadline, self.sequence, conn))

    def expire(self, now):
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, _, conn = heapq.heappop(deadlines)
            if conn.sock is not None and conn.deadline == deadline:
                self.close(conn)

    def watch(self, conn, events, callback):
        if conn.watched:
            self.poller.modify(conn.sock, events, partial(callback, conn))
        else:
            self.poller.register(conn.sock, events, partial(callback, conn))
            conn.watched = True

    def unwatch(self, conn):
        if conn.watched:
            self.poller.unregister(conn.sock)
            conn.watched = False
