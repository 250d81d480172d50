"""One key, one email whichever gunicorn worker or replica a request reaches: gunicorn as a real
process, aiosmtpd holding DATA in flight (Handler.data_gate) so requests really overlap."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import WorkerConnection, json_lines, owners, unique_key, wait_for

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


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_burst_of_new_keys_past_the_limit_is_all_sent_and_the_newest_replay(gunicorn, smtp_server, tmp_path,
                                                                              store, request):
    url = request.getfixturevalue("redis_url") if store == "redis" else f"sqlite:///{tmp_path}/burst.sqlite3"
    env = smtp_server.env(IDEMPOTENCY_STORE=url, IDEMPOTENCY_MAX_ENTRIES="100")
    g = gunicorn(env, workers=2, threads=4)
    keys = [unique_key() for _ in range(400)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: g.post({**MAIL, "body": k}, k), keys))
    assert [s for s, _ in answers] == [200] * 400
    assert len(smtp_server.messages) == 400
    newest = keys[-50:]
    assert [g.post({**MAIL, "body": k}, k)[1]["message_id"] for k in newest] == newest
    assert len(smtp_server.messages) == 400  # replayed, not sent
    metrics = g.metrics()
    assert 200 <= metrics["herald_smtp_idempotency_evictions_total"] <= 310
    assert 0 < metrics["herald_smtp_idempotency_oldest_success_age_seconds"] < 60
    warnings = [line for line in json_lines(g.stop()) if line.get("event", "").startswith("idempotency store full")]
    assert 1 <= len(warnings) <= 2  # at most one a minute in each worker

    # State left by that run: a new start on the full store remembers the newest keys, and sends.
    g = gunicorn(env, workers=2, threads=4)
    assert g.post({**MAIL, "body": keys[-1]}, keys[-1])[1]["message_id"] == keys[-1]
    assert g.post(MAIL, unique_key())[0] == 200
    assert len(smtp_server.messages) == 401


def test_a_store_full_of_sends_in_flight_answers_429_on_every_worker(gunicorn, held_server):
    g = gunicorn(held_server.env(IDEMPOTENCY_MAX_ENTRIES="2"), workers=2, threads=4)
    workers = g.workers(2)
    senders = [WorkerConnection(g, pid) for pid in workers]  # one send in flight on each worker
    askers = [WorkerConnection(g, pid) for pid in workers]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(c.post, MAIL, unique_key()) for c in senders]
        try:
            wait_for(lambda: len(held_server.handler.data_peers) == 2)
            for c in askers:
                status, body = c.post(MAIL, unique_key())
                assert (status, body["error_code"]) == (429, "rate_limited")
        finally:
            held_server.handler.data_gate.set()
        assert [f.result()[0] for f in futures] == [200] * 2
    assert [c.post(MAIL, unique_key())[0] for c in askers] == [200, 200]  # settled records make room
    assert len(held_server.messages) == 4
    for c in senders + askers:
        c.close()


def test_two_senders_on_one_host_keep_their_keys_apart(gunicorn, smtp_server, tmp_path):
    """Two deployments run by one user on one host, each with its own SMTP_FROM, on the default store."""
    shared = {"IDEMPOTENCY_STORE": "", "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    brand_a = gunicorn(smtp_server.env(SMTP_FROM="codes@brand-a.example", **shared), workers=1, threads=2)
    brand_b = gunicorn(smtp_server.env(SMTP_FROM="codes@brand-b.example", **shared), workers=1, threads=2)
    key = unique_key()
    assert brand_a.post(MAIL, key)[0] == 200
    assert brand_b.post(MAIL, key)[0] == 200  # not brand A's replay: its own mail
    assert brand_a.post(MAIL, key)[0] == 200  # and brand A still replays its own
    assert [m.mail_from for m in smtp_server.messages] == ["codes@brand-a.example", "codes@brand-b.example"]
    assert "herald-smtp-idempotency.sqlite3" in os.listdir(tmp_path / "run")  # one file, shared


def test_memory_store_with_several_workers_refuses_to_start(gunicorn, smtp_server):
    with pytest.raises(RuntimeError, match="IDEMPOTENCY_STORE: memory:// holds for one process only"):
        gunicorn(smtp_server.env(IDEMPOTENCY_STORE="memory://"), workers=2)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass  # its worker was killed: the connection drops without an answer
