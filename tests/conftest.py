"""Real peers for the tests: aiosmtpd on loopback (TLS from trustme), Redis, gunicorn."""

import asyncio
import collections
import contextlib
import email
import email.policy
import http.client
import io
import itertools
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import json
import uuid

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

from herald_smtp import create_app, load_config
from herald_smtp.logs import JsonFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This project's tests' own databases on the machine's Redis, one per pytest-xdist worker (gw0 the
# first), since the tests flush it; two checkouts testing at once set their own base
# (HERALD_TEST_REDIS_DB).
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
REDIS_DB = int(os.environ.get("HERALD_TEST_REDIS_DB", "12")) + XDIST_WORKER
SMTP_USER, SMTP_PASSWORD = "herald", "s3cret-smtp-password"
API_KEY = "test-api-key-0123456789"
# The status of every error_code, written out from the README's API table: the tests' own copy,
# so a change to the code's table (herald_smtp.errors.STATUS) cannot carry the tests along.
CONTRACT_STATUS = {
    "unauthorized": 401, "invalid_request": 400, "invalid_destination": 400, "validation_failed": 400,
    "idempotency_conflict": 409, "rate_limited": 429, "provider_down": 503, "timeout": 504,
    "send_failed": 500, "not_found": 404, "method_not_allowed": 405,
}
# Private MTAs (tests/mta.py): postfix, postfix_server, make_postfix; exim, exim_server, make_exim;
# opensmtpd, opensmtpd_server, make_opensmtpd.
pytest_plugins = ("postfix_server", "exim_server", "opensmtpd_server")


# Ports for the servers the tests start, below the kernel's ephemeral range (32768 and up): a port
# the kernel hands out (bind to 0, or any outgoing connection's local port) can be taken again by
# another test process between free_port() and the server's own bind. Each xdist process walks a
# block of its own, from a random point (a second checkout testing at once starts elsewhere).
_PORT_BLOCK = 2500
_port_base = 20000 + _PORT_BLOCK * (XDIST_WORKER % 4)
_next_port = itertools.count(random.randrange(_PORT_BLOCK))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now and no other test process of this run hands out."""
    while True:
        port = _port_base + next(_next_port) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def listening(port) -> bool:
    """Something accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class Handler:
    """Records what the server accepted; knobs make it refuse or stall at a chosen step."""

    def __init__(self):
        self.messages = []  # aiosmtpd Envelopes whose DATA was answered 250
        self.reject_rcpt = {}  # address -> reply, e.g. "550 5.1.1 no such user"
        self.mail_reply = None
        self.data_reply = None
        self.data_delay = 0.0
        self.data_gate = None  # a threading.Event: DATA is held, in flight, until it is set
        self.data_peers = []  # client (host, port) of every DATA, in arrival order
        self.pipelining = False  # advertise PIPELINING (aiosmtpd reads pipelined commands fine)
        self.pipelined = []  # per MAIL: had RCPT and DATA already arrived with it?
        self.commands = collections.Counter()  # MAIL, RSET, QUIT received, by verb
        self.ehlo_names = []  # the name in every EHLO, in arrival order

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.ehlo_names.append(hostname)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.commands["MAIL"] += 1
        self.pipelined.append(b"DATA" in bytes(server._reader._buffer))
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject_rcpt:
            return self.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_peers.append(session.peer)
        while self.data_gate is not None and not self.data_gate.is_set():
            await asyncio.sleep(0.01)
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append(envelope)
        return "250 OK queued"

    async def handle_RSET(self, server, session, envelope):
        self.commands["RSET"] += 1
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.commands["QUIT"] += 1
        return "221 Bye"


class SMTPServer:
    """An aiosmtpd server on 127.0.0.1 that counts its sessions and can be restarted."""

    def __init__(self, tls=None, auth=False, certs=None, **smtp_kwargs):
        self.port = free_port()
        self.handler = Handler()
        self.sessions = 0
        self.tls, self.auth, self.certs = tls, auth, certs
        self.smtp_kwargs = smtp_kwargs
        self.controller = None

    @property
    def messages(self):
        return self.handler.messages

    def parsed(self, i=-1):
        return email.message_from_bytes(self.messages[i].original_content, policy=email.policy.default)

    def start(self):
        server = self
        kwargs = dict(self.smtp_kwargs)
        ssl_context = None
        if self.tls == "starttls":
            kwargs.update(tls_context=self.certs.server_context(), require_starttls=True)
        elif self.tls == "implicit":
            ssl_context = self.certs.server_context()
        if self.auth:
            kwargs.update(authenticator=_authenticator, auth_required=True, auth_require_tls=self.tls == "starttls")  # aiosmtpd cannot see implicit TLS

        class CountingSMTP(SMTP):
            def connection_made(self, transport):
                if not getattr(self, "_counted", False):  # STARTTLS calls this again
                    self._counted = True
                    server.sessions += 1
                super().connection_made(transport)

        class CountingController(Controller):
            def factory(self):
                return CountingSMTP(self.handler, **self.SMTP_kwargs)

        self.controller = CountingController(self.handler, hostname="127.0.0.1", port=self.port,
                                             ssl_context=ssl_context, server_hostname="localhost", **kwargs)
        self.controller.start()
        self.sessions = 0  # start() opens one connection of its own to see the server is up
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def env(self, **extra):
        """Environment for herald-smtp pointing at this server."""
        env = {
            "SMTP_HOST": "127.0.0.1" if self.tls is None else "localhost",
            "SMTP_PORT": str(self.port),
            "SMTP_FROM": "noreply@example.com",
            "SMTP_USE_STARTTLS": "true" if self.tls == "starttls" else "false",
            "SMTP_USE_TLS": "true" if self.tls == "implicit" else "false",
        }
        if self.tls:
            env["SMTP_CA_FILE"] = self.certs.ca_file
        if self.auth:
            env.update(SMTP_USER=SMTP_USER, SMTP_PASSWORD=SMTP_PASSWORD)
        env.update(extra)
        return env


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = getattr(auth_data, "login", None) == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
    # handled=False: aiosmtpd then answers 535 itself; the default leaves a failed AUTH unanswered.
    return AuthResult(success=ok, handled=False)


class Certs:
    """A trustme CA and a certificate for localhost and 127.0.0.1."""

    def __init__(self, tmp_path):
        import trustme

        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = str(tmp_path / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def server_context(self):
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def smtp_server():
    server = SMTPServer().start()
    yield server
    server.stop()


def _stopped_after(start):
    """A factory fixture's body: yields make(**kwargs) -> start(**kwargs), a running server; then
    stops every server it made."""
    servers = []

    def make(**kwargs):
        servers.append(start(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_server(certs):
    """Factory: make_server(tls="starttls"|"implicit"|None, auth=bool, certs=another Certs, **aiosmtpd kwargs)."""
    yield from _stopped_after(lambda **kwargs: SMTPServer(**{"certs": certs, **kwargs}).start())


@pytest.fixture
def fault_server():
    """Factory: fault_server(certs=..., auth=..., pipelining=..., rcvbuf=...) -> a running FaultServer."""
    from fault_server import FaultServer

    yield from _stopped_after(FaultServer)


@pytest.fixture
def make_app(tmp_path):
    """Factory: an app (and its test client) for an environment mapping."""
    apps = []

    def make(env):
        env = {"IDEMPOTENCY_STORE": f"sqlite:///{tmp_path}/idem.sqlite3", **env}
        app = create_app(load_config(env))
        app.testing = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["herald_smtp"].close()


@pytest.fixture
def client(make_app, smtp_server):
    return make_app(smtp_server.env()).test_client()


def send_json(client, payload=None, key=None, **headers):
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/v1/send", json=payload, headers=headers)


@pytest.fixture
def logs():
    """Everything herald_smtp logs during the test, as formatted JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("herald_smtp")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


@pytest.fixture
def redis_url():
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


class Gunicorn:
    """gunicorn as a real process with the project's gunicorn.conf.py."""

    def __init__(self, env, tmp_path, workers=2, threads=4, stdout=subprocess.STDOUT, cwd=ROOT, app="app:app",
                 args=(), healthz="/healthz"):
        """workers or threads None: the service's own default. stdout: where it goes (with stderr by
        default). cwd: the working directory, where `.env` is read. app, args: what gunicorn runs,
        and command-line settings on top of gunicorn.conf.py's; healthz: the path polled until up."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items()
                if not k.startswith(("SMTP_", "API_KEY", "IDEMPOTENCY_", "WEB_", "HTTP_", "ENV_FILE"))}
        full.update({"PORT": f"127.0.0.1:{self.port}", "IDEMPOTENCY_STORE": f"sqlite:///{tmp_path}/gunicorn-idem.sqlite3"})
        full.update({name: str(n) for name, n in (("WEB_CONCURRENCY", workers), ("WEB_THREADS", threads)) if n})
        full.update(env)
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"),
                                      *args, app], cwd=cwd, env=full, stderr=self.log,
                                     stdout=self.log if stdout == subprocess.STDOUT else stdout)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log_path.read_text()}")
            try:
                urllib.request.urlopen(self.url + healthz, timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not become healthy")

    def post(self, payload, key=None, headers=None, timeout=30):
        """POST /v1/send; returns (status, parsed JSON body)."""
        data = json.dumps(payload).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Idempotency-Key"] = key
        req = urllib.request.Request(self.url + "/v1/send", data=data, headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict:
        """GET /metrics as {"name": value} for samples without labels, {"name{a=x,b=y}": value} for others."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {s.name + ("{%s}" % ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) if s.labels else ""): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def workers(self, n):
        """The n worker pids, once all have loaded the app and accept (healthy means one worker is
        up, maybe not all)."""
        def accepting():
            pids = self.worker_pids()
            log = self.log_path.read_text()
            return len(pids) == n and all(f"Worker ready (pid: {pid})" in log for pid in pids)
        wait_for(accepting, timeout=20)
        return self.worker_pids()

    @contextlib.contextmanager
    def only_through(self, worker):
        """Every connection opened in the block is accepted by `worker`: the others are stopped
        (SIGSTOP), so they cannot accept from the listening socket the workers share."""
        others = [p for p in self.worker_pids() if p != worker]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def stop(self, sig=None):
        if self.proc.poll() is None:
            self.proc.terminate() if sig is None else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.log_path.read_text()


class WorkerConnection:
    """A keep-alive HTTP connection that one gunicorn worker accepted. A gthread worker serves
    every request on a connection it accepted, so requests on it reach that worker and no other."""

    def __init__(self, g, worker):
        self.http = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
        self.http.auto_open = 0  # never reconnect silently: a new connection could reach another worker
        with g.only_through(worker):
            self.http.connect()
            assert self.request("GET", "/healthz")[0] == 200  # accepted and served by now
        self.pid = worker
        assert owners(g.port, self.http.sock.getsockname()[1]) == [worker]

    def request(self, method, path, body=None, headers=None):
        """(status, parsed JSON body)"""
        self.http.request(method, path, body=body, headers=headers or {})
        resp = self.http.getresponse()
        return resp.status, json.loads(resp.read())

    def post(self, payload, key=None, headers=None):
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Idempotency-Key"] = key
        return self.request("POST", "/v1/send", json.dumps(payload).encode(), h)

    def close(self):
        self.http.close()


def owners(sport, dport=None):
    """pids of the processes holding established TCP connections from local port `sport`
    (to local port `dport`, when given)."""
    query = f"( sport = :{sport} )" if dport is None else f"( sport = :{sport} and dport = :{dport} )"
    out = subprocess.run(["ss", "-Htnp", "state", "established", query],
                         capture_output=True, text=True, check=True).stdout
    return [int(p) for p in re.findall(r"pid=(\d+)", out)]


@pytest.fixture
def gunicorn(tmp_path):
    """Factory: gunicorn(env, workers=2, threads=4) -> a running Gunicorn."""
    procs = []

    def start(env, **kwargs):
        g = Gunicorn(env, tmp_path, **kwargs)
        procs.append(g)
        return g

    yield start
    for g in procs:
        g.stop()


def json_lines(text: str) -> list:
    """The lines of a log that are JSON objects, parsed."""
    lines = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            lines.append(entry)
    return lines


def unique_key():
    return f"test-{uuid.uuid4()}"


def wait_for(predicate, timeout=15):
    """Poll until predicate() is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
