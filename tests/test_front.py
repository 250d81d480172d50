"""The front door (herald_smtp/http/worker.py): h11 frames every request, nothing a client sends
raises out of the main loop, the environ is gunicorn's own, the answers are written by the main
loop, a stopping worker lets its sends finish, and every line on stderr is JSON."""

import json
import select
import socket
import threading
import time

import pytest
from gunicorn.config import Config
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import API_KEY, json_lines, unique_key, wait_for
from herald_smtp.http.worker import LoadBoard, RequestReader, Settings

LIMIT = 4096
READY, CONTINUE, CLOSE, REFUSE = RequestReader.READY, RequestReader.CONTINUE, RequestReader.CLOSE, RequestReader.REFUSE


def reader(body_limit=LIMIT):
    cfg = Config()
    for name, value in (("limit_request_field_size", 4094), ("limit_request_fields", 32)):
        cfg.set(name, value)  # as gunicorn.conf.py sets them
    head_limit = cfg.limit_request_line + 4 + cfg.limit_request_fields * (cfg.limit_request_field_size + 2)
    return RequestReader(Settings(cfg), ("127.0.0.1", 40000), body_limit, head_limit)


def run(pieces):
    """Feed the pieces, then the client's close; returns every outcome up to the first that is
    not None or CONTINUE (what the main loop acts on)."""
    r, outcomes = reader(), []
    for piece in [*pieces, b""]:
        outcome = r.feed(piece)
        outcomes.append(outcome)
        if outcome not in (None, CONTINUE):
            return r, outcomes
    raise AssertionError("the client closed and nothing was decided")


# -- the framing, without sockets -------------------------------------------------------

BODY = json.dumps({"to": "user@example.com", "body": "hi"}).encode()
VALID = [
    b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY),
    b"POST /v1/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
]


@st.composite
def hostile_bytes(draw):
    """Valid requests mangled (bytes inserted, removed, replaced, framing headers added), or noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            data[at:at] = draw(st.sampled_from([b"\n", b"\r", b"\x00", b" ", b"\r\n", b":", b"\r\n\r\n", b"0"]))
        elif choice == 1:
            del data[at:at + draw(st.integers(1, 5))]
        elif choice == 2:
            head_end = max(data.find(b"\r\n") + 2, 2)
            data[head_end:head_end] = draw(st.sampled_from([
                b"Content-Length: 7\r\n", b"Content-Length: 1, 2\r\n", b"Transfer-Encoding: chunked\r\n",
                b"Content-Length: " + b"9" * 5000 + b"\r\n", b"Transfer-Encoding: gzip, chunked\r\n",
                b"X_Forwarded_For: 1.2.3.4\r\n", b"Expect: 100-continue\r\n", b"Expect: nonsense\r\n",
                b"Host: y\r\n", b" folded\r\n", b"X-Forwarded-Proto: https\r\n"]))
        else:
            data[at:at + 1] = bytes([draw(st.integers(0, 255))])
    return bytes(data)


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bytes(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_bytes_split_anywhere_are_answered_or_closed_never_raised(data, cuts):
    r, outcomes = run(split(data, cuts))
    decided = outcomes[-1]
    if decided is READY:
        assert r.request.method and r.request.path is not None
        body = r.request.body.read()
        assert len(body) <= LIMIT or not r.whole
    elif decided is not CLOSE:
        kind, status, _ = decided
        assert kind == REFUSE and 400 <= status < 600


@pytest.mark.parametrize("data, status", [
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n", 417),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # gunicorn's method rules
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400),  # gunicorn's version rule
])
def test_framing_that_rfc_9112_or_gunicorn_refuses_is_refused_at_once(data, status):
    _, outcomes = run([data])
    assert outcomes[0][:2] == (REFUSE, status), outcomes


def test_a_request_with_bare_lf_lines_is_decided_at_once():
    _, outcomes = run([b"GET /healthz HTTP/1.1\nHost: x\n\n"])
    assert outcomes[0] is READY  # as h11 reads it (RFC 9112 2.2 allows it); never a wait


def test_a_body_over_the_limit_is_handed_over_unread_and_marked_not_whole():
    r, outcomes = run([b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n"])
    assert outcomes[0] is READY and not r.whole
    r, outcomes = run([b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                       b"1000\r\n" + b"a" * 4096 + b"\r\n", b"1\r\na\r\n"])
    assert outcomes[-1] is READY and not r.whole and len(r.request.body.read()) == LIMIT + 1


def test_pipelined_requests_come_one_at_a_time_with_the_rest_left_over():
    r, outcomes = run([VALID[0] + VALID[1]])
    assert outcomes[0] is READY and r.whole and r.request.body.read() == BODY
    assert r.leftover() == (VALID[1], False)


def test_expect_100_continue_is_asked_for_once_before_the_body():
    r = reader()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    assert r.feed(head) is CONTINUE
    assert r.feed(b"a") is None
    assert r.feed(b"b") is READY and r.request.body.read() == b"ab"


def cpu_to_read(data, piece):
    r = reader(body_limit=10 ** 9)
    started = time.process_time()
    for i in range(0, len(data), piece):
        r.feed(data[i:i + piece])
    return time.process_time() - started


def test_the_least_loaded_worker_accepts_and_a_flood_is_taken_in_batches():
    """A client's few kept-alive connections go strictly to the worker holding fewer; with
    hundreds held, a worker within an eighth of the other's load accepts on, so a flood is not
    handed over one connection at a time (bench/accept_balance.py measures the rate)."""
    board, now = LoadBoard(), time.monotonic()
    board.publish(1, 3, now)
    assert board.least_loaded(0, 3, now) and not board.least_loaded(0, 4, now)
    board.publish(1, 800, now)
    assert board.least_loaded(0, 900, now) and not board.least_loaded(0, 920, now)
    board.publish(1, 0, now - LoadBoard.LIVE - 1)  # stopped or gone: it no longer counts
    assert board.least_loaded(0, 50, now)


def test_reading_costs_time_linear_in_the_bytes_received():
    # The shapes that were quadratic by hand: a chunked body of 1-byte chunks arriving a byte at a
    # time, and a head growing a byte at a time up to its limit.
    def dripped(n):
        return b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * n

    def long_head(n):
        return b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(n))

    for make, n in ((dripped, 2000), (long_head, 30)):
        small, large = (min(cpu_to_read(make(k), 1) for _ in range(3)) for k in (n, 4 * n))
        assert large < 8 * small, (make.__name__, small, large)  # 4x the bytes: 4x, not 16x


# -- through gunicorn -------------------------------------------------------------------

def raw(port, data, timeout=5.0):
    """Send `data`, then read until the server closes or `timeout`: (bytes, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([s], [], [], deadline - time.monotonic())[0]:
                break
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out, True
            if not chunk:
                return out, True
            out += chunk
        return out, False


@pytest.fixture
def service(smtp_server, gunicorn):
    return gunicorn(smtp_server.env(API_KEY=API_KEY), workers=2, threads=4)


def keyed_send(g, timeout=10):
    started = time.monotonic()
    status, _ = g.post({"to": "user@example.com", "body": "hi"}, key=unique_key(), headers={"X-API-Key": API_KEY},
                       timeout=timeout)
    return status, time.monotonic() - started


def test_hostile_framing_is_refused_and_closed_without_restarting_a_worker(service, smtp_server):
    pids = service.workers(2)
    smtp_server.handler.data_delay = 1.0  # a send in flight the whole time
    result = {}
    sender = threading.Thread(target=lambda: result.update(send=keyed_send(service)))
    sender.start()
    wait_for(lambda: smtp_server.handler.data_peers)
    requests = [b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"] * 20 + [
        b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    ]
    for data in requests:
        out, closed = raw(service.port, data)
        assert out.startswith(b"HTTP/1.1 400 ") and closed, out[:100]
        assert json.loads(out.partition(b"\r\n\r\n")[2])["error_code"] == "invalid_request"
    sender.join(10)
    assert result["send"][0] == 200
    assert sorted(service.worker_pids()) == sorted(pids)  # none restarted


def test_a_client_that_pipelines_and_never_reads_holds_no_thread_and_is_closed_at_the_deadline(
        smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=1, threads=2)
    hogs = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", g.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        hogs.append(s)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    started = time.monotonic()
    sent, answers, at_two_seconds = [0] * len(hogs), [], None
    while (elapsed := time.monotonic() - started) < 3:  # fill every buffer on the way: the answers stop
        if elapsed > 2 and at_two_seconds is None:
            at_two_seconds = list(sent)
        for i, s in enumerate(hogs):
            try:
                while True:
                    sent[i] += s.send(request * 64)
            except BlockingIOError:
                pass
        answers.append(keyed_send(g))
        time.sleep(0.05)
    assert all(status == 200 for status, _ in answers) and max(s for _, s in answers) < 1.0, answers
    # Each sent thousands of requests and is stuck: its answers wait, its requests are not read.
    assert min(sent) > 50_000 and sent == at_two_seconds, (sent, at_two_seconds)
    # Each is closed once its answer has waited SEND_TIMEOUT (10 s) for the client to take it:
    # seen in the TCP state, without reading (which would let the answers go on).
    def established(s):
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1
    wait_for(lambda: not any(established(s) for s in hogs), timeout=22 - (time.monotonic() - started))
    assert time.monotonic() - started > 9  # not before the deadline
    for s in hogs:
        s.close()


def read_response(f):
    """(status, body) of the next answer on a kept-alive connection's file (any 1xx skipped)."""
    while True:
        status = int(f.readline().split()[1])
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if status >= 200:
            return status, f.read(length)


REQUESTS = {
    "get": b"GET /some%20path/x?q=1&r=%2F HTTP/1.1\r\nHost: example.com:8080\r\nX-Forwarded-Proto: https\r\n"
           b"X-Forwarded-For: 203.0.113.7\r\nX_Forwarded_For: 1.2.3.4\r\nX-Dup: a\r\nX-Dup: b\r\nUser-Agent: t\r\n\r\n",
    "chunked": b"POST /v1/send HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
               b"X-Forwarded-Ssl: on\r\n\r\n3\r\n{\"a\r\n5\r\n\": 1}\r\n0\r\nX-Trailer: t\r\n\r\n",
    "http10": b"GET /old HTTP/1.0\r\nX-Forwarded-Proto: http\r\n\r\n",
    "length": b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nForwarded: for=1.2.3.4\r\n"
              b"\r\nhello",
}


def environs(port):
    """Every REQUESTS entry, pipelined on one connection, then an Expect: 100-continue one."""
    seen = {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(REQUESTS["get"] + REQUESTS["chunked"] + REQUESTS["length"])
        f = s.makefile("rb")
        for name in ("get", "chunked", "length"):
            status, body = read_response(f)
            assert status == 200, (name, body)
            seen[name] = json.loads(body)
        s.sendall(b"POST /c HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        s.sendall(b"abc")
        seen["continue"] = json.loads(read_response(f)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(REQUESTS["http10"])
        seen["http10"] = json.loads(read_response(s.makefile("rb"))[1])
    for environ in seen.values():
        assert environ.pop("REMOTE_PORT").isdigit() and environ.pop("SERVER_PORT") == str(port)
    return seen


@pytest.mark.parametrize("allowed", ["127.0.0.1", "10.9.9.9"], ids=["trusted-peer", "untrusted-peer"])
def test_the_environ_is_the_one_stock_gthread_builds(gunicorn, allowed):
    env = {"FORWARDED_ALLOW_IPS": allowed}
    ours = gunicorn(env, workers=1, threads=2, app="tests.environ_app:app", healthz="/")
    stock = gunicorn(env, workers=1, threads=2, app="tests.environ_app:app", healthz="/", args=["-k", "gthread"])
    got, expected = environs(ours.port), environs(stock.port)
    assert got == expected
    assert got["get"]["wsgi.url_scheme"] == ("https" if allowed == "127.0.0.1" else "http")
    assert got["get"]["HTTP_X_DUP"] == "a,b" and got["chunked"]["body"] == '{"a": 1}'


def test_a_worker_at_max_requests_lets_its_send_finish_then_quits_smtp(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(), workers=1, threads=2, args=["--max-requests", "3", "--max-requests-jitter", "0"])
    first = g.workers(1)[0]
    smtp_server.handler.data_delay = 1.5
    results = []
    threads = [threading.Thread(target=lambda: results.append(g.post({"to": "user@example.com"}, key=unique_key())))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # The fixture's health check was the first request: these two are its last, in flight together.
    assert [status for status, _ in results] == [200, 200]
    wait_for(lambda: g.worker_pids() and g.worker_pids() != [first], timeout=20)
    assert smtp_server.handler.commands["QUIT"] == smtp_server.sessions  # closed after, not during
    smtp_server.handler.data_delay = 0
    assert g.post({"to": "user@example.com"}, key=unique_key())[0] == 200


@pytest.mark.parametrize("app", ["no_such_module:app", "tests.environ_app:no_such_app"])
def test_a_worker_that_cannot_load_the_app_writes_only_json(gunicorn, tmp_path, app):
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        gunicorn({}, workers=1, threads=1, app=app)
    output = next(tmp_path.glob("gunicorn-*.log")).read_text()
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and len(json_lines(output)) == len(lines), output
    assert any(line.get("exception") for line in json_lines(output))
