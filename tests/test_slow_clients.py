"""Clients that trickle, stall or pile up connections are cut off at their deadline and never stop
the service answering others (README, "Slow and idle clients"). All through a real gunicorn."""

import json
import select
import socket
import threading
import time

import pytest

from conftest import API_KEY, unique_key, wait_for
from herald_smtp.http.worker import MAX_WAITING

MAIL = {"to": "normal@example.com", "subject": "Code", "body": "Your code is 123456"}


def connect(g):
    return socket.create_connection(("127.0.0.1", g.port), timeout=10)


def closed_within(sock, seconds):
    """True once the server has closed `sock` (FIN or reset), waiting at most `seconds`."""
    if not select.select([sock], [], [], seconds)[0]:
        return False
    try:
        while True:
            if not sock.recv(65536):
                return True
            if not select.select([sock], [], [], 0)[0]:
                return False  # an answer, and the connection still open
    except OSError:
        return True


def trickle(g, prefix, stop, closes, byte_every=1.0):
    """Send `prefix` and then one header byte every `byte_every` s until the server closes the
    connection (recording when, from the connect) or `stop` is set; then connect again."""
    while not stop.is_set():
        sock, started = connect(g), time.monotonic()
        try:
            sock.sendall(prefix)
            for byte in b"X-Slow: " + b"a" * 10000:
                sock.send(bytes([byte]))
                if closed_within(sock, byte_every):
                    closes.append(time.monotonic() - started)
                    break
                if stop.is_set():
                    break
        except OSError:
            closes.append(time.monotonic() - started)
        finally:
            sock.close()


def timed_send(g):
    started = time.monotonic()
    status, body = g.post(MAIL, key=unique_key(), headers={"X-API-Key": API_KEY}, timeout=10)
    return status, time.monotonic() - started


def test_forty_clients_trickling_headers_neither_slow_normal_sends_nor_outlive_the_deadline(smtp_server, gunicorn):
    # The service's own defaults: 2 workers x 8 threads, HTTP_HEADER_TIMEOUT_SECONDS=10.
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=None, threads=None)
    wait_for(lambda: len(g.worker_pids()) == 2)
    stop, closes = threading.Event(), []
    head = b"POST /v1/send HTTP/1.1\r\nHost: herald-smtp\r\nContent-Type: application/json\r\n"
    tricklers = [threading.Thread(target=trickle, args=(g, head, stop, closes)) for _ in range(40)]
    for t in tricklers:
        t.start()
    time.sleep(1)  # every trickler is connected and has sent its first bytes
    answers = []
    started = time.monotonic()
    while time.monotonic() - started < 14:
        answers.append(timed_send(g))
        time.sleep(0.1)
    stop.set()
    for t in tricklers:
        t.join(timeout=15)

    slowest = max(seconds for _, seconds in answers)
    print(f"\nnormal sends during the trickle: {len(answers)}, slowest answer {slowest * 1000:.0f} ms, "
          f"median {sorted(s for _, s in answers)[len(answers) // 2] * 1000:.0f} ms; "
          f"slow connections closed after {min(closes):.2f} to {max(closes):.2f} s ({len(closes)} closes)")
    assert [status for status, _ in answers] == [200] * len(answers)
    assert len(answers) >= 50 and slowest < 1.0
    assert len(smtp_server.messages) == len(answers)
    # Each trickler was cut off at the 10 s deadline, then came back for the rest of the 15 s.
    assert len(closes) >= 40 and all(9.9 <= s <= 11.0 for s in closes), sorted(closes)


def test_two_tricklers_do_not_freeze_one_worker_with_two_threads(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY, HTTP_HEADER_TIMEOUT_SECONDS="3"), workers=1, threads=2)
    stop, closes = threading.Event(), []
    tricklers = [threading.Thread(target=trickle, args=(g, b"GET /healthz HTTP/1.1\r\n", stop, closes, 0.2))
                 for _ in range(2)]
    for t in tricklers:
        t.start()
    time.sleep(0.5)
    answers = [timed_send(g) for _ in range(10)]
    time.sleep(3)
    stop.set()
    for t in tricklers:
        t.join(timeout=10)
    assert all(status == 200 and seconds < 1.0 for status, seconds in answers), answers
    assert len(closes) >= 2 and all(2.9 <= s <= 4.0 for s in closes), closes


def test_a_trickled_body_is_cut_off_at_its_deadline(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY, HTTP_BODY_TIMEOUT_SECONDS="2"), workers=1, threads=1)
    body = json.dumps(MAIL).encode()
    sock = connect(g)
    sock.sendall(b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: "
                 + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    started = time.monotonic()
    closed = False
    for byte in body:  # one byte every 0.3 s: the whole body would take far longer than 2 s
        try:
            sock.send(bytes([byte]))
        except OSError:
            closed = True
            break
        if closed_within(sock, 0.3):
            closed = True
            break
    elapsed = time.monotonic() - started
    sock.close()
    assert closed and 1.9 <= elapsed <= 3.0, elapsed
    assert smtp_server.messages == []  # half a request is never sent
    assert timed_send(g)[0] == 200  # and the only thread was never held


def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(HTTP_HEADER_TIMEOUT_SECONDS="1.5"), workers=1, threads=1)
    sock, started = connect(g), time.monotonic()
    assert closed_within(sock, 5)
    assert 1.4 <= time.monotonic() - started <= 2.5
    sock.close()


def test_a_flood_of_idle_connections_cannot_starve_requests(smtp_server, gunicorn):
    # Far more silent connections than one worker keeps waiting: the oldest make room.
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=1, threads=2)
    idle = [connect(g) for _ in range(3 * MAX_WAITING)]
    time.sleep(0.5)
    status, seconds = timed_send(g)
    assert status == 200 and seconds < 1.0
    closed = sum(closed_within(s, 0) for s in idle)
    assert closed >= 2 * MAX_WAITING  # each worker keeps at most MAX_WAITING waiting
    for s in idle:
        s.close()


def test_kept_alive_pipelined_chunked_and_expect_continue_requests_are_answered(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=1, threads=2)
    body = json.dumps(MAIL).encode()
    head = (b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: "
            + API_KEY.encode() + b"\r\n")
    sock = connect(g)
    # Two requests in one write, the second chunked with a trailer; then a third after a pause.
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body
                 + head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    answers = read_answers(sock, 2)
    time.sleep(1)  # idle, kept alive (keepalive is 5 s)
    sock.sendall(head + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
    started = time.monotonic()
    assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n" and time.monotonic() - started < 0.5
    sock.sendall(body)
    answers += read_answers(sock, 1)
    sock.close()
    assert answers == [200, 200, 200] and len(smtp_server.messages) == 3


def read_answers(sock, n):
    """Status codes of the next n answers (any 1xx skipped) on a kept-alive connection."""
    data, statuses = b"", []
    while len(statuses) < n:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
        while b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), b"0"))
            if len(rest) < length:
                break
            data = rest[length:]
            if status >= 200:
                statuses.append(status)
    return statuses


@pytest.mark.parametrize("variable", ["HTTP_HEADER_TIMEOUT_SECONDS", "HTTP_BODY_TIMEOUT_SECONDS"])
def test_deadlines_are_checked_at_startup(variable):
    from herald_smtp import ConfigError, load_config

    assert getattr(load_config({variable: "2.5"}), variable.lower()) == 2.5
    with pytest.raises(ConfigError, match=f"^{variable}:"):
        load_config({variable: "soon"})
    with pytest.raises(ConfigError, match=f"^{variable}:"):
        load_config({variable: "0"})
