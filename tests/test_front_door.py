"""The front door (README, "Slow and idle clients"): nothing a caller without the API key sends
restarts a worker or slows the sends of a caller with it. Short versions of bench/hostile.py's
rows (`make hostile` runs them at full length against the issue's figures), each through a real
gunicorn with the service's defaults (2 workers x 8 threads) unless it says otherwise. The clients
are bench/hostile_clients.py's, each in a process of its own: the legitimate one sends one keyed
mail at a time on a new connection; the hostile ones send no key."""

import shutil
import socket
import subprocess
import time

import pytest

from bench import hostile_clients as clients
from bench.hostile import PIPELINE, SLOW_MODES, burst, huge_content_length, slowhttptest_args, summary
from conftest import API_KEY, json_lines


@pytest.fixture
def service(smtp_server, gunicorn):
    """herald-smtp with the defaults, both workers up, a few sends made (sessions open)."""
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=None, threads=None)
    g.workers(2)
    clients.run(g.port, 0.3, key=API_KEY)
    return g


def assert_delivered(smtp_server, *sends):
    """Every send answered 200 reached the SMTP server (hostile requests send nothing)."""
    answered = sum(outcome == 200 for group in sends for _, outcome in group)
    time.sleep(0.2)  # the server records a message as it answers the final dot
    assert len(smtp_server.messages) >= answered


def test_a_5000_digit_content_length_restarts_no_worker_and_fails_no_send(service, smtp_server):
    pids = sorted(service.worker_pids())
    legit = clients.start("legit", service.port, time.monotonic() + 0.3, 2.5, key=API_KEY)
    time.sleep(0.8)  # the legitimate client is sending
    answers = [huge_content_length(service.port, timeout=2) for _ in range(20)]
    sends = clients.finish(legit)["sends"]
    time.sleep(0.5)  # a worker that died would be replaced by now
    assert set(answers) <= {"400", "closed"}, answers
    assert sorted(service.worker_pids()) == pids
    assert summary(sends)["failed"] == 0, summary(sends)
    assert_delivered(smtp_server, sends)
    log = service.log_path.read_text()
    assert len(json_lines(log)) == len(log.splitlines()), log  # a traceback too is one JSON line


def test_a_request_whose_lines_end_in_a_bare_lf_is_answered_at_once(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(), workers=1, threads=2)  # the header deadline: 10 s
    with socket.create_connection(("127.0.0.1", g.port), timeout=3) as s:
        started = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\nHost: herald-smtp\n\n")
        try:
            answer = s.recv(65536)
        except socket.timeout:
            answer = b"(nothing in 3 s)"
    # RFC 9112 2.2: a recipient may take a bare LF as a line end (200), or refuse the request (400).
    assert answer.split(b"\r\n")[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"), answer
    assert time.monotonic() - started < 1.0


@pytest.mark.serial
def test_150_silent_connections_a_second_do_not_stall_sends(service, smtp_server):
    sends, (flood,) = clients.run(service.port, 3, [("flood", {"rate": 150, "hold": 0.3})], API_KEY)
    s = summary(sends)
    print(f"\nflood {flood}: legitimate sends {s}")
    assert s["failed"] == 0 and s["p99_ms"] <= 250 and s["max_ms"] <= 1000, s
    assert_delivered(smtp_server, sends)


@pytest.mark.serial
def test_bodies_dripped_in_one_byte_chunks_do_not_slow_sends(service, smtp_server):
    quiet = summary(clients.run(service.port, 1.5, key=API_KEY)[0])
    sends, (drip,) = clients.run(service.port, 3, [("drip", {"clients": 30})], API_KEY)
    s = summary(sends)
    print(f"\ndrip {drip}: quiet p50 {quiet['p50_ms']:.1f} ms; legitimate sends {s}")
    assert s["failed"] == 0 and s["p50_ms"] <= 5 * quiet["p50_ms"] + 20, s
    assert_delivered(smtp_server, sends)


@pytest.mark.serial
def test_clients_that_never_read_their_answers_hold_no_thread(smtp_server, gunicorn):
    # Two of them against one worker with two threads: a thread that waited on either would leave
    # the legitimate sends one thread, or none.
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=1, threads=2)
    name, options = PIPELINE
    sends, (pipeline,) = clients.run(g.port, 5, [(name, {**options, "clients": 2})], API_KEY)
    s = summary(sends)
    print(f"\npipeline {pipeline}: legitimate sends {s}")
    assert s["failed"] == 0 and s["max_ms"] <= 1000, s
    assert_delivered(smtp_server, sends)


@pytest.mark.serial
@pytest.mark.parametrize("mode", SLOW_MODES)
def test_slowhttptest_leaves_sends_prompt(service, smtp_server, mode, tmp_path):
    assert shutil.which("slowhttptest"), "slowhttptest is not installed (.ci/run installs it)"
    args = slowhttptest_args(mode, service.url, {"slow_connections": 200, "slow_rate": 100, "slow": 4})
    with open(tmp_path / "slowhttptest.out", "w") as out:
        attack = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            sends = clients.run(service.port, 3, key=API_KEY)[0]  # from 0.8 s in to 0.2 s before its end
        finally:
            attack.wait(timeout=30)
    s = summary(sends)
    print(f"\n{mode}: legitimate sends {s}")
    assert s["failed"] == 0 and s["p99_ms"] <= 250 and s["max_ms"] <= 1000, s
    assert_delivered(smtp_server, sends)


@pytest.mark.serial
def test_400_connections_at_once_are_all_answered(smtp_server, gunicorn):
    """More new connections than the workers' waiting places (100 each): a worker full of ones it
    has just accepted reads them before it accepts more, rather than closing the oldest unread."""
    g = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=None, threads=None)
    g.workers(2)
    sends = burst(g.port, API_KEY, n=400)
    assert summary(sends)["failed"] == 0, summary(sends)
    assert_delivered(smtp_server, sends)


@pytest.mark.serial
def test_200_connections_at_once_are_answered_about_as_fast_as_by_stock_gthread(smtp_server, gunicorn):
    ours = gunicorn(smtp_server.env(API_KEY=API_KEY), workers=None, threads=None)
    stock = gunicorn(smtp_server.env(API_KEY=API_KEY, GUNICORN_CMD_ARGS="--worker-class gthread"),
                     workers=None, threads=None)
    for g in (ours, stock):
        g.workers(2)
        clients.run(g.port, 0.3, key=API_KEY)
    sends = {name: burst(g.port, API_KEY) for name, g in (("ours", ours), ("stock", stock))}
    s = {name: summary(group) for name, group in sends.items()}
    print(f"\n200 connections at once: ours {s['ours']}; stock gthread {s['stock']}")
    assert s["ours"]["failed"] == s["stock"]["failed"] == 0, s
    assert s["ours"]["max_ms"] <= 3 * s["stock"]["max_ms"], s
    assert_delivered(smtp_server, *sends.values())
