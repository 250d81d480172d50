"""One key, one email whichever gunicorn worker or replica a request reaches: gunicorn as a real
process, aiosmtpd holding DATA in flight (Handler.data_gate) so requests really overlap."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import WorkerConnection, owners, unique_key, wait_for

MAIL = {"to": "dora@example.com", "subject": "Your code", "body": "Your code is 424242"}


@pytest.fixture
def held_server(smtp_server):
    """The SMTP server with DATA held in flight until `smtp_server.handler.data_gate` is set."""
    smtp_server.handler.data_gate = threading.Event()
    yield smtp_server
    smtp_server.handler.data_gate.set()


def in_flight(instances, server, n):
    """Wait until the owner's mail is at the server and all n requests are accepted; they must
    be spread over more than one worker process, or the test proves nothing."""
    wait_for(lambda: server.handler.data_peers)
    wait_for(lambda: sum(len(owners(g.port)) for g in instances) >= n)
    assert len({pid for g in instances for pid in owners(g.port)}) > 1


def booted(g, workers):
    """Wait until every worker has built the app (it opens the idempotency file when it does),
    so the storm meets all of them rather than the first one up."""
    def opened():
        n = 0
        for pid in g.worker_pids():
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:
                continue  # a file descriptor closed while we looked
            n += any(link.endswith("idem.sqlite3") for link in links)
        return n == workers
    wait_for(opened)


def test_forty_concurrent_requests_on_four_workers_send_one_email(gunicorn, held_server):
    g = gunicorn(held_server.env(), workers=4, threads=10)
    booted(g, 4)
    key = unique_key()
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(g.post, MAIL, key) for _ in range(40)]
        try:
            in_flight([g], held_server, 40)
        finally:
            held_server.handler.data_gate.set()
        answers = [f.result() for f in futures]
    assert [s for s, _ in answers] == [200] * 40
    assert {body["message_id"] for _, body in answers} == {key}
    assert len(held_server.messages) == 1
    assert g.post(MAIL, key)[1]["message_id"] == key  # and later retries replay
    assert len(held_server.messages) == 1


def test_two_replicas_sharing_redis_send_one_email_and_refuse_conflicts(gunicorn, held_server, redis_url):
    env = held_server.env(IDEMPOTENCY_STORE=redis_url)
    # Threads to spare: the conflict request must find one while 20 followers hold theirs.
    a, b = gunicorn(env, workers=2, threads=25), gunicorn(env, workers=2, threads=25)
    key = unique_key()
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit((a, b)[i % 2].post, MAIL, key) for i in range(40)]
        try:
            in_flight([a, b], held_server, 40)
            # While the owner is still sending, different content under the key is refused at once.
            for replica in (a, b):
                status, body = replica.post({**MAIL, "body": "Your code is 000000"}, key)
                assert (status, body["error_code"]) == (409, "idempotency_conflict")
        finally:
            held_server.handler.data_gate.set()
        answers = [f.result() for f in futures]
    assert [s for s, _ in answers] == [200] * 40
    assert {body["message_id"] for _, body in answers} == {key}
    assert b.post({**MAIL, "to": "eve@example.com"}, key)[0] == 409  # and after it is done
    assert len(held_server.messages) == 1


def test_worker_killed_mid_send_frees_the_key_after_its_lease(gunicorn, held_server):
    # SMTP_TIMEOUT_SECONDS=1: the lease is 1 + 5 s, and a follower waits at most 1 s.
    g = gunicorn(held_server.env(SMTP_TIMEOUT_SECONDS="1"), workers=2, threads=4)
    key = unique_key()
    first = threading.Thread(target=lambda: _ignore_errors(g.post, MAIL, key), daemon=True)
    first.start()
    wait_for(lambda: held_server.handler.data_peers)
    reserved_by = time.monotonic()
    (victim,) = owners(held_server.handler.data_peers[0][1])  # the worker on the SMTP connection
    assert victim in g.worker_pids()
    os.kill(victim, signal.SIGKILL)
    first.join(10)

    # Within the lease a retry does not send: it waits for the (dead) owner, then gives up.
    status, body = g.post(MAIL, key)
    assert (status, body["error_code"]) == (504, "timeout")
    assert len(held_server.handler.data_peers) == 1

    held_server.handler.data_gate.set()
    time.sleep(max(0.0, reserved_by + 6 - time.monotonic()))
    wait_for(lambda: g.post(MAIL, key)[0] == 200, timeout=10)
    assert len(held_server.handler.data_peers) == 2  # the retry after the lease sent again
    assert g.post(MAIL, key) == (200, {"ok": True, "message_id": key, "provider": "smtp"})
    assert len(held_server.handler.data_peers) == 2


def test_failure_then_retry_on_another_worker_sends_again(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(), workers=2, threads=2)
    a, b = (WorkerConnection(g, pid) for pid in g.workers(2))
    key = unique_key()
    smtp_server.handler.data_reply = "554 5.7.1 message refused"
    status, body = a.post(MAIL, key)
    assert (status, body["error_code"]) == (500, "send_failed")
    smtp_server.handler.data_reply = None
    success = (200, {"ok": True, "message_id": key, "provider": "smtp"})
    assert b.post(MAIL, key) == success  # the failure on worker a left the key free
    assert a.post(MAIL, key) == success  # and worker a replays worker b's success
    assert len(smtp_server.messages) == 1


def test_capacity_limit_across_workers(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(IDEMPOTENCY_MAX_ENTRIES="3"), workers=4, threads=2)
    keys = [unique_key() for _ in range(4)]
    assert [g.post(MAIL, k)[0] for k in keys[:3]] == [200] * 3
    status, body = g.post(MAIL, keys[3])
    assert (status, body["error_code"]) == (429, "rate_limited")
    for k in keys[:3] * 2:  # known keys replay on every worker
        assert g.post(MAIL, k) == (200, {"ok": True, "message_id": k, "provider": "smtp"})
    assert len(smtp_server.messages) == 3


def test_memory_store_with_several_workers_refuses_to_start(gunicorn, smtp_server):
    with pytest.raises(RuntimeError, match="IDEMPOTENCY_STORE: memory:// holds for one process only"):
        gunicorn(smtp_server.env(IDEMPOTENCY_STORE="memory://"), workers=2)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass  # its worker was killed: the connection drops without an answer
