"""Idempotency, each backend against the real thing: a SQLite file in a temp dir, the machine's
Redis (database HERALD_TEST_REDIS_DB, flushed) and memory. Through the Flask app and aiosmtpd
where a user would see it; at the store's own interface where only it can set a case up (a dead
owner's lease)."""

import multiprocessing
import os
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from conftest import free_port, send_json, unique_key, wait_for
from herald_smtp.config import ConfigError, load_config
from herald_smtp.idempotency import CONFLICT, DONE, FULL, NEW, PENDING, REPLAY, WAIT, open_store

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

    def make(url, max_entries=100):
        store = open_store(url, max_entries)
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


def test_a_new_key_beyond_max_entries_is_429_and_known_keys_still_work(service, smtp_server):
    client = service(IDEMPOTENCY_MAX_ENTRIES="2")
    keys = [unique_key() for _ in range(3)]
    assert [send_json(client, MAIL, key=k).status_code for k in keys[:2]] == [200, 200]
    full = send_json(client, MAIL, key=keys[2])
    assert (full.status_code, full.get_json()["ok"], full.get_json()["error_code"]) == (429, False, "rate_limited")
    assert keys[2] not in full.get_json()["error_message"]
    assert send_json(client, MAIL, key=keys[0]).get_json()["message_id"] == keys[0]  # replayed
    assert send_json(client, MAIL, key=keys[1]).status_code == 200
    assert send_json(client, MAIL).status_code == 200  # no key: the store is not involved
    assert len(smtp_server.messages) == 3


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


def test_expired_entries_free_capacity(stores, store_url):
    store = stores(store_url, max_entries=2)
    for key in ("a", "b"):
        _, _, token = store.begin(key, "fp", lease=30)
        store.complete(key, token, key, ttl=SHORT)
    assert store.begin("c", "fp", lease=30)[0] == FULL
    assert store.begin("a", "fp", lease=30)[0] == REPLAY  # known keys keep working when full
    time.sleep(SHORT + 0.1)
    assert store.begin("c", "fp", lease=30)[0] == NEW
    assert store.begin("a", "fp", lease=30)[0] == NEW  # its success was forgotten after the TTL


def test_sqlite_purges_expired_rows_without_a_separate_job(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    store = stores(f"sqlite:///{path}", max_entries=1000)
    for i in range(50):
        _, _, token = store.begin(f"old-{i}", "fp", lease=30)
        store.complete(f"old-{i}", token, "m", ttl=0.1)
    time.sleep(1.1)  # expired, and the purge (at most once a second) is due
    store.begin("new", "fp", lease=30)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT key FROM idempotency_keys").fetchall() == [("new",)]


def test_sqlite_capacity_counts_live_rows_not_the_rowid_span(stores, tmp_path):
    store = stores(f"sqlite:///{tmp_path}/idem.sqlite3", max_entries=3)
    store.PURGE_EVERY = 3600  # only the capacity check sees what has expired
    tokens = {k: store.begin(k, "fp", lease=30)[2] for k in ("a", "b", "c")}
    store.fail("b", tokens["b"], "provider_down", "down")  # rowids 1..3 span 3 rows
    store.complete("a", tokens["a"], "a", ttl=SHORT)
    assert store.begin("d", "fp", lease=30)[0] == FULL  # a, b (failed, kept briefly), c: full
    time.sleep(SHORT + 0.1)  # a's success is forgotten, though its row is still there
    assert store.begin("d", "fp", lease=30)[0] == NEW
    assert store.begin("e", "fp", lease=30)[0] == FULL  # b (failed), c, d
    with sqlite3.connect(tmp_path / "idem.sqlite3") as db:  # a refused key leaves no row behind
        assert "e" not in {k for (k,) in db.execute("SELECT key FROM idempotency_keys")}


def test_sqlite_capacity_holds_when_rowids_come_round_again(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    store = stores(f"sqlite:///{path}", max_entries=3)
    other = sqlite3.connect(path, isolation_level=None)  # another worker of the same host
    for k in ("a", "b", "c"):
        store.begin(k, "fp", lease=30)  # rowids 1, 2, 3
    other.execute("DELETE FROM idempotency_keys WHERE key IN ('a', 'b')")
    time.sleep(1.1)  # this store's next purge sees 3 as the oldest rowid
    assert store.begin("d", "fp", lease=30)[0] == NEW  # rowid 4
    # The other worker's rows replace every one of them, numbered from 1 again...
    other.execute("DELETE FROM idempotency_keys")
    for k in ("x", "y", "z"):
        other.execute("INSERT INTO idempotency_keys (key, fingerprint, state, token, expires_at)"
                      " VALUES (?, 'fp', 'pending', 't', ?)", (k, time.time() + 30))
    # ...so rowid 4 again, 2 above the oldest this store saw, yet the store is full.
    assert store.begin("e", "fp", lease=30)[0] == FULL
    other.close()


def test_sqlite_waits_out_another_writer_then_gives_up_as_unavailable(stores, tmp_path):
    from herald_smtp.idempotency import StoreUnavailable

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


def test_sqlite_store_takes_over_the_earlier_layout_with_its_live_keys(stores, tmp_path):
    path = tmp_path / "idem.sqlite3"
    with sqlite3.connect(path) as db:  # as the first release created it
        db.execute("CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
                   " state TEXT NOT NULL, token TEXT NOT NULL, message_id TEXT NOT NULL DEFAULT '',"
                   " error_code TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',"
                   " expires_at REAL NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE idempotency_size (n INTEGER NOT NULL)")
        db.execute("INSERT INTO idempotency VALUES ('sent', 'fp', 'done', 't1', 'sent', '', '', ?),"
                   " ('gone', 'fp', 'done', 't2', 'gone', '', '', ?)", (time.time() + 60, time.time() - 1))
    db.close()
    store = stores(f"sqlite:///{path}")
    outcome, rec, _ = store.begin("sent", "fp", lease=30)
    assert (outcome, rec.message_id) == (REPLAY, "sent")
    assert store.begin("gone", "fp", lease=30)[0] == NEW
    with sqlite3.connect(path) as db:
        assert {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {"idempotency_keys"}
    db.close()


def test_redis_forgets_expired_entries(stores, redis_url):
    store = stores(redis_url, max_entries=1000)
    for i in range(50):
        _, _, token = store.begin(f"old-{i}", "fp", lease=30)
        store.complete(f"old-{i}", token, "m", ttl=0.1)
    time.sleep(0.2)
    store.begin("new", "fp", lease=30)
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(store.index) == 1
    wait_for(lambda: client.dbsize() == 2)  # the new key's record and the index, once Redis expires the rest
    client.close()


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
    from herald_smtp.idempotency import SQLiteStore

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
