"""One log schema: every line the running service writes (gunicorn's own, its access log, ours) is
one JSON object with `ts`, `level`, `logger` and `event`, on stderr; access lines carry the
request id, so one query finds every line of a request (README, "Logs")."""

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import API_KEY, ROOT, unique_key, wait_for

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def parse(text):
    """Every line as JSON in the common schema; fails on the first line that is not."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert TS.fullmatch(entry["ts"]) and entry["level"] in LEVELS, line
        assert isinstance(entry["logger"], str) and isinstance(entry["event"], str) and entry["event"], line
        entries.append(entry)
    return entries


def test_every_line_of_a_run_is_json_in_one_schema_on_stderr(smtp_server, gunicorn, tmp_path):
    stdout = open(tmp_path / "stdout", "w")
    g = gunicorn(smtp_server.env(API_KEY=API_KEY, LOG_LEVEL="debug"), workers=2, threads=2, stdout=stdout)
    request = urllib.request.Request(g.url + "/v1/send", method="POST", data=json.dumps({"to": "a@example.com"}).encode(),
                                     headers={"Content-Type": "application/json", "X-API-Key": API_KEY,
                                              "Idempotency-Key": unique_key(), "X-Request-ID": "trace-4242"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["X-Request-ID"] == "trace-4242"
    assert g.post({"to": "a@example.com"})[0] == 401  # no key
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:  # not HTTP: gunicorn's own error
        s.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        s.recv(1024)
    g.proc.send_signal(signal.SIGHUP)  # a reload: gunicorn's master and new workers speak
    time.sleep(2)
    assert g.post({"to": "a@example.com"}, headers={"X-API-Key": API_KEY})[0] == 200
    entries = parse(g.stop())
    stdout.close()
    assert (tmp_path / "stdout").read_text() == ""

    loggers = {e["logger"] for e in entries}
    assert {"gunicorn.error", "gunicorn.access"} <= loggers, loggers
    assert any(e["event"].startswith("Booting worker") for e in entries)
    assert any(e["event"].startswith("Handling signal: hup") for e in entries)
    access = [e for e in entries if e["logger"] == "gunicorn.access"]
    assert all(e["event"] == "access" and re.fullmatch(r"[\w.:-]+", e["request_id"]) for e in access)
    assert all(isinstance(e["status"], int) for e in access)
    # One request id, two lines: what the app did and what the server answered.
    traced = [e for e in entries if e.get("request_id") == "trace-4242"]
    # One line a mail: what the server answered and what the app did.
    [line] = traced
    assert (line["logger"], line["event"], line["status"], line["path"]) == ("gunicorn.access", "access", 200, "/v1/send")
    assert (line["outcome"], line["replayed"], line["to"]) == ("sent", False, "***@example.com")
    # Each holds exactly the fields the README's table gives it.
    assert set(line) - COMMON == readme_fields("gunicorn.access", "`access`:") | readme_fields("gunicorn.access",
                                                                                              "`access` of a mail")
    refused = [e for e in access if e["status"] == 401]
    assert len(refused) == 1 and set(refused[0]) - COMMON == readme_fields("gunicorn.access", "`access`:")


COMMON = {"ts", "level", "logger", "event"}


def readme_fields(logger, event):
    """The backquoted names in the last column of the README's Logs table row for logger and event."""
    with open(f"{ROOT}/README.md", encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[0] == f"`{logger}`" and cells[1].startswith(event):
                return set(re.findall(r"`([a-z_]+)`", cells[2])) - {"x_request_id"}
    raise AssertionError(f"no README row for {logger} {event}")


def test_a_bad_configuration_is_one_json_line_naming_the_variable():
    env = {"PATH": "/usr/bin:/bin", "SMTP_PORT": "abc", "PORT": "127.0.0.1:1"}  # never binds: startup stops first
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    [entry] = parse(proc.stderr)
    assert (entry["level"], entry["event"]) == ("error", "configuration error")
    assert entry["error"].startswith("SMTP_PORT:")


def test_a_worker_killed_mid_run_is_logged_as_json(smtp_server, gunicorn):
    g = gunicorn(smtp_server.env(), workers=1, threads=1)
    [pid] = g.worker_pids()
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_for(lambda: g.worker_pids() not in ([], [pid]), timeout=20)
    time.sleep(0.5)
    entries = parse(g.stop())
    assert any(f"(pid:{pid})" in e["event"] and e["level"] == "error" for e in entries), [e["event"] for e in entries]


def test_a_librarys_log_line_and_a_python_warning_are_json_too():
    code = ("import logging, warnings; from herald_smtp import logs; logs.setup('INFO'); "
            "logging.getLogger('somelib').warning('library says %s', 'hi'); warnings.warn('deprecated thing')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == ""
    entries = parse(proc.stderr)
    assert [(e["logger"], e["level"]) for e in entries] == [("somelib", "warning"), ("py.warnings", "warning")]
    assert entries[0]["event"] == "library says hi"


def test_a_replay_is_one_line_and_warn_keeps_the_access_line_without_the_send(smtp_server, gunicorn):
    key = unique_key()
    g = gunicorn(smtp_server.env(), workers=1, threads=2)
    assert [g.post({"to": "b@example.org"}, key=key)[0] for _ in range(2)] == [200, 200]
    sends = [e for e in parse(g.stop()) if e.get("path") == "/v1/send"]
    assert [(e["logger"], e["outcome"], e["replayed"], e["idempotency_key"], e["to"]) for e in sends] == [
        ("gunicorn.access", "sent", False, key, "***@example.org"), ("gunicorn.access", "replayed", True, key, "***@example.org")]
    assert sends[0]["relay"] == "primary" and "relay" not in sends[1]
    assert sends[0]["message_id"] == sends[1]["message_id"] == key

    quiet = gunicorn(smtp_server.env(LOG_LEVEL="warn"), workers=1, threads=2)
    assert quiet.post({"to": "b@example.org"}, key=unique_key())[0] == 200
    [line] = [e for e in parse(quiet.stop()) if e.get("path") == "/v1/send"]
    assert set(line) - COMMON == readme_fields("gunicorn.access", "`access`:")  # the info fields stay out


def test_the_timestamp_is_right_on_both_sides_of_a_second():
    from herald_smtp.logs import JsonFormatter

    formatter = JsonFormatter()
    for created in (1764000000.998, 1764000000.9995, 1764000001.0, 1764000001.001, 1764000000.5, 1767225599.999,
                    1767225600.0):
        record = logging.LogRecord("x", logging.INFO, "", 0, "e", None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{record.msecs:03d}Z"
        assert json.loads(formatter.format(record))["ts"] == expected
