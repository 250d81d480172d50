"""Holding SMTP sessions (README "Running in production under gunicorn"): reused while busy, QUIT at
SMTP_MAX_IDLE_SECONDS even when no send comes, so a quiet service holds nothing open at the provider;
and the relay order a worker's sends follow."""

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import send_json, unique_key, wait_for
from herald_smtp.config import Relay
from herald_smtp.smtp.relays import Relays

MAIL = {"to": "user@example.com", "subject": "Your code", "body": "Your code is 424242"}


def connections_to(port):
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_idle_sessions_are_closed_politely_at_the_limit_without_traffic(gunicorn, smtp_server):
    g = gunicorn(smtp_server.env(SMTP_MAX_IDLE_SECONDS="1"), workers=2, threads=4)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: g.post(MAIL, unique_key())[0], range(16))) == [200] * 16
    opened = smtp_server.sessions
    assert opened >= 2 and connections_to(smtp_server.port) == opened
    done = time.monotonic()

    wait_for(lambda: smtp_server.handler.commands["QUIT"] == opened, timeout=5)

    assert time.monotonic() - done < 1 + 1.5  # the limit, then the reaper's next look
    wait_for(lambda: connections_to(smtp_server.port) == 0, timeout=2)
    assert g.post(MAIL, unique_key())[0] == 200  # and a new send opens a new session
    assert smtp_server.sessions == opened + 1


def test_a_session_in_use_is_not_reaped(make_app, smtp_server):
    client = make_app(smtp_server.env(SMTP_MAX_IDLE_SECONDS="0.2")).test_client()
    assert send_json(client, MAIL, key=unique_key()).status_code == 200
    smtp_server.handler.data_gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send_json, client, MAIL, key=unique_key())  # a new session (the first was reaped)
        wait_for(lambda: len(smtp_server.handler.data_peers) == 2)
        time.sleep(3.2)  # well past the idle limit plus what a QUIT may take, mid-send
        assert connections_to(smtp_server.port) == 1
        smtp_server.handler.data_gate.set()
        assert held.result().status_code == 200
    assert len(smtp_server.messages) == 2
    wait_for(lambda: smtp_server.handler.commands["QUIT"] == 2, timeout=3)


def test_relay_order_puts_a_failed_relay_behind_the_others_for_its_cool_down(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    primary, second, third = (Relay(name, "", "host") for name in ("primary", "fallback-1", "fallback-2"))
    relays = Relays((primary, second, third), cooldown=30)
    assert relays.order() == [primary, second, third]
    relays.failed(primary)
    clock[0] += 1
    relays.failed(second)
    assert relays.order() == [third, primary, second]  # still tried, last, soonest back first
    assert relays.available()
    relays.failed(third)
    assert not relays.available()  # /readyz: every relay is in cool-down
    clock[0] += 29.5
    assert relays.order() == [primary, second, third]  # the primary's cool-down is over: this send tries it
    assert relays.order() == [second, third, primary]  # while it does, the next ones do not
    relays.succeeded(primary)
    relays.succeeded(third)  # a last-resort try went through
    assert relays.order() == [primary, third, second]
