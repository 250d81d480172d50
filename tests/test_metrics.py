"""GET /metrics: Prometheus text that adds up every gunicorn worker, without user text in labels."""

import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY, ROOT, free_port, send_json, unique_key, wait_for


def parse(text: str) -> dict:
    """{(sample name, ((label, value), ...)): value}"""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    """A sample's value; one that is missing fails the test, so a renamed metric never reads as 0."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def sends(samples, outcome, error_code=""):
    return value(samples, "herald_smtp_sends_total", outcome=outcome, error_code=error_code)


# -- in one process (the test client) ----------------------------------------------

def test_metrics_count_sends_replays_conflicts_and_connections(make_app, smtp_server):
    client = make_app(smtp_server.env()).test_client()
    key = unique_key()
    assert send_json(client, {"to": "alice@example.com", "body": "one"}, key=key).status_code == 200
    assert send_json(client, {"to": "alice@example.com", "body": "one"}, key=key).status_code == 200
    assert send_json(client, {"to": "alice@example.com", "body": "two"}, key=key).status_code == 409
    assert send_json(client, {"to": "bob@example.com"}).status_code == 200
    assert send_json(client, {"to": "not an address"}).status_code == 400

    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    m = parse(resp.get_data(as_text=True))
    assert sends(m, "sent") == 2
    assert sends(m, "replayed") == 1
    assert sends(m, "failed", "idempotency_conflict") == 1
    assert sends(m, "failed", "invalid_destination") == 1
    assert value(m, "herald_smtp_idempotency_total", result="replayed") == 1
    assert value(m, "herald_smtp_idempotency_total", result="conflict") == 1
    assert value(m, "herald_smtp_send_duration_seconds_count", outcome="sent") == 2
    assert value(m, "herald_smtp_send_duration_seconds_count", outcome="failed") == 2
    # Both sends rode one SMTP session, as the server saw it.
    assert value(m, "herald_smtp_smtp_connections_total", kind="opened") == smtp_server.sessions == 1
    assert value(m, "herald_smtp_smtp_connections_total", kind="reused") == 1
    assert value(m, "herald_smtp_sends_in_flight") == 0


def test_answers_before_the_send_view_are_counted_too(make_app, smtp_server):
    client = make_app(smtp_server.env(API_KEY=API_KEY, HTTP_BODY_LIMIT_BYTES="1024")).test_client()
    assert send_json(client, {"to": "a@example.com"}).status_code == 401  # a wrong key in Herald
    headers = {"X-API-Key": API_KEY}
    assert send_json(client, {"to": "a@example.com", "body": "x" * 2000}, **headers).status_code == 413
    assert send_json(client, {"to": "a@example.com"}, **headers).status_code == 200
    m = parse(client.get("/metrics").get_data(as_text=True))
    assert sends(m, "failed", "unauthorized") == 1
    assert sends(m, "failed", "invalid_request") == 1
    assert sends(m, "sent") == 1
    assert value(m, "herald_smtp_send_duration_seconds_count", outcome="failed") == 2
    assert value(m, "herald_smtp_sends_in_flight") == 0


def test_metrics_hold_no_recipient_key_or_text(make_app, smtp_server):
    client = make_app(smtp_server.env()).test_client()
    mail = {"to": "carol.secret@example.com", "subject": "Subject-XYZ", "body": "Body-XYZ"}
    assert send_json(client, mail, key="key-XYZ").status_code == 200
    assert send_json(client, mail, key="key-XYZ").status_code == 200  # replayed
    assert send_json(client, {"to": "dave.secret@nowhere"}).status_code == 400
    text = client.get("/metrics").get_data(as_text=True)
    m = parse(text)  # the three answers were counted: this text is what they left behind
    assert (sends(m, "sent"), sends(m, "replayed"), sends(m, "failed", "invalid_destination")) == (1, 1, 1)
    for secret in ("carol", "dave", "example.com", "nowhere", "XYZ"):
        assert secret not in text


def test_metrics_are_open_by_default_even_with_an_api_key(make_app, smtp_server):
    client = make_app(smtp_server.env(API_KEY=API_KEY)).test_client()
    assert client.post("/v1/send", json={"to": "a@example.com"}).status_code == 401
    assert client.get("/metrics").status_code == 200


def test_metrics_require_the_api_key_when_asked(make_app, smtp_server):
    client = make_app(smtp_server.env(API_KEY=f"old-key,{API_KEY}", METRICS_REQUIRE_API_KEY="true")).test_client()
    resp = client.get("/metrics")
    assert resp.status_code == 401
    assert resp.get_json()["error_code"] == "unauthorized"
    assert client.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": API_KEY}).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes carry no key


# -- across gunicorn workers ---------------------------------------------------------

def scrape(g, **headers):
    req = urllib.request.Request(g.url + "/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return parse(resp.read().decode())


def test_metrics_add_up_every_gunicorn_worker(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(), workers=2, threads=2)
    a, b = g.workers(2)
    key = unique_key()
    with g.only_through(a):
        for i in range(3):
            assert g.post({"to": f"user{i}@example.com", "body": "hello"}, key=key if i == 0 else None)[0] == 200
    with g.only_through(b):
        for i in range(3, 5):
            assert g.post({"to": f"user{i}@example.com", "body": "hello"})[0] == 200
        # The key was first used on worker a; the shared store replays it here.
        assert g.post({"to": "user0@example.com", "body": "hello"}, key=key)[0] == 200
        assert g.post({"to": "user0@example.com", "body": "changed"}, key=key)[0] == 409
        assert g.post({"to": "nobody"})[0] == 400

    def totals_are_right(m):
        assert sends(m, "sent") == 5  # 3 through a + 2 through b
        assert sends(m, "replayed") == 1
        assert sends(m, "failed", "idempotency_conflict") == 1
        assert sends(m, "failed", "invalid_destination") == 1
        assert value(m, "herald_smtp_idempotency_total", result="replayed") == 1
        assert value(m, "herald_smtp_idempotency_total", result="conflict") == 1
        assert value(m, "herald_smtp_send_duration_seconds_count", outcome="sent") == 5
        opened = value(m, "herald_smtp_smtp_connections_total", kind="opened")
        assert opened == smtp_server.sessions
        assert opened + value(m, "herald_smtp_smtp_connections_total", kind="reused") == 5
        assert value(m, "herald_smtp_sends_in_flight") == 0

    # Whichever worker answers the scrape, it reports both workers' counts.
    for worker in (a, b):
        with g.only_through(worker):
            totals_are_right(scrape(g))

    # A worker that dies is replaced; what it counted stays in the totals.
    os.kill(a, signal.SIGKILL)
    wait_for(lambda: a not in g.worker_pids(), timeout=20)
    g.workers(2)
    wait_for(lambda: urllib.request.urlopen(g.url + "/healthz", timeout=5).status == 200, timeout=20)
    for worker in g.worker_pids():
        with g.only_through(worker):
            totals_are_right(scrape(g))


def test_in_flight_sends_are_summed_over_live_workers(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(), workers=2, threads=2)
    a, b = g.workers(2)
    smtp_server.handler.data_gate = gate = threading.Event()
    results = []

    def post(i):
        results.append(g.post({"to": f"held{i}@example.com"})[0])

    threads = []
    try:
        for i, worker in enumerate((a, b)):  # one held send in each worker
            with g.only_through(worker):
                threads.append(threading.Thread(target=post, args=(i,)))
                threads[-1].start()
                wait_for(lambda: len(smtp_server.handler.data_peers) == i + 1, timeout=20)
        assert value(scrape(g), "herald_smtp_sends_in_flight") == 2
    finally:
        gate.set()
        for t in threads:
            t.join(30)
    assert results == [200, 200]
    assert value(scrape(g), "herald_smtp_sends_in_flight") == 0


def test_each_start_counts_from_zero(gunicorn, smtp_server, tmp_path):
    env = smtp_server.env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"))
    first = gunicorn(env, workers=1, threads=1)
    assert first.post({"to": "a@example.com"})[0] == 200
    assert sends(scrape(first), "sent") == 1
    first.stop()
    second = gunicorn(env, workers=1, threads=1)
    assert sends(scrape(second), "sent") == 0


def test_a_worker_file_left_empty_does_not_fail_the_scrape(gunicorn, smtp_server, tmp_path):
    """prometheus_client creates a process's file before it sizes it (client_python#1199): a
    scrape in that moment, or after a worker killed in it (the file stays, 0 bytes, for good),
    still answers every other worker's figures."""
    directory = tmp_path / "prometheus"
    g = gunicorn(smtp_server.env(PROMETHEUS_MULTIPROC_DIR=str(directory)), workers=1, threads=1)
    assert g.post({"to": "a@example.com"})[0] == 200
    (directory / "counter_4242424.db").touch()  # as a worker killed before sizing it leaves it
    assert sends(scrape(g), "sent") == 1


def test_metrics_through_gunicorn_can_require_the_api_key(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(API_KEY=API_KEY, METRICS_REQUIRE_API_KEY="true"), workers=1, threads=1)
    try:
        scrape(g)
        raise AssertionError("scrape without a key was answered")
    except urllib.error.HTTPError as e:
        assert e.code == 401
    assert value(scrape(g, **{"X-API-Key": API_KEY}), "herald_smtp_sends_in_flight") == 0


def test_the_default_metrics_directory_is_private_and_removed_on_exit(gunicorn, smtp_server, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    g = gunicorn(smtp_server.env(TMPDIR=str(tmp)), workers=1, threads=1)
    assert g.post({"to": "a@example.com"})[0] == 200
    [directory] = tmp.glob("herald-smtp-metrics-*")
    assert directory.stat().st_mode & 0o077 == 0  # other users can neither read nor plant files
    assert list(directory.glob("counter_*.db"))
    g.stop()
    assert not directory.exists()


def test_a_start_stopped_by_bad_configuration_leaves_no_metrics_directory(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "SMTP_PORT": "abc", "PORT": f"127.0.0.1:{free_port()}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SMTP_PORT" in proc.stderr
    assert list(tmp_path.glob("herald-smtp-metrics-*")) == []


def test_worker_restarts_count_replaced_workers_not_starts_or_reloads(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(), workers=2, threads=1)
    first = g.workers(2)
    assert value(scrape(g), "herald_smtp_worker_restarts_total") == 0
    g.proc.send_signal(signal.SIGHUP)  # a reload replaces both workers, as planned
    wait_for(lambda: len(set(g.worker_pids()) - set(first)) == 2 and len(g.worker_pids()) == 2, timeout=30)
    assert value(scrape(g), "herald_smtp_worker_restarts_total") == 0
    os.kill(g.worker_pids()[0], signal.SIGKILL)  # a worker dies; gunicorn starts another in its place
    wait_for(lambda: value(scrape(g), "herald_smtp_worker_restarts_total") == 1, timeout=30)


def test_the_store_gauges_say_whether_it_answers_and_how_far_replays_should_reach(make_app):
    up = make_app({"IDEMPOTENCY_TTL_SECONDS": "120"}).test_client()
    down = make_app({"IDEMPOTENCY_STORE": f"redis://127.0.0.1:{free_port()}/0"}).test_client()
    m = parse(up.get("/metrics").get_data(as_text=True))
    assert (value(m, "herald_smtp_idempotency_store_up"), value(m, "herald_smtp_idempotency_ttl_seconds")) == (1, 120)
    m = parse(down.get("/metrics").get_data(as_text=True))
    assert (value(m, "herald_smtp_idempotency_store_up"), value(m, "herald_smtp_idempotency_ttl_seconds")) == (0, 300)
    assert not [name for name, _ in m if name == "herald_smtp_idempotency_oldest_success_age_seconds"]
