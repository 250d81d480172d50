"""SIGHUP (`systemctl reload`, `docker compose kill -s HUP`) applies a changed env file and changed
secret files; a bad configuration at reload is logged and the service goes on with the one in
force (README, "Rotating the API key" and "Running under systemd")."""

import json
import signal

import pytest

from conftest import wait_for

TO = "rotation@example.com"
OLD, NEW = "old-key-1111111111", "new-key-2222222222"


def status(g, key):
    return g.post({"to": TO, "body": "hi"}, headers={"X-API-Key": key})[0]


def reload(g, workers=2):
    """HUP, then wait until every worker is a new one (started with what the master loaded)."""
    before = set(g.worker_pids())
    g.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(g.worker_pids()) == workers and not before & set(g.worker_pids()), timeout=30)
    assert g.proc.poll() is None  # the master goes on


def rotate(g, write):
    """The README's rotation: old -> old,new -> new, a reload after each edit."""
    assert (status(g, OLD), status(g, NEW)) == (200, 401)
    write(f"{OLD},{NEW}")
    reload(g)
    assert (status(g, OLD), status(g, NEW)) == (200, 200)
    write(NEW)
    reload(g)
    assert (status(g, OLD), status(g, NEW)) == (401, 200)


def test_a_changed_dot_env_applies_at_reload(smtp_server, gunicorn, tmp_path):
    dot_env = tmp_path / ".env"
    dot_env.write_text(f"API_KEY={OLD}\n")
    g = gunicorn(smtp_server.env(), cwd=tmp_path)
    rotate(g, lambda keys: dot_env.write_text(f"API_KEY={keys}\n"))


def test_a_changed_env_file_applies_at_reload_as_under_systemd(smtp_server, gunicorn, tmp_path):
    # The unit names its settings file with ENV_FILE; systemd itself passes no settings.
    env_file = tmp_path / "etc-herald-smtp-env"
    settings = "\n".join(f"{k}={v}" for k, v in smtp_server.env().items())
    env_file.write_text(f"{settings}\nAPI_KEY={OLD}\n")
    g = gunicorn({"ENV_FILE": str(env_file)}, cwd=tmp_path)
    rotate(g, lambda keys: env_file.write_text(f"{settings}\nAPI_KEY={keys}\n"))
    assert len(smtp_server.messages) == 4  # every 200 was a mail sent with the settings from the file


def test_a_changed_secret_file_applies_at_reload_as_under_compose(smtp_server, gunicorn, tmp_path):
    secret = tmp_path / "herald_smtp_api_key"
    secret.write_text(OLD + "\n")
    g = gunicorn(smtp_server.env(API_KEY_FILE=str(secret)))
    rotate(g, lambda keys: secret.write_text(keys.replace(",", "\n") + "\n"))


def test_the_real_environment_still_wins_over_dot_env_after_a_reload(smtp_server, gunicorn, tmp_path):
    dot_env = tmp_path / ".env"
    dot_env.write_text(f"API_KEY={NEW}\n")
    g = gunicorn(smtp_server.env(API_KEY=OLD), cwd=tmp_path)
    reload(g)
    assert (status(g, OLD), status(g, NEW)) == (200, 401)


@pytest.mark.parametrize("breakage", ["bad value in the env file", "secret file emptied", "env file gone",
                                      "a line that is not KEY=value"])
def test_a_bad_configuration_at_reload_is_logged_and_the_old_one_serves(smtp_server, gunicorn, tmp_path, breakage):
    env_file, secret = tmp_path / "env", tmp_path / "api_key"
    settings = "\n".join(f"{k}={v}" for k, v in smtp_server.env().items())
    env_file.write_text(f"{settings}\nAPI_KEY_FILE={secret}\n")
    secret.write_text(OLD)
    g = gunicorn({"ENV_FILE": str(env_file)}, cwd=tmp_path)
    assert (status(g, OLD), status(g, "")) == (200, 401)

    variable = {"bad value in the env file": "SMTP_PORT", "secret file emptied": "API_KEY_FILE",
                "env file gone": "ENV_FILE", "a line that is not KEY=value": "ENV_FILE"}[breakage]
    if breakage == "bad value in the env file":
        env_file.write_text(f"{settings}\nAPI_KEY_FILE={secret}\nSMTP_PORT=abc\n")
    elif breakage == "a line that is not KEY=value":  # python-dotenv would skip it: no API_KEY_FILE
        env_file.write_text(f"{settings}\nAPI_KEY_FILE {secret}\n")
    elif breakage == "secret file emptied":
        secret.write_text("\n")
    else:
        env_file.unlink()
    reload(g)
    # Still the old configuration: the old key, the same SMTP server; never open without a key.
    assert (status(g, OLD), status(g, "")) == (200, 401)
    assert len(smtp_server.messages) == 2

    env_file.write_text(f"{settings}\nAPI_KEY_FILE={secret}\n")  # mended: the next reload applies it
    secret.write_text(NEW)
    reload(g)
    assert (status(g, OLD), status(g, NEW)) == (401, 200)
    errors = [e for e in map(json.loads, g.stop().splitlines()) if e["event"].startswith("configuration error")]
    assert len(errors) == 1 and errors[0]["error"].startswith(variable + ":"), errors
    assert errors[0]["level"] == "error" and "the running configuration stays" in errors[0]["event"]
