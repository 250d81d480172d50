"""deploy/nginx/herald-smtp.conf in front of the running service (README "Behind TLS"): Debian's
nginx on loopback with a trustme certificate, gunicorn behind it, requests sent as Herald sends
them over https://. The file is used as shipped; only its listen address, upstream port and
certificate paths are replaced, each exactly once.

Client and proxy are told apart by their loopback addresses: the client connects from 127.0.0.2,
nginx reaches gunicorn from 127.0.0.1 (FORWARDED_ALLOW_IPS), a forger from 127.0.0.3."""

import http.client
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import uuid

import pytest

from conftest import API_KEY, ROOT, free_port, json_lines, listening, unique_key, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="needs Debian's nginx (.ci/run installs it)")
SITE = os.path.join(ROOT, "deploy", "nginx", "herald-smtp.conf")
LIMIT = 65536  # HTTP_BODY_LIMIT_BYTES, the service's default; the file says 64k
CLIENT, FORGER = "127.0.0.2", "127.0.0.3"
MAIL = {"to": "user@example.com", "subject": "Your code", "body": "Your code is 424242"}


class Nginx:
    """nginx -p <dir> with the shipped site file in an http {} block of its own."""

    def __init__(self, tmp_path, certs, upstream_port):
        self.port = free_port()
        self.dir = tmp_path / "nginx"
        self.dir.mkdir()
        chain, key = self.dir / "fullchain.pem", self.dir / "privkey.pem"
        for i, pem in enumerate(certs.cert.cert_chain_pems):
            pem.write_to_path(str(chain), append=i > 0)
        certs.cert.private_key_pem.write_to_path(str(key))
        site = open(SITE).read()
        for shipped, here in (("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;"),
                              ("server 127.0.0.1:8084;", f"server 127.0.0.1:{upstream_port};"),
                              ("/etc/herald-smtp/tls/fullchain.pem", str(chain)),
                              ("/etc/herald-smtp/tls/privkey.pem", str(key))):
            assert site.count(shipped) == 1, shipped
            site = site.replace(shipped, here)
        (self.dir / "site.conf").write_text(site)
        d = self.dir
        # $connection and $connection_requests: which client connection carried each request, and its how-manieth.
        (d / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
http {{
    log_format test '$connection $connection_requests $status $http_x_request_id';
    access_log {d}/access.log test;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                                     stderr=subprocess.STDOUT, stdout=open(d / "stdout", "w"))
        wait_for(lambda: self.proc.poll() is not None or listening(self.port), timeout=10)
        assert self.proc.poll() is None, (d / "stdout").read_text() + (d / "error.log").read_text()
        self.ca = ssl.create_default_context(cafile=certs.ca_file)

    def connect(self, context=None):
        """An https:// connection as Herald's client opens it: certificate checked, kept alive."""
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=context or self.ca,
                                           source_address=(CLIENT, 0))

    def log(self, *request_ids):
        """Its access log: (connection, request number on it, status) by X-Request-ID, once it has
        a line for each of `request_ids` (nginx writes one after its answer has gone)."""
        def read():
            lines = [line.split() for line in (self.dir / "access.log").read_text().splitlines()]
            return {rid: (int(conn), int(n), int(status)) for conn, n, status, rid in lines}
        wait_for(lambda: set(request_ids) <= set(read()), timeout=5)
        return read()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def behind_nginx(tmp_path, certs, gunicorn, smtp_server):
    """(nginx, gunicorn) with FORWARDED_ALLOW_IPS naming nginx's address; one worker, one send at a time."""
    servers = []

    def start(**env):
        g = gunicorn(smtp_server.env(API_KEY=API_KEY, FORWARDED_ALLOW_IPS="127.0.0.1", **env), workers=1, threads=4)
        servers.append(Nginx(tmp_path, certs, g.port))
        return servers[-1], g

    yield start
    for n in servers:
        n.stop()


def send(conn, payload=MAIL, key=True, api_key=API_KEY, body=None, **headers):
    """POST /v1/send as Herald does; returns (status, JSON body, response headers)."""
    headers = {"Content-Type": "application/json", "X-Request-ID": uuid.uuid4().hex, **headers}
    if key:
        headers["Idempotency-Key"] = unique_key()
    if api_key:
        headers["X-API-Key"] = api_key
    conn.request("POST", "/v1/send", body=body if body is not None else json.dumps(payload).encode(), headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read()), dict(resp.getheaders(), request_id=headers["X-Request-ID"])


def upstream_connections(port):
    """Local ports of the established connections to gunicorn's port (nginx's side of them)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[-2].rsplit(":", 1)[1] for line in out.splitlines()}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_herald_sends_over_one_tls_connection_and_nginx_over_one_upstream_connection(behind_nginx, smtp_server, certs):
    nginx, g = behind_nginx()
    conn = nginx.connect()
    ids, upstream = [], set()
    for _ in range(5):
        status, body, headers = send(conn)
        assert (status, body["ok"]) == (200, True)
        ids.append(headers["request_id"])
        upstream |= upstream_connections(g.port)
        if len(ids) == 1:
            sock = conn.sock
        assert conn.sock is sock  # http.client would have opened another had nginx closed this one
    assert len(smtp_server.messages) == 5
    log = nginx.log(*ids)
    # One TLS connection carried all five, as its first to fifth request ...
    assert len({log[i][0] for i in ids}) == 1 and [log[i][1] for i in ids] == [1, 2, 3, 4, 5]
    # ... and gunicorn saw one connection from nginx for the five (upstream keepalive).
    assert len(upstream) == 1
    conn.close()

    # TLS 1.2 and 1.3, nothing older.
    for version, accepted in ((ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True),
                              (ssl.TLSVersion.TLSv1_1, False)):
        ctx = ssl.create_default_context(cafile=certs.ca_file)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this client offer TLS 1.1 at all
        ctx.minimum_version = ctx.maximum_version = version
        c = nginx.connect(ctx)
        try:
            c.request("GET", "/healthz")
            assert accepted and c.getresponse().status == 200 and c.sock.version() == version.name.replace("_", ".")
        except ssl.SSLError:
            assert not accepted
        finally:
            c.close()


def test_answers_arrive_in_the_contracts_envelope(behind_nginx, smtp_server):
    nginx, g = behind_nginx(SMTP_MAX_CONCURRENT_SENDS="1")

    # 401 from herald-smtp, as it sent it.
    status, body, headers = send(nginx.connect(), api_key=None)
    assert (status, body) == (401, {"ok": False, "error_code": "unauthorized", "error_message": "missing or invalid X-API-Key"})
    assert "X-Request-ID" in headers  # herald-smtp's answer, not nginx's

    # The body limits agree: LIMIT bytes pass nginx and are sent; one more is nginx's 413, in the envelope.
    def of_size(n):
        filler = n - len(json.dumps({**MAIL, "body": ""}).encode())
        return json.dumps({**MAIL, "body": "x" * filler}).encode()
    status, body, headers = send(nginx.connect(), body=of_size(LIMIT))
    assert (status, body["ok"], len(smtp_server.messages)) == (200, True, 1)
    status, body, headers = send(nginx.connect(), body=of_size(LIMIT + 1))
    assert (status, body) == (413, {"ok": False, "error_code": "invalid_request", "error_message": "request body too large"})
    assert headers["Content-Type"] == "application/json" and "X-Request-ID" not in headers  # nginx's own answer
    assert nginx.log(headers["request_id"])[headers["request_id"]][2] == 413

    # 429 from herald-smtp: its one send slot is held by a send whose DATA the server keeps waiting.
    smtp_server.handler.data_gate = threading.Event()
    first = {}
    held = threading.Thread(target=lambda: first.update(answer=send(nginx.connect())))
    held.start()
    wait_for(lambda: len(smtp_server.handler.data_peers) == 2)  # the 200 above, and this one
    status, body, headers = send(nginx.connect())
    assert (status, body["ok"], body["error_code"]) == (429, False, "rate_limited")
    assert set(body) == {"ok", "error_code", "error_message"} and "X-Request-ID" in headers
    smtp_server.handler.data_gate.set()
    held.join(10)
    assert first["answer"][0] == 200 and len(smtp_server.messages) == 2

    # herald-smtp gone: nginx's 502, in the envelope.
    g.stop()
    status, body, headers = send(nginx.connect())
    assert (status, body["error_code"]) == (502, "provider_down") and set(body) == {"ok", "error_code", "error_message"}


def test_the_access_log_shows_the_client_behind_nginx_and_no_forged_address(behind_nginx):
    nginx, g = behind_nginx()
    through = send(nginx.connect())[2]["request_id"]
    # A client's own X-Forwarded-For: nginx appends the address it saw, and that one is logged.
    forged_through = send(nginx.connect(), **{"X-Forwarded-For": "203.0.113.9"})[2]["request_id"]
    # Straight to gunicorn from an address that is no proxy, claiming to be forwarded.
    direct = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10, source_address=(FORGER, 0))
    forged_direct = send(direct, **{"X-Forwarded-For": "203.0.113.9"})[2]["request_id"]
    # A scheme header that contradicts nginx's X-Forwarded-Proto is cleared, not a 400.
    assert send(nginx.connect(), **{"X-Forwarded-Ssl": "off"})[0] == 200

    access = {line["request_id"]: line for line in json_lines(g.stop()) if line.get("event") == "access"}
    assert (access[through]["remote"], access[through]["client"]) == ("127.0.0.1", CLIENT)
    assert (access[forged_through]["remote"], access[forged_through]["client"]) == ("127.0.0.1", CLIENT)
    assert (access[forged_direct]["remote"], access[forged_direct]["client"]) == (FORGER, FORGER)
    assert "203.0.113.9" not in json.dumps([access[forged_through], access[forged_direct]])
