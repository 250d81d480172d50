"""Configuration: the names and defaults of the README's "Configuration" table; a bad value stops
startup with one line naming the variable."""

import dataclasses
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from herald_smtp import ConfigError, create_app, load_config
from herald_smtp.config import default_idempotency_store


def test_defaults_are_the_contracts():
    """Every variable's default, as the README's configuration table gives it."""
    cfg = load_config({})
    assert dataclasses.asdict(cfg) == {
        "bind": "0.0.0.0:8084", "api_keys": (), "require_api_key": False,
        "smtp_host": "", "smtp_port": 587, "smtp_user": "", "smtp_password": "",
        "smtp_from": "", "smtp_from_name": "",
        "smtp_use_tls": False, "smtp_use_starttls": True, "smtp_skip_tls_verify": False, "smtp_ca_file": "",
        "smtp_helo_name": "",  # empty: the machine's hostname (test_transport checks EHLO)
        "smtp_fallbacks": (), "smtp_relay_cooldown_seconds": 30, "smtp_chunking": True,
        "smtp_timeout_seconds": 30, "smtp_max_concurrent_sends": 16,
        "smtp_max_idle_seconds": 30, "smtp_max_messages_per_connection": 100,
        "log_level": "INFO",
        # Its path is checked in test_idempotency (the default store's private directory).
        "idempotency_store": default_idempotency_store({}),
        "idempotency_ttl_seconds": 300, "idempotency_max_entries": 1_200_000, "idempotency_fail_open": False,
        "idempotency_wait_replicas": 0,  # the SQLite file has no replicas (1 for Sentinel and Cluster)
        "http_body_limit_bytes": 65536, "http_header_timeout_seconds": 10, "http_body_timeout_seconds": 10,
        "web_concurrency": 2, "web_threads": 8,
        "metrics_require_api_key": False,
        "forwarded_allow_ips": (),  # no proxy trusted: the access log's client is the peer
        "otlp_enabled": False, "otlp_endpoint": "",
        "prometheus_multiproc_dir": "",  # empty: a private temp directory (gunicorn.conf.py)
    }
    assert not cfg.smtp_configured


def test_go_style_env_file_values_are_read():
    cfg = load_config({"PORT": ":9000", "API_KEY": "k", "SMTP_HOST": "smtp.example.com", "SMTP_PORT": "465",
                       "SMTP_USER": "u", "SMTP_PASSWORD": "p", "SMTP_FROM": "noreply@example.com",
                       "SMTP_FROM_NAME": "Herald", "SMTP_USE_TLS": "true", "SMTP_USE_STARTTLS": "false",
                       "SMTP_SKIP_TLS_VERIFY": "false", "SMTP_TIMEOUT_SECONDS": "10",
                       "SMTP_MAX_CONCURRENT_SENDS": "4", "LOG_LEVEL": "debug", "IDEMPOTENCY_TTL_SECONDS": "60",
                       "IDEMPOTENCY_MAX_ENTRIES": "50", "HTTP_BODY_LIMIT_BYTES": "2048"})
    assert cfg.bind == "0.0.0.0:9000" and cfg.api_keys == ("k",)
    assert (cfg.smtp_host, cfg.smtp_port, cfg.smtp_use_tls, cfg.smtp_use_starttls) == ("smtp.example.com", 465, True, False)
    assert (cfg.smtp_timeout_seconds, cfg.smtp_max_concurrent_sends, cfg.log_level) == (10, 4, "DEBUG")
    assert (cfg.idempotency_ttl_seconds, cfg.idempotency_max_entries, cfg.http_body_limit_bytes) == (60, 50, 2048)
    assert cfg.smtp_configured


@pytest.mark.parametrize("port, bind", [
    ("", "0.0.0.0:8084"), (":8084", "0.0.0.0:8084"), ("8084", "0.0.0.0:8084"),
    ("127.0.0.1:9001", "127.0.0.1:9001"), ("[::1]:9002", "[::1]:9002"),
])
def test_port_forms(port, bind):
    assert load_config({"PORT": port}).bind == bind


@pytest.mark.parametrize("env, variable", [
    ({"PORT": "abc"}, "PORT"), ({"PORT": ":70000"}, "PORT"), ({"PORT": "host:"}, "PORT"),
    ({"SMTP_PORT": "abc"}, "SMTP_PORT"), ({"SMTP_PORT": "0"}, "SMTP_PORT"),
    ({"SMTP_USE_TLS": "maybe"}, "SMTP_USE_TLS"), ({"SMTP_USE_STARTTLS": "sometimes"}, "SMTP_USE_STARTTLS"),
    ({"SMTP_SKIP_TLS_VERIFY": "2"}, "SMTP_SKIP_TLS_VERIFY"),
    ({"SMTP_USE_TLS": "true", "SMTP_USE_STARTTLS": "true"}, "SMTP_USE_TLS"),
    ({"SMTP_TIMEOUT_SECONDS": "soon"}, "SMTP_TIMEOUT_SECONDS"),
    ({"SMTP_MAX_CONCURRENT_SENDS": "-1"}, "SMTP_MAX_CONCURRENT_SENDS"),
    ({"IDEMPOTENCY_TTL_SECONDS": "5m"}, "IDEMPOTENCY_TTL_SECONDS"),
    ({"IDEMPOTENCY_MAX_ENTRIES": "lots"}, "IDEMPOTENCY_MAX_ENTRIES"),
    ({"IDEMPOTENCY_STORE": "redis+sentinel://127.0.0.1/herald", "IDEMPOTENCY_WAIT_REPLICAS": "one"},
     "IDEMPOTENCY_WAIT_REPLICAS"),
    ({"IDEMPOTENCY_STORE": "redis://127.0.0.1", "IDEMPOTENCY_WAIT_REPLICAS": "-1"}, "IDEMPOTENCY_WAIT_REPLICAS"),
    ({"IDEMPOTENCY_WAIT_REPLICAS": "1"}, "IDEMPOTENCY_WAIT_REPLICAS"),  # the SQLite file has no replicas
    ({"HTTP_BODY_LIMIT_BYTES": "64k"}, "HTTP_BODY_LIMIT_BYTES"),
    ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
    ({"IDEMPOTENCY_STORE": "memory://", "WEB_CONCURRENCY": "2"}, "IDEMPOTENCY_STORE"),
    ({"METRICS_REQUIRE_API_KEY": "true"}, "METRICS_REQUIRE_API_KEY"),
    ({"IDEMPOTENCY_STORE": "postgres://db"}, "IDEMPOTENCY_STORE"),
    ({"SMTP_FROM": "Herald <noreply@example.com>"}, "SMTP_FROM"),
    ({"SMTP_FROM_NAME": "Herald\r\nBcc: eve@example.com"}, "SMTP_FROM_NAME"),
    ({"SMTP_CA_FILE": "/nonexistent/ca.pem"}, "SMTP_CA_FILE"),
    ({"SMTP_HOST": "smtp.example.com", "SMTP_USER": "u", "SMTP_PASSWORD": "pw",
      "SMTP_USE_TLS": "false", "SMTP_USE_STARTTLS": "false"}, "SMTP_USER"),
    ({"SMTP_RELAY_COOLDOWN_SECONDS": "half a minute"}, "SMTP_RELAY_COOLDOWN_SECONDS"),
    ({"SMTP_CHUNKING": "perhaps"}, "SMTP_CHUNKING"),
    ({"FORWARDED_ALLOW_IPS": "nginx"}, "FORWARDED_ALLOW_IPS"),
    ({"FORWARDED_ALLOW_IPS": "127.0.0.1,10.0.0.1/8"}, "FORWARDED_ALLOW_IPS"),  # host bits set: a mistake
    # A fallback is checked as the primary is, and named by its own variables.
    ({"SMTP_FALLBACK_1_HOST": "b.example", "SMTP_FALLBACK_1_PORT": "x"}, "SMTP_FALLBACK_1_PORT"),
    ({"SMTP_FALLBACK_1_HOST": "b.example", "SMTP_FALLBACK_1_USE_TLS": "true"}, "SMTP_FALLBACK_1_USE_TLS"),
    ({"SMTP_FALLBACK_1_HOST": "b.example", "SMTP_FALLBACK_1_USER": "u", "SMTP_FALLBACK_1_PASSWORD": "pw",
      "SMTP_FALLBACK_1_USE_STARTTLS": "false"}, "SMTP_FALLBACK_1_USER"),
    ({"SMTP_FALLBACK_1_HOST": "b.example", "SMTP_FALLBACK_1_CA_FILE": "/nonexistent/ca.pem"}, "SMTP_FALLBACK_1_CA_FILE"),
    ({"SMTP_FALLBACK_1_HOST": "b.example\r\nx"}, "SMTP_FALLBACK_1_HOST"),
    ({"SMTP_FALLBACK_1_HOST": "b.example", "SMTP_FALLBACK_1_PASSWORD_FILE": "/nonexistent/pw"},
     "SMTP_FALLBACK_1_PASSWORD_FILE"),
    ({"SMTP_FALLBACK_2_HOST": "c.example"}, "SMTP_FALLBACK_2_HOST"),  # no fallback 1: a gap
    ({"SMTP_FALLBACK_1_PORT": "2525"}, "SMTP_FALLBACK_1_PORT"),  # no host: not silently ignored
    ({"SMTP_FALLBACK_1_HOST": "b.example", "SMTP_FALLBACK_1_USERNAME": "u"}, "SMTP_FALLBACK_1_USERNAME"),
])
def test_bad_value_raises_config_error_naming_the_variable(env, variable):
    with pytest.raises(ConfigError) as exc:
        load_config(env)
    message = str(exc.value)
    assert variable in message and "\n" not in message
    assert "pw" not in message.split()


@pytest.mark.parametrize("store, replicas", [
    ("redis://127.0.0.1", 0), ("rediss://127.0.0.1", 0), ("unix:///run/redis.sock", 0),
    ("redis+sentinel://127.0.0.1/herald", 1), ("rediss+sentinel://127.0.0.1/herald", 1),
    ("redis+cluster://127.0.0.1", 1), ("rediss+cluster://127.0.0.1", 1), ("memory://", 0),
])
def test_wait_replicas_is_on_by_default_where_redis_replicates(store, replicas):
    env = {"IDEMPOTENCY_STORE": store, "WEB_CONCURRENCY": "1"}
    assert load_config(env).idempotency_wait_replicas == replicas
    assert load_config({**env, "IDEMPOTENCY_WAIT_REPLICAS": "0"}).idempotency_wait_replicas == 0
    if store.startswith(("redis", "unix")):
        assert load_config({**env, "IDEMPOTENCY_WAIT_REPLICAS": "2"}).idempotency_wait_replicas == 2


def test_a_ca_file_without_a_certificate_names_the_variable(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^SMTP_CA_FILE: cannot load the file \(no PEM certificate in it\)$"):
        load_config({"SMTP_CA_FILE": str(tmp_path / "ca.pem")})


def test_fallback_relays_take_the_primarys_settings_under_their_own_prefix(tmp_path):
    (tmp_path / "pw").write_text("second-password\n")
    cfg = load_config({
        "SMTP_HOST": "smtp.main.example", "SMTP_HELO_NAME": "mx.example.org",
        "SMTP_FALLBACK_1_HOST": "smtp.second.example", "SMTP_FALLBACK_1_PORT": "465",
        "SMTP_FALLBACK_1_USE_TLS": "true", "SMTP_FALLBACK_1_USE_STARTTLS": "false",
        "SMTP_FALLBACK_1_USER": "second", "SMTP_FALLBACK_1_PASSWORD_FILE": str(tmp_path / "pw"),
        "SMTP_FALLBACK_2_HOST": "127.0.0.1", "SMTP_FALLBACK_2_PORT": "2525", "SMTP_FALLBACK_2_USE_STARTTLS": "false",
        "SMTP_FALLBACK_2_HELO_NAME": "relay.local",
    })
    assert [(r.name, r.host, r.port, r.use_tls, r.use_starttls, r.user, r.password, r.helo_name) for r in cfg.relays] == [
        ("primary", "smtp.main.example", 587, False, True, "", "", "mx.example.org"),
        ("fallback-1", "smtp.second.example", 465, True, False, "second", "second-password", "mx.example.org"),
        ("fallback-2", "127.0.0.1", 2525, False, False, "", "", "relay.local"),
    ]
    assert "second-password" not in repr(cfg)


def test_forwarded_allow_ips_takes_gunicorns_forms():
    cfg = load_config({"FORWARDED_ALLOW_IPS": " 127.0.0.1, 10.0.0.0/8,::1 ,"})
    assert cfg.forwarded_allow_ips == ("127.0.0.1", "10.0.0.0/8", "::1")


def test_bad_value_stops_the_app_factory():
    with pytest.raises(ConfigError, match="SMTP_PORT"):
        create_app({"SMTP_PORT": "abc"})


def test_memory_store_with_one_worker_is_fine():
    assert load_config({"IDEMPOTENCY_STORE": "memory://", "WEB_CONCURRENCY": "1"}).idempotency_store == "memory://"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_credentials_without_tls_are_allowed_to_loopback(host):
    cfg = load_config({"SMTP_HOST": host, "SMTP_USER": "u", "SMTP_PASSWORD": "p", "SMTP_USE_STARTTLS": "false"})
    assert cfg.smtp_user == "u"


def test_api_key_rotation_list():
    assert load_config({"API_KEY": " old-key , new-key ,"}).api_keys == ("old-key", "new-key")


def test_secrets_from_files(tmp_path):
    (tmp_path / "api_key").write_text("file-key-1\nfile-key-2\n")
    (tmp_path / "smtp_password").write_text("file-password\n")
    cfg = load_config({"API_KEY_FILE": str(tmp_path / "api_key"),
                       "SMTP_PASSWORD_FILE": str(tmp_path / "smtp_password")})
    assert cfg.api_keys == ("file-key-1", "file-key-2")
    assert cfg.smtp_password == "file-password"


def test_unreadable_secret_file_names_the_variable_not_the_content(tmp_path):
    with pytest.raises(ConfigError, match="SMTP_PASSWORD_FILE"):
        load_config({"SMTP_PASSWORD_FILE": str(tmp_path / "missing")})


def test_repr_has_no_secrets():
    cfg = load_config({"API_KEY": "api-key-sekrit,second-sekrit", "SMTP_PASSWORD": "smtp-pass-sekrit",
                       "SMTP_HOST": "127.0.0.1", "SMTP_USER": "u"})
    for text in (repr(cfg), str(cfg), f"{cfg!r}"):
        assert "sekrit" not in text
    assert "2 key(s)" in repr(cfg)


def test_gunicorn_with_a_bad_value_exits_with_one_line_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "API_KEY", "IDEMPOTENCY_"))}
    env.update(SMTP_PORT="abc", PORT="127.0.0.1:1")  # never binds: startup stops first
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "SMTP_PORT" in lines[0] and "Traceback" not in lines[0]
