"""Load through gunicorn as a real process: nothing lost, nothing twice, memory flat; then the same
load while the SMTP server restarts twice and a worker is SIGKILLed.

HERALD_LOAD_REQUESTS (default 2000, what CI runs) and HERALD_LOAD_CLIENTS (default 32) size it;
`make load` is the full run (20000 requests at 32 clients) and prints the figures.
"""

import collections
import http.client
import itertools
import json
import os
import re
import signal
import threading
import time
import uuid

import pytest

from conftest import CONTRACT_STATUS

pytestmark = pytest.mark.slow

REQUESTS = int(os.environ.get("HERALD_LOAD_REQUESTS", "2000"))
CLIENTS = int(os.environ.get("HERALD_LOAD_CLIENTS", "32"))
RESET = "reset"  # the connection died without an answer (the worker was killed)
KEY = re.compile(rb"load-[0-9a-f]{32}")
MESSAGE_ID = re.compile(rb"(?m)^Message-ID: (<[^>]+>)\r$")


def run_load(port, count, clients=CLIENTS, progress=None):
    """`count` POSTs from `clients` threads, each on one keep-alive connection; returns [(key, status, code)].

    `progress(done)` is called after every answer (the chaos schedule hangs off it)."""
    results, lock, numbers = [], threading.Lock(), itertools.count()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while next(numbers) < count:
            key = f"load-{uuid.uuid4().hex}"
            body = json.dumps({"to": "user@example.com", "subject": "Your code", "body": f"Your code: {key}"})
            try:
                conn.request("POST", "/v1/send", body=body,
                             headers={"Content-Type": "application/json", "Idempotency-Key": key})
                resp = conn.getresponse()
                status, payload = resp.status, json.loads(resp.read())
                outcome = (key, status, payload.get("error_code") if status != 200 else payload["message_id"])
            except (ConnectionError, http.client.HTTPException):
                conn.close()  # http.client reconnects on the next request
                outcome = (key, RESET, None)
            with lock:
                results.append(outcome)
                done = len(results)
            if progress:
                progress(done)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def delivered(smtp):
    """key -> number of copies the SMTP server accepted, and every Message-ID it saw."""
    copies, ids = collections.Counter(), []
    for m in list(smtp.messages):
        copies[KEY.search(m.original_content).group().decode()] += 1
        ids.append(MESSAGE_ID.search(m.original_content).group(1))
    return copies, ids


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


@pytest.fixture
def service(smtp_server, gunicorn):
    # Herald sends a key with every request: the store must hold them all for the TTL.
    env = smtp_server.env(IDEMPOTENCY_MAX_ENTRIES=str(4 * REQUESTS + 1000))
    service = gunicorn(env, workers=2, threads=8)
    deadline = time.monotonic() + 20
    while len(service.worker_pids()) < 2 and time.monotonic() < deadline:  # healthy as soon as one serves
        time.sleep(0.1)
    return service


def test_steady_load_delivers_each_mail_once_with_flat_memory(service, smtp_server):
    pids = sorted(service.worker_pids())
    started = time.monotonic()
    first = run_load(service.port, REQUESTS // 4)
    rss_quarter = {pid: rss_kib(pid) for pid in pids}
    rest = run_load(service.port, REQUESTS - REQUESTS // 4)
    rss_full = {pid: rss_kib(pid) for pid in pids}
    elapsed = time.monotonic() - started

    results = first + rest
    statuses = collections.Counter(status for _, status, _ in results)
    copies, ids = delivered(smtp_server)
    print(f"\nsteady: {len(results)} requests, {CLIENTS} clients, {elapsed:.1f} s ({len(results) / elapsed:.0f}/s); "
          f"answers {dict(statuses)}; delivered {sum(copies.values())}; "
          f"worker RSS KiB after {REQUESTS // 4}: {rss_quarter}, after {REQUESTS}: {rss_full}")
    assert statuses == {200: REQUESTS}
    assert sum(copies.values()) == REQUESTS and set(copies) == {key for key, _, _ in results}
    assert max(copies.values()) == 1
    assert len(set(ids)) == len(ids)  # no duplicate Message-ID
    assert sorted(service.worker_pids()) == pids  # no worker died or was recycled
    for pid in pids:
        assert rss_full[pid] <= rss_quarter[pid] * 1.10, (pid, rss_quarter[pid], rss_full[pid])


def test_load_through_smtp_restarts_and_a_killed_worker(service, smtp_server):
    victim = service.worker_pids()[0]
    # (fraction of requests answered, action): the SMTP server goes away twice, a worker is killed.
    schedule = [(0.10, smtp_server.stop), (0.20, smtp_server.start), (0.40, lambda: os.kill(victim, signal.SIGKILL)),
                (0.55, smtp_server.stop), (0.65, smtp_server.start)]
    pending, lock = list(schedule), threading.Lock()

    def chaos(done):
        with lock:
            while pending and done >= pending[0][0] * REQUESTS:
                pending.pop(0)[1]()

    started = time.monotonic()
    results = run_load(service.port, REQUESTS, progress=chaos)
    elapsed = time.monotonic() - started
    assert not pending

    copies, ids = delivered(smtp_server)
    answers = collections.Counter(status if status in (200, RESET) else code for _, status, code in results)
    ok = [key for key, status, _ in results if status == 200]
    print(f"\nchaos: {len(results)} requests, {CLIENTS} clients, {elapsed:.1f} s; answers {dict(answers)}; "
          f"delivered {sum(copies.values())} (of them answered 200: {sum(copies[k] for k in ok)})")
    assert len(results) == REQUESTS
    assert all(copies[key] == 1 for key in ok)  # every 200 is exactly one delivered mail
    assert max(copies.values()) == 1  # and no mail went out twice, answered or not
    for key, status, code in results:
        if status not in (200, RESET):
            assert CONTRACT_STATUS.get(code) == status, (status, code)  # a contract error envelope
        if code == "provider_down":
            assert copies[key] == 0  # "down" means it was not sent
    assert answers["provider_down"] > 0 and answers[200] > REQUESTS // 4  # the chaos did happen, and so did work
    assert len(set(ids)) == len(ids)

    # Afterwards: the service serves normally (the killed worker was replaced).
    before = sum(copies.values())
    after = run_load(service.port, 200)
    assert collections.Counter(status for _, status, _ in after) == {200: 200}
    assert sum(delivered(smtp_server)[0].values()) == before + 200
    assert victim not in service.worker_pids() and len(service.worker_pids()) == 2
