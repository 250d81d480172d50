"""Idempotency, each backend against the real thing: a SQLite file in a temp dir, the machine's
Redis (database HERALD_TEST_REDIS_DB, flushed) and memory. Through the Flask app and aiosmtpd
where a user would see it; at the store's own interface where only it can set a case up (a dead
owner's lease)."""

import json
import multiprocessing
import os
import re
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from conftest import free_port, send_json, unique_key, wait_for
from herald_smtp.config import ConfigError, load_config
from herald_smtp.store.base import CONFLICT, DONE, FULL, NEW, PENDING, REPLAY, WAIT
from herald_smtp.store.opener import open_store

TO = "bob.builder@example.com"
MAIL = {"to": TO, "subject": "Your code", "body": "Your code is 123456"}
SHORT = 1.0  # a lease or TTL that runs out during a test, with room for a busy machine


@pytest.fixture(params=["sqlite", "redis", "memory"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/idem.sqlite3"
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return "memory://"


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request, tmp_path):
    """The stores several processes can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/idem.sqlite3"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def service(make_app, smtp_server, store_url):
    """Factory: a test client on `store_url` with extra environment."""
    def make(url=None, **env):
        env = smtp_server.env(IDEMPOTENCY_STORE=url or store_url, WEB_CONCURRENCY="1", **env)
        return make_app(env).test_client()
    return make


@pytest.fixture
def stores():
    """Factory: open_store(url, max_entries), closed after the test."""
    opened = []

    def make(url, max_entries=100, scope="", on_evict=None):
        store = open_store(url, max_entries, scope, on_evict)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def held(server):
    """Hold every DATA in flight until the returned event is set."""
    server.handler.data_gate = threading.Event()
    return server.handler.data_gate



# -- through the app: what Herald sees -------------------------------------------------


def test_retry_with_same_key_and_content_is_replayed_not_resent(service, smtp_server):
    client = service()
    key = "challenge-ünïcode key: with spaces *?[]"  # any printable text is a key
    first = send_json(client, MAIL, key=key)
    again = send_json(client, {**MAIL, "idempotency_key": key})
    assert first.status_code == again.status_code == 200
    assert first.get_json() == again.get_json() == {"ok": True, "message_id": key, "provider": "smtp"}
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("change", [
    {"body": "Your code is 654321"}, {"to": "carol@example.com"}, {"subject": "Another code"},
    {"html": "<p>123456</p>"}, {"params": {"code": "123456"}}, {"locale": "de"}, {"template": "login"},
], ids=lambda change: next(iter(change)))
def test_same_key_for_different_content_is_409(service, smtp_server, change):
    """Every field that changes the email is part of the content a key stands for."""
    client = service()
    key = unique_key()
    assert send_json(client, MAIL, key=key).status_code == 200
    resp = send_json(client, {**MAIL, **change}, key=key)
    assert (resp.status_code, resp.get_json()["ok"], resp.get_json()["error_code"]) == \
        (409, False, "idempotency_conflict")
    assert key not in resp.get_json()["error_message"] and "carol" not in resp.get_json()["error_message"]
    assert len(smtp_server.messages) == 1


def test_fields_that_do_not_change_the_email_still_replay(client, smtp_server):
    key = unique_key()
    assert send_json(client, MAIL, key=key).status_code == 200
    for same in ({**MAIL, "channel": "email"}, {**MAIL, "timeout_seconds": 5}, {**MAIL, "idempotency_key": key}):
        resp = send_json(client, same, key=key)
        assert resp.status_code == 200 and resp.get_json()["message_id"] == key
    assert len(smtp_server.messages) == 1


def test_concurrent_requests_with_one_key_share_one_send(service, smtp_server):
    client = service()
    gate = held(smtp_server)
    key = unique_key()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send_json, client.application.test_client(), MAIL, key=key) for _ in range(8)]
        wait_for(lambda: smtp_server.handler.data_peers)  # the owner's mail is in flight
        conflict = send_json(client, {**MAIL, "subject": "Other"}, key=key)
        assert conflict.status_code == 409  # at once: it does not wait for the owner
        assert not any(f.done() for f in futures)  # the rest are following the owner
        gate.set()
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 8
    assert {r.get_json()["message_id"] for r in answers} == {key}
    assert len(smtp_server.messages) == 1


def test_follower_waits_no_longer_than_its_own_deadline(client, smtp_server):
    gate = held(smtp_server)
    key = unique_key()
    with ThreadPoolExecutor(1) as pool:
        owner = pool.submit(send_json, client.application.test_client(), MAIL, key=key)
        wait_for(lambda: smtp_server.handler.data_peers)
        follower = send_json(client, {**MAIL, "timeout_seconds": 1}, key=key)
        assert follower.status_code == 504
        assert follower.get_json()["error_code"] == "timeout"
        gate.set()
        assert owner.result().status_code == 200
    assert send_json(client, MAIL, key=key).get_json()["message_id"] == key
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("reply, status, code", [
    ("554 5.7.1 rejected", 500, "send_failed"),
    ("451 4.3.0 try again later", 503, "provider_down"),
])
def test_failed_send_is_not_remembered_and_a_retry_sends(service, smtp_server, reply, status, code):
    client = service()
    key = unique_key()
    smtp_server.handler.data_reply = reply
    resp = send_json(client, MAIL, key=key)
    assert resp.status_code == status and resp.get_json()["error_code"] == code
    smtp_server.handler.data_reply = None
    assert send_json(client, MAIL, key=key).status_code == 200
    assert send_json(client, MAIL, key=key).status_code == 200  # and now that success is replayed
    assert len(smtp_server.messages) == 1


def test_a_full_store_evicts_its_oldest_successes_and_keeps_sending(service, smtp_server):
    client = service(IDEMPOTENCY_MAX_ENTRIES="10")
    keys = [unique_key() for _ in range(40)]
    assert [send_json(client, MAIL, key=k).status_code for k in keys] == [200] * 40
    for k in keys[-5:]:  # the newest are remembered: replayed without a send
        assert send_json(client, MAIL, key=k).get_json()["message_id"] == k
    assert len(smtp_server.messages) == 40
    assert send_json(client, MAIL, key=keys[0]).status_code == 200  # the oldest was evicted: sent again
    assert len(smtp_server.messages) == 41
    metrics = client.get("/metrics").get_data(as_text=True)
    assert re.search(r"^herald_smtp_idempotency_evictions_total (\d+)", metrics, re.M).group(1) not in ("0", None)


def test_a_store_full_of_sends_in_flight_answers_429_until_one_settles(service, smtp_server):
    client = service(IDEMPOTENCY_MAX_ENTRIES="2")
    gate = held(smtp_server)
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(send_json, client.application.test_client(), MAIL, key=unique_key())
                     for _ in range(2)]
        wait_for(lambda: len(smtp_server.handler.data_peers) == 2)
        key = unique_key()
        full = send_json(client, MAIL, key=key)
        assert (full.status_code, full.get_json()["ok"], full.get_json()["error_code"]) == (429, False, "rate_limited")
        assert key not in full.get_json()["error_message"]
        gate.set()
        assert [f.result().status_code for f in in_flight] == [200, 200]
    assert send_json(client, MAIL, key=unique_key()).status_code == 200  # settled records make room
    assert len(smtp_server.messages) == 3


def test_a_success_the_store_cannot_record_answers_200_and_its_key_waits_out_the_lease(make_app, smtp_server,
                                                                                      tmp_path, logs, monkeypatch):
    from herald_smtp.store.sqlite import SQLiteStore

    monkeypatch.setattr(SQLiteStore, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "idem.sqlite3"
    client = make_app(smtp_server.env(IDEMPOTENCY_STORE=f"sqlite:///{path}")).test_client()
    gate = held(smtp_server)
    key = unique_key()
    with ThreadPoolExecutor(1) as pool:
        owner = pool.submit(send_json, client.application.test_client(), MAIL, key=key)
        wait_for(lambda: smtp_server.handler.data_peers)
        other = sqlite3.connect(path, isolation_level=None)  # another process writing, for too long
        other.execute("BEGIN EXCLUSIVE")
        gate.set()
        assert owner.result().status_code == 200  # the mail went out: that is the answer
        other.execute("COMMIT")
        other.close()
    [error] = [json.loads(line) for line in logs.getvalue().splitlines() if "not saved" in line]
    assert (error["level"], error["idempotency_key"]) == ("error", key)
    retry = send_json(client, {**MAIL, "timeout_seconds": 1}, key=key)
    assert retry.get_json()["error_code"] == "timeout"  # the reservation stands until its lease ends
    assert len(smtp_server.messages) == 1


def test_two_replicas_sharing_a_store_send_once(make_app, smtp_server, shared_url):
    env = smtp_server.env(IDEMPOTENCY_STORE=shared_url)
    a, b = make_app(env).test_client(), make_app(env).test_client()
    key = unique_key()
    assert send_json(a, MAIL, key=key).status_code == 200
    assert send_json(b, MAIL, key=key).get_json()["message_id"] == key
    assert send_json(b, {**MAIL, "to": "mallory@example.com"}, key=key).status_code == 409
    assert len(smtp_server.messages) == 1


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which it may stop (the machine's Redis is shared)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client))
    yield proc, client, f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait()


def _pings(client):
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


@pytest.fixture(params=["never-reached", "stopped-after-use"])
def redis_down(request, make_app, smtp_server):
    """Factory: a client whose Redis store does not answer: on a port nothing listens on, or the
    test's own Redis, used for one keyed send and then stopped."""
    def make(**env):
        if request.param == "never-reached":
            return make_app(smtp_server.env(IDEMPOTENCY_STORE=f"redis://127.0.0.1:{free_port()}/0", **env)).test_client()
        proc, _, url = request.getfixturevalue("own_redis")
        client = make_app(smtp_server.env(IDEMPOTENCY_STORE=url, **env)).test_client()
        assert send_json(client, MAIL, key=unique_key()).status_code == 200
        proc.terminate()
        proc.wait()
        return client
    return make


def test_unreachable_redis_is_503_and_nothing_is_sent(redis_down, smtp_server):
    client = redis_down()
    before = len(smtp_server.messages)
    resp = send_json(client, MAIL, key=unique_key())
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["error_code"] == "provider_down"
    assert "idempotency store" in body["error_message"] and "127.0.0.1" not in body["error_message"]
    assert len(smtp_server.messages) == before
    assert send_json(client, MAIL).status_code == 200  # without a key no store is needed


def test_unreachable_redis_with_fail_open_sends_unprotected(redis_down, smtp_server, logs):
    client = redis_down(IDEMPOTENCY_FAIL_OPEN="true")
    before = len(smtp_server.messages)
    key = unique_key()
    assert send_json(client, MAIL, key=key).get_json()["message_id"] == key
    assert len(smtp_server.messages) == before + 1
    assert "sending unprotected" in logs.getvalue()


def test_store_lost_while_following_is_503_even_with_fail_open(make_app, smtp_server, own_redis):
    proc, client, url = own_redis
    app = make_app(smtp_server.env(IDEMPOTENCY_STORE=url, IDEMPOTENCY_FAIL_OPEN="true", SMTP_TIMEOUT_SECONDS="5"))
    gate = held(smtp_server)
    key = unique_key()
    with ThreadPoolExecutor(2) as pool:
        owner = pool.submit(send_json, app.test_client(), MAIL, key=key)
        wait_for(lambda: smtp_server.handler.data_peers)
        follower = pool.submit(send_json, app.test_client(), MAIL, key=key)
        wait_for(lambda: client.info("commandstats").get("cmdstat_hgetall"))  # it is polling the owner's record
        proc.terminate()
        proc.wait()
        resp = follower.result()
        assert resp.status_code == 503 and resp.get_json()["error_code"] == "provider_down"
        gate.set()
        assert owner.result().status_code == 200
    assert len(smtp_server.handler.data_peers) == 1  # the follower did not send a second email


def test_memory_store_refuses_more_than_one_worker():
    with pytest.raises(ConfigError, match="IDEMPOTENCY_STORE.*one process"):
        load_config({"IDEMPOTENCY_STORE": "memory://", "WEB_CONCURRENCY": "2"})
    assert load_config({"IDEMPOTENCY_STORE": "memory://", "WEB_CONCURRENCY": "1"})


# -- the store interface: leases, expiry, capacity -------------------------------------


def test_reserve_wait_conflict_complete_replay(stores, store_url):
    store = stores(store_url)
    outcome, _, token = store.begin("k", "fp-a", lease=30)
    assert outcome == NEW
    assert store.begin("k", "fp-a", lease=30)[:2] == (WAIT, store.get("k"))
    assert store.begin("k", "fp-b", lease=30)[0] == CONFLICT
    store.complete("k", token, "k", ttl=30)
    outcome, rec, _ = store.begin("k", "fp-a", lease=30)
    assert (outcome, rec.state, rec.message_id) == (REPLAY, DONE, "k")
    assert store.begin("k", "fp-b", lease=30)[0] == CONFLICT


def test_failure_releases_the_key(stores, store_url):
    store = stores(store_url)
    _, _, token = store.begin("k", "fp-a", lease=30)
    store.fail("k", token, "provider_down", "SMTP server deferred the message (temporary 451)")
    assert store.get("k").error_code == "provider_down"  # followers already waiting see the error
    assert store.begin("k", "fp-b", lease=30)[0] == NEW  # a failure is not remembered


def test_only_one_of_many_simultaneous_reservations_wins(stores, store_url):
    # One store handle per thread, as gunicorn workers each have their own (memory: one process).
    handles = [stores(store_url) if not store_url.startswith("memory") else None for _ in range(12)]
    shared = stores(store_url) if store_url.startswith("memory") else None
    barrier = threading.Barrier(len(handles))

    def reserve(store):
        barrier.wait()
        return (store or shared).begin("k", "fp", lease=30)[0]

    with ThreadPoolExecutor(len(handles)) as pool:
        outcomes = list(pool.map(reserve, handles))
    assert sorted(outcomes) == [NEW] + [WAIT] * 11


def test_a_dead_owners_lease_expires_and_cannot_settle_later(stores, store_url):
    store = stores(store_url)
    _, _, dead = store.begin("k", "fp", lease=SHORT)  # its owner never completes
    assert store.begin("k", "fp", lease=SHORT)[0] == WAIT
    time.sleep(SHORT + 0.1)
    outcome, _, token = store.begin("k", "fp", lease=30)
    assert outcome == NEW and token != dead
    store.complete("k", dead, "late", ttl=30)  # the first owner was only slow: it must not win
    rec = store.get("k")
    assert (rec.state, rec.token) == (PENDING, token)


def test_a_full_store_evicts_settled_records_oldest_first_never_a_reservation(stores, store_url):
    evicted = []
    store = stores(store_url, max_entries=4, on_evict=evicted.append)
    tokens = {k: store.begin(k, "fp", lease=30)[2] for k in "abcd"}
    for k in "abc":
        store.complete(k, tokens[k], k, ttl=30)
        time.sleep(0.002)  # Redis orders them by the millisecond
    assert store.begin("e", "fp", lease=30)[0] == NEW  # full: the oldest success makes room
    assert store.get("a") is None
    assert [store.begin(k, "fp", lease=30)[0] for k in "bcde"] == [REPLAY, REPLAY, WAIT, WAIT]
    assert [store.begin(k, "fp", lease=30)[0] for k in "fg"] == [NEW, NEW]  # b and c go
    assert store.begin("h", "fp", lease=30)[0] == FULL  # d, e, f, g in flight fill it: nothing to evict
    assert [store.begin(k, "fp", lease=30)[0] for k in "defg"] == [WAIT] * 4
    assert sum(evicted) == 3
    store.fail("d", tokens["d"], "provider_down", "down")
    assert store.begin("h", "fp", lease=30)[0] == NEW  # a settled record again: room


def test_expired_entries_free_capacity(stores, store_url):
    store = stores(store_url, max_entries=2)
    for key in ("a", "b"):
        _, _, token = store.begin(key, "fp", lease=SHORT)  # their owners die
    assert store.begin("c", "fp", lease=30)[0] == FULL
    time.sleep(SHORT + 0.1)
    assert store.begin("c", "fp", lease=30)[0] == NEW
    assert store.begin("a", "fp", lease=30)[0] == NEW


def test_the_age_of_the_oldest_remembered_success(stores, store_url):
    store = stores(store_url)
    assert store.oldest_success_age(ttl=300) == 0.0
    for k in ("first", "second"):
        _, _, token = store.begin(k, "fp", lease=30)
        store.complete(k, token, k, ttl=300)
        time.sleep(0.3)
    assert 0.5 <= store.oldest_success_age(ttl=300) < 2


def test_stores_of_two_sending_identities_never_see_each_others_keys(stores, shared_url):
    brand_a, brand_b = stores(shared_url, scope="brand_a"), stores(shared_url, scope="brand_b")
    _, _, token = brand_a.begin("k", "fp", lease=30)
    brand_a.complete("k", token, "k", ttl=30)
    assert brand_b.begin("k", "fp", lease=30)[0] == NEW
    assert brand_a.begin("k", "fp", lease=30)[0] == REPLAY
    assert stores(shared_url, scope="brand_a").begin("k", "fp", lease=30)[0] == REPLAY  # a restart keeps them


def test_sqlite_purges_expired_rows_without_a_separate_job(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    store = stores(f"sqlite:///{path}", max_entries=1000)
    for i in range(50):
        _, _, token = store.begin(f"old-{i}", "fp", lease=30)
        store.complete(f"old-{i}", token, "m", ttl=0.1)
    time.sleep(1.1)  # expired, and the purge (at most once a second) is due
    store.begin("new", "fp", lease=30)
    with sqlite3.connect(path) as db:
        assert db.execute(f"SELECT key FROM {store.table}").fetchall() == [("new",)]


def test_sqlite_capacity_counts_rows_and_evicts_in_batches(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    evicted = []
    store = stores(f"sqlite:///{path}", max_entries=100, on_evict=evicted.append)
    other = stores(f"sqlite:///{path}", max_entries=100)  # another worker of the same host
    for i in range(250):
        s = (store, other)[i % 2]
        _, _, token = s.begin(f"k{i}", "fp", lease=30)
        s.complete(f"k{i}", token, "m", ttl=30)
    with sqlite3.connect(path) as db:
        keys = [k for (k,) in db.execute(f"SELECT key FROM {store.table} ORDER BY rowid")]
    db.close()
    assert 90 <= len(keys) <= 100 and keys == [f"k{i}" for i in range(250 - len(keys), 250)]
    assert len(evicted) < 20  # a tenth of the capacity at a time, not one key at a time


def test_sqlite_capacity_holds_when_rowids_come_round_again(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    store = stores(f"sqlite:///{path}", max_entries=3)
    other = sqlite3.connect(path, isolation_level=None)  # another worker of the same host
    for k in ("a", "b", "c"):
        store.begin(k, "fp", lease=30)  # rowids 1, 2, 3
    assert store.begin("d", "fp", lease=30)[0] == FULL  # counted: three in flight
    # The other worker's rows replace every one of them, numbered from 1 again...
    other.execute(f"DELETE FROM {store.table}")
    for k in ("x", "y", "z"):
        other.execute(f"INSERT INTO {store.table} (key, fingerprint, state, token, expires_at)"
                      " VALUES (?, 'fp', 'pending', 't', ?)", (k, time.monotonic() + 30))
    # ...so rowid 4 again, one above the count this store made, yet the store is full.
    assert store.begin("e", "fp", lease=30)[0] == FULL
    other.close()


def test_sqlite_leases_and_records_ignore_a_wall_clock_step(stores, tmp_path, monkeypatch):
    store = stores(f"sqlite:///{tmp_path}/idem.sqlite3")
    _, _, token = store.begin("sent", "fp", lease=30)
    store.complete("sent", token, "sent", ttl=30)
    store.begin("in-flight", "fp", lease=30)
    stepped = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: stepped)  # NTP steps the clock an hour forward
    assert store.begin("in-flight", "fp", lease=30)[0] == WAIT  # its owner still has it
    assert store.begin("sent", "fp", lease=30)[0] == REPLAY


def _seconds_left(path, table, key):
    with sqlite3.connect(path) as db:
        (expires,) = db.execute(f"SELECT expires_at FROM {table} WHERE key = ?", (key,)).fetchone()
    db.close()
    return expires - time.monotonic()


def test_sqlite_store_after_a_reboot_forgets_reservations_and_keeps_successes(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    store = stores(f"sqlite:///{path}")
    _, _, token = store.begin("sent", "fp", lease=30)
    store.complete("sent", token, "sent", ttl=600)
    store.begin("in-flight", "fp", lease=600)
    store.close()
    with sqlite3.connect(path) as db:  # as if written before a reboot, when the uptime was 1000 s longer
        db.execute(f"UPDATE {store.table} SET expires_at = expires_at + 1000")
        db.execute("UPDATE herald_smtp_clock SET boot = 'an-earlier-boot', wall_offset = wall_offset - 1000")
    db.close()
    store = stores(f"sqlite:///{path}")
    assert store.begin("in-flight", "fp", lease=30)[0] == NEW  # its owner did not survive the reboot
    outcome, rec, _ = store.begin("sent", "fp", lease=30)
    assert (outcome, rec.message_id) == (REPLAY, "sent")
    assert 590 < _seconds_left(path, store.table, "sent") <= 600  # what it had left before the reboot


def test_sqlite_waits_out_another_writer_then_gives_up_as_unavailable(stores, tmp_path):
    from herald_smtp.store.base import StoreUnavailable

    path = tmp_path / "idem.sqlite3"
    store = stores(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # another worker, writing
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, other.execute, ("COMMIT",)).start()
    started = time.monotonic()
    assert store.begin("a", "fp", lease=30)[0] == NEW
    assert time.monotonic() - started >= 0.25
    other.execute("BEGIN IMMEDIATE")
    store.BUSY_TIMEOUT = 0.2
    with pytest.raises(StoreUnavailable, match="locked"):
        store.begin("b", "fp", lease=30)
    other.execute("COMMIT")
    other.close()


@pytest.mark.parametrize("layout", [
    "CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, state TEXT NOT NULL, token TEXT"
    " NOT NULL, message_id TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '', error_message TEXT"
    " NOT NULL DEFAULT '', expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE idempotency_keys (key TEXT NOT NULL UNIQUE, fingerprint TEXT NOT NULL, state TEXT NOT NULL,"
    " token TEXT NOT NULL, message_id TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '',"
    " error_message TEXT NOT NULL DEFAULT '', expires_at REAL NOT NULL)",
], ids=["first", "second"])
def test_sqlite_store_takes_over_an_earlier_layout_with_its_live_keys(stores, tmp_path, layout):
    path = tmp_path / "idem.sqlite3"
    table = layout.split()[2]
    with sqlite3.connect(path) as db:  # as an earlier release left it, times on the wall clock
        db.execute(layout)
        db.execute("CREATE TABLE idempotency_size (n INTEGER NOT NULL)")
        db.execute(f"INSERT INTO {table} VALUES ('sent', 'fp', 'done', 't1', 'sent', '', '', ?),"
                   " ('gone', 'fp', 'done', 't2', 'gone', '', '', ?)", (time.time() + 60, time.time() - 1))
    db.close()
    store = stores(f"sqlite:///{path}", scope="brand")
    outcome, rec, _ = store.begin("sent", "fp", lease=30)
    assert (outcome, rec.message_id) == (REPLAY, "sent")
    assert 50 < _seconds_left(path, store.table, "sent") <= 60
    assert store.begin("gone", "fp", lease=30)[0] == NEW
    with sqlite3.connect(path) as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"idempotency_brand", "herald_smtp_clock", "herald_smtp_host"}


def test_redis_forgets_expired_entries(stores, redis_url):
    store = stores(redis_url, max_entries=1000)
    for i in range(50):
        _, _, token = store.begin(f"old-{i}", "fp", lease=30)
        store.complete(f"old-{i}", token, "m", ttl=0.1)
    time.sleep(0.2)
    store.begin("new", "fp", lease=30)
    client = redis.Redis.from_url(redis_url)
    assert (client.zcard(store.pending), client.zcard(store.done)) == (1, 0)
    wait_for(lambda: client.dbsize() == 2)  # the new key's record and its index, once Redis expires the rest
    client.close()


def test_redis_reservation_resent_after_its_reply_was_lost_is_still_its_own(stores, redis_url):
    """redis-py sends a command again when the connection drops before its reply: the reservation
    script then finds its own record, which must not make the request wait for itself."""
    store = stores(redis_url)
    call = {"keys": [store._name("k"), store.pending, store.done], "args": ["fp", "token-1", 30_000, 100]}
    assert store._begin(**call)[0] == NEW
    assert store._begin(**call)[0] == NEW  # the same call, resent
    assert store.begin("k", "fp", lease=30)[0] == WAIT  # any other request waits for it


def test_sqlite_store_is_shared_by_separately_opened_handles(stores, tmp_path):
    url = f"sqlite:///{tmp_path}/sub/dir/idem.sqlite3"  # the directory is created
    one, two = stores(url), stores(url)
    _, _, token = one.begin("k", "fp", lease=30)
    assert two.begin("k", "fp", lease=30)[0] == WAIT
    one.complete("k", token, "k", ttl=30)
    assert two.begin("k", "fp", lease=30)[0] == REPLAY
    with sqlite3.connect(tmp_path / "sub/dir/idem.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def _open_and_reserve(url, barrier, results):
    barrier.wait()
    try:
        results.put(open_store(url, 100).begin(f"k-{multiprocessing.current_process().pid}", "fp", 30)[0])
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_workers_opening_a_new_sqlite_file_together_all_start(tmp_path):
    # gunicorn forks its workers at once, and on a first start they all find a new file.
    ctx = multiprocessing.get_context("fork")
    for i in range(20):
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_and_reserve, args=(f"sqlite:///{tmp_path}/new-{i}.sqlite3", barrier, results))
                 for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join()
        assert outcomes == [NEW] * 4


def test_default_store_lives_in_a_private_directory_of_the_users_own(tmp_path):
    import tempfile

    from herald_smtp.config import default_idempotency_store
    from herald_smtp.store.sqlite import SQLiteStore

    shared = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    assert default_idempotency_store({}) == \
        f"sqlite:///{shared.lstrip('/')}/herald-smtp-{os.geteuid()}/herald-smtp-idempotency.sqlite3"
    assert default_idempotency_store({"RUNTIME_DIRECTORY": "/run/herald-smtp"}) == \
        "sqlite:///run/herald-smtp/herald-smtp-idempotency.sqlite3"
    # In a directory anyone can write, as /dev/shm and /tmp are, ours is made private...
    anyones = tmp_path / "shm"
    anyones.mkdir()
    anyones.chmod(0o1777)
    path = str(anyones / f"herald-smtp-{os.geteuid()}" / "herald-smtp-idempotency.sqlite3")
    SQLiteStore(path, 10).close()
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    # ...one others can write (as another user planting it would leave it) is refused, and one
    # of ours that others may only read is an operator's choice.
    os.chmod(os.path.dirname(path), 0o777)
    with pytest.raises(ConfigError, match="IDEMPOTENCY_STORE"):
        SQLiteStore(path, 10)
    os.chmod(os.path.dirname(path), 0o755)
    SQLiteStore(path, 10).close()
