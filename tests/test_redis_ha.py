"""Redis behind Sentinel, and as a Cluster, started by the tests on loopback: two service
replicas (gunicorn processes) share the idempotency keys through them."""

import collections
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from redis.crc import key_slot

from conftest import free_port, json_lines, unique_key, wait_for
from herald_smtp.config import load_config
from redis_servers import MASTER_NAME, RedisProcesses, master_port, sentinels_ready
from test_idempotency_e2e import MAIL, held_server, in_flight  # noqa: F401 (held_server: a fixture)


@pytest.fixture
def redis_procs(tmp_path):
    procs = RedisProcesses(tmp_path)
    yield procs
    procs.stop()


class Load:
    """Client threads sending one new key after another to the two replicas in turn; a 503 or
    504 is retried with the same key (as Herald's caller would) until it is answered 200."""

    def __init__(self, replicas, threads=3):
        self.replicas = replicas
        self.answers = []  # (started, ended, n, key, status, error_code)
        self.done = {}  # n -> key, for every n answered 200
        self.ended = {}  # key -> when it was answered 200
        self._next = iter(range(10**6))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            with self._lock:
                n = next(self._next)
            key, attempt = f"fo-{n}-{unique_key()}", 0
            while True:
                started = time.monotonic()
                status, body = self.replicas[(n + attempt) % 2].post(mail(n), key)
                self.answers.append((started, time.monotonic(), n, key, status, body.get("error_code")))
                if status == 200:
                    self.done[n] = key
                    self.ended[key] = time.monotonic()
                    break
                assert status in (503, 504), body
                attempt += 1
                time.sleep(0.05)
            time.sleep(0.05)  # a steady stream, not a flood

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def keys(self, when):
        """Keys answered 200 by a request that started at s and ended at e where when(s, e)."""
        return {key for s, e, _, key, status, _ in list(self.answers) if status == 200 and when(s, e)}

    def recovered(self, after):
        """Past `after`, and every request started in the last second answered 200 at once."""
        now = time.monotonic()
        recent = {status for s, _, _, _, status, _ in list(self.answers) if s > now - 1.0}
        return now > after and recent == {200}

    def window(self, since):
        """(seconds from the first failed answer's start to the last one's end, their count)."""
        failed = [(s, e) for s, e, _, _, status, _ in self.answers if status != 200 and e >= since]
        return (max(e for _, e in failed) - min(s for s, _ in failed), len(failed)) if failed else (0.0, 0)


def mail(n):
    return {"to": f"user{n}@example.com", "subject": "Your code", "body": f"Your code is {n:06d}"}


def number(key):
    return int(key.split("-")[1])


def replicated(port):
    """Once this returns, every write the master acknowledged so far is on its replica too."""
    master = redis.Redis(port=port)
    master.set("test:replicated", time.time())
    assert master.wait(1, 5000) == 1


def test_sentinel_failover_forgets_no_answered_key_and_never_sends_twice(redis_procs, gunicorn, smtp_server):
    """A master and its replica, three sentinels, two service replicas under load with retries;
    IDEMPOTENCY_WAIT_REPLICAS at its default, 1. A killed master is replaced by a new replica of
    the new one once the sentinels have named it."""
    first = redis_procs.server()
    redis_procs.replica(first)
    sentinels = [redis_procs.sentinel(first) for _ in range(3)]
    sentinels_ready(sentinels[:1], quorum=False)  # enough for SENTINEL FAILOVER, the first event
    url = f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in sentinels)}/{MASTER_NAME}"
    # The default deadline is 30 s; 10 is enough for a completion cut off by the crash to reach
    # the new master and its replica.
    env = smtp_server.env(IDEMPOTENCY_STORE=url, SMTP_TIMEOUT_SECONDS="10")
    a, b = gunicorn(env, workers=2, threads=4), gunicorn(env, workers=2, threads=4)
    load = Load([a, b])
    safe, turbulent, figures = set(), {}, []
    settled = 0.0  # when the previous failover was over
    try:
        for trigger in ("SENTINEL FAILOVER", "kill -9"):
            # The other node is a replica again (the demoted master rejoins): a failover can start.
            sentinels_ready(sentinels, quorum=trigger == "kill -9")
            old = master_port(sentinels[0])
            time.sleep(2.0)  # keys settled before the failover, to replay after it
            started = time.monotonic()
            safe |= load.keys(lambda s, e: s > settled and e < started)
            if trigger == "kill -9":
                redis_procs.kill(old)
            else:
                redis.Redis(port=sentinels[0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
            wait_for(lambda: master_port(sentinels[0]) != old, timeout=20)
            switched = time.monotonic() - started
            if trigger == "kill -9":
                # A new replica takes the dead node's place. Not the dead node restarted: without
                # persistence it comes back empty, and if the sentinels make it master again (seen
                # here once), the others resync from it and everything is gone.
                redis_procs.replica(master_port(sentinels[0]))
            # Recovered by itself once the new master has a replica: a second of sends all answered
            # 200 at the first try.
            wait_for(lambda: load.recovered(started + switched + 1.0), timeout=40)
            settled = time.monotonic()
            turbulent[trigger] = (started, switched, load.keys(lambda s, e: e >= started and s <= settled))
            window, failures = load.window(started)
            slowest = max(e - s for s, e, *_ in load.answers if e >= started)
            figures.append(f"{trigger}: new master after {switched:.1f} s; {failures} answers 503/504 over "
                           f"{window:.1f} s; slowest answer {slowest:.1f} s")
            assert window < 30, figures
    finally:
        load.stop()

    codes = collections.Counter((status, code) for *_, status, code in load.answers if status != 200)
    assert set(codes) <= {(503, "provider_down"), (504, "timeout")}, codes
    assert codes[503, "provider_down"] > 0  # the failovers were felt
    # Every key answered 200 went out exactly once; no failed answer sent anything.
    delivered = collections.Counter(m.rcpt_tos[0] for m in smtp_server.messages)
    assert delivered == collections.Counter(f"user{n}@example.com" for n in load.done)

    # Keys settled before a failover replay on either replica after both, without a send.
    sent = len(smtp_server.messages)
    with ThreadPoolExecutor(8) as pool:
        replays = list(pool.map(lambda k: (a, b)[number(k) % 2].post(mail(number(k)), k), sorted(safe)))
    assert replays == [(200, {"ok": True, "message_id": k, "provider": "smtp"}) for k in sorted(safe)]
    assert len(safe) > 20 and len(smtp_server.messages) == sent

    # Keys answered 200 while the master changed: each is on a replica that survived, so a retry
    # replays it, or (its completion not confirmed in time: an error line and a count) waits out
    # its reservation (504); none is sent again.
    unsaved = sum(g.metrics()["herald_smtp_idempotency_total{result=unsaved}"] for g in (a, b))
    for trigger, (started, switched, keys) in turbulent.items():
        before = collections.Counter(m.rcpt_tos[0] for m in smtp_server.messages)
        with ThreadPoolExecutor(8) as pool:
            retries = dict(zip(keys, pool.map(lambda k: a.post(mail(number(k)), k)[0], keys)))
        again = collections.Counter(m.rcpt_tos[0] for m in smtp_server.messages) - before
        figures.append(f"{trigger}: {len(keys)} keys answered 200 during the switch, {sum(again.values())} sent "
                       f"again by a retry, {list(retries.values()).count(504)} still reserved (504)")
        assert not again, figures
        assert set(retries.values()) <= {200, 504}, figures
    figures.append(f"{unsaved} completions not confirmed by a replica (answered 200, logged)")
    print("\nfailover: " + "; ".join(figures))


def test_cluster_two_replicas_share_keys(redis_procs, gunicorn, held_server):
    nodes = [free_port() for _ in range(3)]
    # Seeded with the two nodes that will not hold the store's slot (redis-cli gives the three
    # nodes slots 0-5460, 5461-10922 and 10923-16383): the client must follow the map to the third.
    tag = "herald-smtp:" + load_config(held_server.env()).sender_scope  # the store's {hash tag}
    slot = key_slot(tag.encode())
    owner = nodes[(slot > 5460) + (slot > 10922)]
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in nodes if p != owner)
    env = held_server.env(IDEMPOTENCY_STORE=url)
    # A replica starts while the Cluster is down, answers 503, and recovers once it is up.
    a = gunicorn(env, workers=2, threads=12)
    held_server.handler.data_gate.set()
    assert a.post(MAIL, unique_key())[1]["error_code"] == "provider_down"
    redis_procs.cluster(nodes, replicas=True)  # IDEMPOTENCY_WAIT_REPLICAS is 1 by default: one each
    held_server.handler.data_gate.clear()
    b = gunicorn(env, workers=2, threads=12)
    assert redis.Redis(port=nodes[0]).cluster("keyslot", "{" + tag + "}") == slot and slot in _slots(owner)

    key = unique_key()
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit((a, b)[i % 2].post, MAIL, key) for i in range(20)]
        try:
            in_flight([a, b], held_server, 20)
            status, body = b.post({**MAIL, "body": "Your code is 000000"}, key)
            assert (status, body["error_code"]) == (409, "idempotency_conflict")
        finally:
            held_server.handler.data_gate.set()
        answers = [f.result() for f in futures]
    assert answers == [(200, {"ok": True, "message_id": key, "provider": "smtp"})] * 20
    assert len(held_server.messages) == 1
    for replica in (a, b):  # replayed by both later, and the conflict refused by both
        assert replica.post(MAIL, key)[1]["message_id"] == key
        assert replica.post({**MAIL, "to": "eve@example.com"}, key)[0] == 409
    assert len(held_server.messages) == 1
    # The records are on the node that owns the slot, and only there.
    assert [redis.Redis(port=p).dbsize() > 0 for p in nodes] == [p == owner for p in nodes]


def _slots(port):
    slots = set()
    for start, end, (host, node_port, *_), *_ in redis.Redis(port=port).execute_command("CLUSTER", "SLOTS"):
        if node_port == port:
            slots.update(range(start, end + 1))
    return slots


def test_a_key_is_answered_only_once_a_replica_has_it(redis_procs, gunicorn, held_server):
    """IDEMPOTENCY_WAIT_REPLICAS on a redis:// server with a replica: the reservation and the
    completion are on the replica before the answer; a replica that does not confirm stops the
    send (503, released), or after the send is an error line and a count (still 200)."""
    master = redis_procs.server()
    replica = redis_procs.replica(master)
    env = held_server.env(IDEMPOTENCY_STORE=f"redis://127.0.0.1:{master}/0", IDEMPOTENCY_WAIT_REPLICAS="1",
                          SMTP_TIMEOUT_SECONDS="5")
    g = gunicorn(env, workers=1, threads=4)
    on_replica = redis.Redis(port=replica, decode_responses=True)

    def records():
        names = [k for k in on_replica.keys("*:idem:*") if len(k.rpartition(":")[2]) == 64]  # not the sets
        return {k: on_replica.hgetall(k) for k in names}

    held_server.handler.data_gate.set()
    key = unique_key()
    assert g.post(MAIL, key)[0] == 200
    assert [r["state"] for r in records().values()] == ["done"]  # there the moment the answer came

    # The replica stops answering (SIGSTOP): no reservation is confirmed, so nothing is sent.
    stopped = redis_procs.procs[replica]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = g.post({**MAIL, "to": "erin@example.com"}, "no-replica")
        assert (status, body["error_code"]) == (503, "provider_down"), body
        assert time.monotonic() - started < 3  # waited at most WAIT_MAX (1 s), not the deadline
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    assert len(held_server.messages) == 1
    # Released: the retry, once the replica is back, sends (once).
    wait_for(lambda: g.post({**MAIL, "to": "erin@example.com"}, "no-replica")[0] == 200, timeout=10)
    assert [m.rcpt_tos for m in held_server.messages[1:]] == [["erin@example.com"]]

    # The replica stops while the mail is at the SMTP server: the mail went out, so 200, but the
    # completion is unconfirmed: an error line, and herald_smtp_idempotency_total{result="unsaved"}.
    held_server.handler.data_gate.clear()
    before = len(held_server.handler.data_peers)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(g.post, {**MAIL, "to": "finn@example.com"}, "replica-lost-mid-send")
        wait_for(lambda: len(held_server.handler.data_peers) > before)
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            held_server.handler.data_gate.set()
            assert answer.result()[0] == 200
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
    assert g.metrics()["herald_smtp_idempotency_total{result=unsaved}"] == 1
    unsaved = [line for line in json_lines(g.log_path.read_text()) if line.get("idempotency_key") == "replica-lost-mid-send"]
    assert [(line["level"], line["event"].split(":")[0]) for line in unsaved if line["level"] == "error"] == \
        [("error", "idempotency record not saved")]


def test_cluster_failover_forgets_no_answered_key_and_never_sends_twice(redis_procs, gunicorn, smtp_server):
    """Three masters with a replica each; two service replicas under load with retries. The
    store's slot moves to its replica by CLUSTER FAILOVER (planned), then its master is killed
    and restarted (it rejoins as a replica)."""
    nodes = [free_port() for _ in range(3)]
    pairs = redis_procs.cluster(nodes, replicas=True)
    env = smtp_server.env(IDEMPOTENCY_STORE="redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in nodes),
                          SMTP_TIMEOUT_SECONDS="10")
    tag = "{herald-smtp:" + load_config(env).sender_scope + "}"
    a, b = gunicorn(env, workers=2, threads=4), gunicorn(env, workers=2, threads=4)

    def owner():
        slot = key_slot(tag.encode())
        for start, end, (_, port, *_), *_ in redis.Redis(port=nodes[0]).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return port
        return None

    load = Load([a, b])
    safe, turbulent, figures = set(), {}, []
    settled = 0.0
    try:
        for trigger in ("CLUSTER FAILOVER", "kill -9"):
            old = owner()
            replica = pairs[old] if old in pairs else next(m for m, r in pairs.items() if r == old)
            time.sleep(2.0)
            started = time.monotonic()
            safe |= load.keys(lambda s, e: s > settled and e < started)
            if trigger == "kill -9":
                redis_procs.kill(old)
            else:
                redis.Redis(port=replica).execute_command("CLUSTER", "FAILOVER")
            wait_for(lambda: _owner_elsewhere(nodes + list(pairs.values()), tag, old), timeout=30)
            switched = time.monotonic() - started
            if trigger == "kill -9":
                redis_procs.restart(old)  # rejoins as the new master's replica
            wait_for(lambda: load.recovered(started + switched + 1.0), timeout=40)
            settled = time.monotonic()
            turbulent[trigger] = load.keys(lambda s, e: e >= started and s <= settled)
            window, failures = load.window(started)
            figures.append(f"{trigger}: new master after {switched:.1f} s; {failures} answers 503/504 over {window:.1f} s")
            pairs = {m: r for m, r in pairs.items() if m != old and r != old}
            pairs[replica] = old  # the promoted replica is master now, the old master its replica
    finally:
        load.stop()

    codes = collections.Counter((status, code) for *_, status, code in load.answers if status != 200)
    assert set(codes) <= {(503, "provider_down"), (504, "timeout")}, codes
    delivered = collections.Counter(m.rcpt_tos[0] for m in smtp_server.messages)
    assert delivered == collections.Counter(f"user{n}@example.com" for n in load.done)
    sent = len(smtp_server.messages)
    keys = sorted(safe | set().union(*turbulent.values()))
    with ThreadPoolExecutor(8) as pool:
        retries = list(pool.map(lambda k: (a, b)[number(k) % 2].post(mail(number(k)), k), keys))
    assert len(smtp_server.messages) == sent, figures  # no key answered 200 was sent again
    assert {status for status, _ in retries} <= {200, 504}
    figures.append(f"{len(keys)} keys answered 200 retried: {len(smtp_server.messages) - sent} sent again, "
                   f"{[s for s, _ in retries].count(504)} still reserved (504)")
    print("\ncluster failover: " + "; ".join(figures))


def _owner_elsewhere(ports, tag, old):
    """Some live node's slot map gives the tag's slot to a master other than `old`."""
    slot = key_slot(tag.encode())
    for port in ports:
        if port == old:
            continue
        try:
            for start, end, (_, master, *_), *_ in redis.Redis(port=port, socket_timeout=1).execute_command(
                    "CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return master != old
        except redis.RedisError:
            continue
    return False
