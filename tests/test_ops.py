"""The ways an operator runs the service: the Docker image, compose with a mail catcher, systemd.

There is no Docker engine here, so the image's properties are read from the Dockerfile, and its
HEALTHCHECK command is run as it is against a real gunicorn.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, free_port
from herald_smtp.config import default_idempotency_store, load_config

@pytest.fixture(scope="module")
def graceful_timeout(tmp_path_factory):
    """gunicorn's graceful_timeout with the default configuration, as gunicorn itself reads
    gunicorn.conf.py (`gunicorn --print-config`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMTP_", "API_KEY", "IDEMPOTENCY_", "WEB_", "PROMETHEUS_"))}
    env["TMPDIR"] = str(tmp_path_factory.mktemp("print-config"))  # its metrics directory goes there
    out = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config", "app:app"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    [value] = re.findall(r"(?m)^graceful_timeout\s+= (\d+)$", out)
    return int(value)


def test_gunicorn_gives_in_flight_sends_their_whole_deadline(graceful_timeout):
    assert graceful_timeout > load_config({}).smtp_timeout_seconds


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


# -- Dockerfile ---------------------------------------------------------------------

def dockerfile_stages():
    """[[(INSTRUCTION, arguments), ...] per stage], continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    stages = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        if op.upper() == "FROM" and stages[-1] and any(o == "FROM" for o, _ in stages[-1]):
            stages.append([])
        stages[-1].append((op.upper(), args.strip()))
    return stages


def final_stage():
    return dockerfile_stages()[-1]


def args_of(stage, op):
    return [a for o, a in stage if o == op]


def image_env():
    env = {}
    for args in args_of(final_stage(), "ENV"):
        for item in shlex.split(args):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def image_store_dir():
    """Directory of the image's SQLite file (sqlite:///path or sqlite:////path: both absolute)."""
    url = image_env()["IDEMPOTENCY_STORE"]
    assert url.startswith("sqlite://")
    return os.path.dirname("/" + url[len("sqlite://"):].lstrip("/"))


def test_image_is_slim_python_311_in_stages():
    arg = dict(a.split("=", 1) for a in args_of(dockerfile_stages()[0], "ARG"))
    bases = [a.split()[0] for stage in dockerfile_stages() for a in args_of(stage, "FROM")]
    assert len(bases) == 2  # dependencies are installed in a stage that is thrown away
    for base in bases:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", arg.get(base.strip("${}"), base))


def test_image_runs_as_a_non_root_numeric_user():
    [user] = args_of(final_stage(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit() and int(gid) != 0)


def test_image_has_no_build_tools_and_no_secrets():
    runs = " ".join(args_of(final_stage(), "RUN"))
    for tool in ("apt-get", "apk ", "build-essential", "gcc", "g++", "make ", "curl", "wget", "-dev "):
        assert tool not in runs
    for op in ("ENV", "ARG"):
        for args in args_of(final_stage(), op):
            assert not re.search(r"PASSWORD|API_KEY|SECRET|TOKEN|SMTP_USER", args)
    # Only what the service runs is copied, never the whole context (which could hold .env).
    for args in args_of(final_stage(), "COPY"):
        sources = [s for s in args.split()[:-1] if not s.startswith("--")]
        assert "." not in sources and "./" not in sources


def test_image_env_is_python_friendly_and_a_valid_configuration():
    env = image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    load_config({k: v for k, v in env.items() if k != "PATH"})


def test_idempotency_store_is_on_a_volume_the_user_owns():
    directory = image_store_dir()
    volumes = [v for args in args_of(final_stage(), "VOLUME") for v in json.loads(args)]
    assert directory in volumes
    uid, _, gid = args_of(final_stage(), "USER")[0].partition(":")
    runs = " ".join(args_of(final_stage(), "RUN"))
    assert re.search(rf"install -d -o {uid} -g {gid or uid} .*{re.escape(directory)}\b", runs)


def test_gunicorn_gets_the_signals_exec_form_cmd():
    assert json.loads(args_of(final_stage(), "CMD")[-1]) == ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
    assert not args_of(final_stage(), "ENTRYPOINT")
    assert args_of(final_stage(), "STOPSIGNAL") in ([], ["SIGTERM"])


def healthcheck_command():
    [args] = args_of(final_stage(), "HEALTHCHECK")
    return json.loads(args.partition("CMD")[2])


def test_image_healthcheck_probes_a_running_service(gunicorn, smtp_server):
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    g = gunicorn(smtp_server.env(), workers=1, threads=1)
    env = {**os.environ, "PORT": f":{g.port}"}
    assert subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode == 0
    env["PORT"] = f"0.0.0.0:{free_port()}"  # nothing listens there: unhealthy
    assert subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode != 0


def dockerignored(path):
    """Docker's rule: the last matching pattern wins; `!` lets a path back in."""
    ignored = False
    for pattern in read(".dockerignore").splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern)
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_clutter_out_and_what_is_copied_in():
    for path in (".env", ".venv/bin/python", ".git/config", "tests/conftest.py", "idem.sqlite3",
                 "herald_smtp/__pycache__/api.cpython-311.pyc"):
        assert dockerignored(path), path
    for args in args_of(final_stage(), "COPY") + args_of(dockerfile_stages()[0], "COPY"):
        if "--from" in args:
            continue
        for source in args.split()[:-1]:
            assert not dockerignored(source.rstrip("/")), source
            assert os.path.exists(os.path.join(ROOT, source)), source
    assert not dockerignored("herald_smtp/smtp/transport.py")


# -- compose.yaml -------------------------------------------------------------------

def compose():
    return yaml.safe_load(read("compose.yaml"))


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def test_compose_runs_the_service_next_to_mailpit():
    services = compose()["services"]
    app, catcher = services["herald-smtp"], services["mailpit"]
    assert app["build"] == "."
    assert catcher["image"].startswith("axllent/mailpit:")
    assert any(p.endswith(":8025") for p in catcher["ports"])  # the web UI to read the mail
    env = app["environment"]
    assert env["SMTP_HOST"] == "mailpit" and env["SMTP_PORT"] == "1025"
    assert "mailpit" in app["depends_on"]
    assert {"path": ".env", "required": False} in app["env_file"]
    # What compose sets is a configuration the service starts with (no credentials in clear).
    cfg = load_config({k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()})
    assert cfg.smtp_configured and not cfg.smtp_user


def test_compose_is_read_only_with_writable_store_and_tmp():
    app = compose()["services"]["herald-smtp"]
    assert app["read_only"] is True
    assert "/tmp" in app["tmpfs"]  # Prometheus multiprocess files and gunicorn heartbeats
    assert any(v.split(":")[1] == image_store_dir() for v in app["volumes"])


def test_compose_healthcheck_and_stop_grace_period(graceful_timeout):
    app = compose()["services"]["herald-smtp"]
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    assert seconds(app["stop_grace_period"]) > graceful_timeout  # docker kills after it
    assert compose()["services"]["mailpit"]["healthcheck"]["test"]


# -- systemd ------------------------------------------------------------------------

UNIT = "deploy/herald-smtp.service"


def unit():
    """{section: {key: [values, in order]}}; systemd allows a key more than once."""
    sections, current = {}, None
    for line in read(UNIT).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_runs_gunicorn_from_the_venv_as_a_dedicated_user():
    service = unit()["Service"]
    assert service["User"] == ["herald-smtp"] and service["Group"] == ["herald-smtp"]
    exec_start = shlex.split(service["ExecStart"][0])
    assert exec_start[0] == "/opt/herald-smtp/.venv/bin/gunicorn"
    assert exec_start[1:] == ["-c", "/opt/herald-smtp/gunicorn.conf.py", "app:app"]
    # The service reads its settings file itself, so `systemctl reload` applies an edit of it.
    assert service["Environment"] == ["ENV_FILE=/etc/herald-smtp/env"] and "EnvironmentFile" not in service
    assert service["Restart"] == ["on-failure"]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_gives_in_flight_sends_their_graceful_timeout(graceful_timeout):
    service = unit()["Service"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the master; it stops its workers
    assert seconds(service["TimeoutStopSec"][0]) > graceful_timeout  # systemd kills after it


def test_unit_is_hardened_and_keeps_the_store_in_its_runtime_directory():
    service = unit()["Service"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "RuntimeDirectory": "herald-smtp", "RuntimeDirectoryPreserve": "yes"}.items():
        assert service[key] == [value], key
    # config.py puts the SQLite file in $RUNTIME_DIRECTORY (a tmpfs under /run) when systemd
    # provides it; kept across restarts, so a retry spanning one is still recognised.
    assert default_idempotency_store({"RUNTIME_DIRECTORY": "/run/herald-smtp"}).startswith(
        "sqlite:///run/herald-smtp/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_and_security(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's venv, nothing else changes.
    text = read(UNIT).replace("/opt/herald-smtp/.venv", os.path.join(ROOT, ".venv"))
    path = tmp_path / "herald-smtp.service"
    path.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(path)],
                              capture_output=True, text=True, timeout=60)
    if "--offline" in security.stderr:
        pytest.skip("systemd-analyze security has no --offline here")
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, security.stdout[-500:]
