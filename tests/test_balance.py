"""Keep-alive connections spread over the gunicorn workers (README "Running in production under
gunicorn"): a connection stays with the worker that accepted it, so a client's pool must not land
on one worker, whether its connections open all at once or one at a time."""

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import owners, unique_key

pytestmark = pytest.mark.serial  # which worker accepts first is a race of milliseconds


def open_connection(g):
    """A keep-alive connection that has been accepted and served one send."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    conn.request("POST", "/v1/send", json.dumps({"to": "user@example.com", "body": "hi"}),
                 {"Content-Type": "application/json", "Idempotency-Key": unique_key()})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    return conn


def per_worker(g, conns):
    """How many of `conns` each worker holds, sorted."""
    holders = [owners(g.port, c.sock.getsockname()[1]) for c in conns]
    assert all(len(h) == 1 for h in holders)
    return sorted(sum(h == [pid] for h in holders) for pid in g.worker_pids())


@pytest.mark.parametrize("n", [2, 4, 8])
def test_connections_opened_one_at_a_time_are_shared_evenly(gunicorn, smtp_server, n):
    g = gunicorn(smtp_server.env(), workers=2, threads=4)
    g.workers(2)
    conns = []
    for _ in range(n):
        conns.append(open_connection(g))
        time.sleep(0.05)  # as a client's pool grows under load, not in one burst
    assert per_worker(g, conns) == [n // 2, n // 2]


def test_connections_opened_at_once_are_shared_evenly(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(), workers=2, threads=8)
    g.workers(2)
    with ThreadPoolExecutor(16) as pool:
        conns = list(pool.map(lambda _: open_connection(g), range(16)))
    counts = per_worker(g, conns)
    assert counts[0] >= 6, counts  # 8 / 8, give or take what raced; never twice the other's share
