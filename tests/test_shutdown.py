"""Stopping gunicorn while sends are in flight (SIGTERM, SIGQUIT, or Ctrl-C in its terminal): each
send finishes and answers 200, then SMTP QUIT."""

import os
import signal
import threading
import time

import pytest

from conftest import wait_for


# Ctrl-C in a terminal is SIGINT to every process of the foreground group: master and workers;
# an impatient user presses it twice.
@pytest.mark.parametrize("how", ["term", "quit", "ctrl-c", "ctrl-c twice"])
def test_a_stop_lets_in_flight_sends_finish_then_closes_smtp_with_quit(gunicorn, smtp_server, how):
    in_flight = 4  # at most one worker's threads: wherever they land, all reach DATA at once
    g = gunicorn(smtp_server.env(), workers=2, threads=in_flight)
    wait_for(lambda: len(g.worker_pids()) == 2, timeout=20)
    handler = smtp_server.handler
    handler.data_gate = gate = threading.Event()  # hold every DATA until the signal is in
    handler.data_delay = 2.0  # and then answer slowly, while the workers are stopping
    results = {}

    def post(i):
        results[i] = g.post({"to": f"user{i}@example.com", "body": f"code {i}"}, timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(in_flight)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(handler.data_peers) == in_flight, timeout=20)
        workers = g.worker_pids()
        for _ in range(2 if how == "ctrl-c twice" else 1):
            if how.startswith("ctrl-c"):
                for pid in workers:
                    os.kill(pid, signal.SIGINT)
            g.proc.send_signal({"term": signal.SIGTERM, "quit": signal.SIGQUIT}.get(how, signal.SIGINT))
            time.sleep(0.5)
        signame = "int" if how.startswith("ctrl-c") else how
        wait_for(lambda: f"Handling signal: {signame}" in g.log_path.read_text(), timeout=20)
    finally:
        gate.set()
        for t in threads:
            t.join(60)

    answers = [results.get(i, ("no answer", None)) for i in range(in_flight)]
    assert [status for status, _ in answers] == [200] * in_flight
    assert all(body["ok"] for _, body in answers)
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == [f"user{i}@example.com" for i in range(in_flight)]
    assert g.proc.wait(timeout=60) == 0
    log = g.stop()
    assert "Worker timeout" not in log and "SIGKILL" not in log
    # Every SMTP session the workers opened was closed politely on their way out.
    assert smtp_server.sessions == in_flight
    assert handler.commands["QUIT"] == in_flight
