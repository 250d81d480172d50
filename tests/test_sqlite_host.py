"""The SQLite file belongs to one host: another host's file is refused at startup, in one line;
a file of an earlier layout, or one another version of the store shares, opens."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port
from herald_smtp.config import ConfigError
from herald_smtp.store.base import NEW, WAIT
from herald_smtp.store.sqlite import SQLiteStore, _machine_id

OTHER_HOST = "0123456789abcdef0123456789abcdef"


def _sql(path, *statements):
    db = sqlite3.connect(path)
    with db:
        rows = [db.execute(s).fetchall() for s in statements]
    db.close()
    return rows


def _written_elsewhere(path):
    """A file with a reservation in flight, then recorded as another host's (as a file on a share
    that another machine wrote would be)."""
    store = SQLiteStore(str(path), 10)
    assert store.begin("in-flight", "fp", lease=60)[0] == NEW
    store.close()
    _sql(path, f"UPDATE herald_smtp_host SET machine_id = '{OTHER_HOST}'")


@pytest.mark.skipif(not _machine_id(), reason="this machine has no machine id")
def test_a_file_written_by_another_host_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "idem.sqlite3"
    _written_elsewhere(path)
    with pytest.raises(ConfigError) as e:
        SQLiteStore(str(path), 10)
    assert str(e.value) == (f"IDEMPOTENCY_STORE: {path} belongs to another host (its machine id is not this one's): "
                            "SQLite's locking is not safe across hosts and its times are per host; give each host "
                            "a file of its own, or use Redis")
    assert OTHER_HOST not in str(e.value) and _machine_id() not in str(e.value)
    # The other host's reservation is still there, and the file still names that host.
    assert _sql(path, "SELECT state FROM idempotency_default", "SELECT machine_id FROM herald_smtp_host") == \
        [[("pending",)], [(OTHER_HOST,)]]


@pytest.mark.skipif(not _machine_id(), reason="this machine has no machine id")
def test_gunicorn_stops_with_one_line_on_another_hosts_file(tmp_path):
    path = tmp_path / "idem.sqlite3"
    _written_elsewhere(path)
    (tmp_path / "empty.env").write_text("")  # not the developer's .env
    env = {"PATH": os.environ["PATH"], "PORT": f"127.0.0.1:{free_port()}", "IDEMPOTENCY_STORE": f"sqlite://{path}",
           "ENV_FILE": str(tmp_path / "empty.env")}
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    [entry] = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines()]
    assert (entry["level"], entry["event"]) == ("error", "configuration error")
    assert entry["error"].startswith(f"IDEMPOTENCY_STORE: {path} belongs to another host")


def test_a_file_from_before_hosts_were_recorded_is_adopted_with_its_keys(tmp_path):
    path = tmp_path / "idem.sqlite3"
    store = SQLiteStore(str(path), 10)
    assert store.begin("in-flight", "fp", lease=60)[0] == NEW
    store.close()
    _sql(path, "DROP TABLE herald_smtp_host")  # the layout before this one
    store = SQLiteStore(str(path), 10)
    assert store.begin("in-flight", "fp", lease=60)[0] == WAIT  # the same boot: its reservation holds
    store.close()
    assert _sql(path, "SELECT machine_id FROM herald_smtp_host") == [[(_machine_id(),)]]


def test_a_clock_table_another_version_widened_still_opens(tmp_path):
    """Several versions share the default file while they run side by side (a rolling upgrade,
    test runs of two checkouts): a column another version added must not stop this one."""
    path = tmp_path / "idem.sqlite3"
    _sql(path, "CREATE TABLE herald_smtp_clock (name TEXT PRIMARY KEY, boot TEXT NOT NULL, wall_offset REAL NOT NULL,"
               " host TEXT NOT NULL DEFAULT '')")
    store = SQLiteStore(str(path), 10)
    assert store.begin("k", "fp", lease=60)[0] == NEW
    store.close()


def test_a_file_that_does_not_fit_stops_startup_in_one_line_not_a_traceback(tmp_path):
    path = tmp_path / "idem.sqlite3"
    _sql(path, "CREATE TABLE herald_smtp_clock (name TEXT PRIMARY KEY, boot TEXT NOT NULL, wall_offset REAL NOT NULL,"
               " host TEXT NOT NULL)")
    with pytest.raises(ConfigError, match=f"^IDEMPOTENCY_STORE: cannot use {path}: NOT NULL constraint failed"):
        SQLiteStore(str(path), 10)


def test_many_processes_opening_a_new_file_together_all_start(tmp_path):
    path = tmp_path / "idem.sqlite3"
    code = ("import sys; from herald_smtp.store.sqlite import SQLiteStore; "
            "SQLiteStore(sys.argv[1], 10, sys.argv[2]).close()")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"scope{i % 3}"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(12)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 12, errors
    assert time.monotonic() - start < 60
    tables = {n for [(n,)] in [[r] for r in _sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'")[0]]}
    assert tables == {"herald_smtp_host", "herald_smtp_clock", "idempotency_scope0", "idempotency_scope1",
                      "idempotency_scope2"}
