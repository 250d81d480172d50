"""Authentication is never silently off: a key source that yields nothing stops startup, a service
without a key says so at every start (louder when others can reach it), REQUIRE_API_KEY makes that
a startup error, and a key that could never match is refused (README, "Configuration")."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port
from herald_smtp import ConfigError, load_config


@pytest.mark.parametrize("content", ["", "\n", "  \n\n \t\n", ",", " , \n,\n"])
def test_an_api_key_file_that_yields_no_key_stops_startup(tmp_path, content):
    (tmp_path / "api_key").write_text(content)
    with pytest.raises(ConfigError, match=r"^API_KEY_FILE: "):
        load_config({"API_KEY_FILE": str(tmp_path / "api_key")})


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_smtp_password_file_stops_startup(tmp_path, content):
    (tmp_path / "password").write_text(content)
    with pytest.raises(ConfigError, match=r"^SMTP_PASSWORD_FILE: the file is empty$"):
        load_config({"SMTP_PASSWORD_FILE": str(tmp_path / "password")})


@pytest.mark.parametrize("key", ["clé-secrète-123", "ключ", "key\u00a0with-nbsp", "tab\tinside"])
def test_a_key_that_could_never_match_is_refused(tmp_path, key):
    with pytest.raises(ConfigError, match=r"^API_KEY: ") as exc:
        load_config({"API_KEY": f"good-key,{key}"})
    assert key not in str(exc.value)  # the key itself is never printed
    (tmp_path / "api_key").write_text(f"good-key\n{key}\n")
    with pytest.raises(ConfigError, match=r"^API_KEY_FILE: "):
        load_config({"API_KEY_FILE": str(tmp_path / "api_key")})


def test_require_api_key_refuses_to_start_without_one():
    with pytest.raises(ConfigError, match=r"^REQUIRE_API_KEY"):
        load_config({"REQUIRE_API_KEY": "true"})
    assert load_config({"REQUIRE_API_KEY": "true", "API_KEY": "k"}).api_keys == ("k",)
    assert load_config({}).require_api_key is False  # the Go service's .env starts as before


def start(env, seconds=3):
    """gunicorn for a few seconds (or until it stops by itself); returns (exit status or None, JSON lines)."""
    full = {"PATH": os.environ["PATH"], "WEB_CONCURRENCY": "1", "WEB_THREADS": "1",
            "IDEMPOTENCY_STORE": "memory://", **env}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        return None, [json.loads(line) for line in out.splitlines()]
    return proc.returncode, [json.loads(line) for line in proc.stdout.read().splitlines()]


def key_lines(entries):
    return [(e["level"], e["event"]) for e in entries if "API_KEY" in e["event"]]


def test_no_key_is_a_warning_at_every_start_on_loopback():
    status, entries = start({"PORT": f"127.0.0.1:{free_port()}"})
    assert status is None  # it runs
    assert key_lines(entries) == [("warning", "API_KEY is empty: anyone who can reach the service can send mail "
                                              "through it")]


def test_no_key_is_louder_when_bound_beyond_loopback():
    port = free_port()
    status, entries = start({"PORT": f":{port}"})
    assert status is None
    [(level, event)] = key_lines(entries)
    assert level == "error" and f"listens on 0.0.0.0:{port}, beyond this host" in event


def test_with_a_key_nothing_is_said_about_it():
    assert key_lines(start({"PORT": f":{free_port()}", "API_KEY": "k-123"})[1]) == []


def test_require_api_key_stops_gunicorn_with_one_line(tmp_path):
    (tmp_path / "api_key").write_text("\n")
    for env, variable in (({"REQUIRE_API_KEY": "true"}, "REQUIRE_API_KEY"),
                          ({"API_KEY_FILE": str(tmp_path / "api_key")}, "API_KEY_FILE")):
        status, entries = start({"PORT": f"127.0.0.1:{free_port()}", **env}, seconds=30)
        assert status == 2
        [entry] = entries
        assert entry["event"] == "configuration error" and entry["error"].startswith(variable + ":")
