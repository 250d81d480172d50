"""Configuration: parsed once from the environment into an immutable object.

Names and defaults follow the original Go herald-smtp so its `.env` works unchanged.
A bad value raises ConfigError with one line naming the variable; nothing below the
app factory reads os.environ.
"""

import dataclasses
import io
import ipaddress
import os
import re
import tempfile
from typing import Mapping

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from email.errors import HeaderParseError
from email.header import decode_header, make_header

# C0, DEL, C1 and the Unicode line separators: anything a parser might take as a line break.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}


def has_control_chars(value: str) -> bool:
    return _CONTROL.search(value) is not None


class ConfigError(ValueError):
    """A configuration value that stops startup; str() is the one line to print."""


@dataclasses.dataclass(frozen=True)
class Config:
    bind: str = "0.0.0.0:8084"
    api_keys: tuple = ()
    require_api_key: bool = False
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = dataclasses.field(default="", repr=False)
    smtp_from: str = ""
    smtp_from_name: str = ""
    smtp_use_tls: bool = False
    smtp_use_starttls: bool = True
    smtp_skip_tls_verify: bool = False
    smtp_ca_file: str = ""
    smtp_timeout_seconds: float = 30.0
    smtp_max_concurrent_sends: int = 16
    smtp_max_idle_seconds: float = 30.0
    smtp_max_messages_per_connection: int = 100
    smtp_helo_name: str = ""
    log_level: str = "INFO"
    idempotency_store: str = ""
    idempotency_ttl_seconds: int = 300
    idempotency_max_entries: int = 10000
    idempotency_fail_open: bool = False
    http_body_limit_bytes: int = 65536
    http_header_timeout_seconds: float = 10.0
    http_body_timeout_seconds: float = 10.0
    web_concurrency: int = 2
    web_threads: int = 8
    metrics_require_api_key: bool = False
    prometheus_multiproc_dir: str = ""

    def __repr__(self):  # secrets stay out of tracebacks and debug output
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        shown["api_keys"] = f"<{len(self.api_keys)} key(s)>"
        return f"Config({shown})"

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host and self.smtp_from)

    @property
    def idempotency_lease_seconds(self) -> float:
        # A reservation outlives the longest possible send by a margin, so a live
        # owner never loses it, while a killed owner's key frees up soon after.
        return self.smtp_timeout_seconds + 5


def _secret(env: Mapping[str, str], name: str) -> str:
    """NAME, or the contents of the file NAME_FILE (Docker and Kubernetes secrets)."""
    path = env.get(name + "_FILE", "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}_FILE: cannot read the file ({getattr(e, 'strerror', None) or 'not UTF-8'})") from None
        if not value:  # an empty secret must never mean "no password" or "no key"
            raise ConfigError(f"{name}_FILE: the file is empty")
        return value
    return env.get(name, "")


def _api_keys(env: Mapping[str, str]) -> tuple:
    source = "API_KEY_FILE" if env.get("API_KEY_FILE") else "API_KEY"
    keys = tuple(k.strip() for k in re.split(r"[,\n]", _secret(env, "API_KEY")) if k.strip())
    if source == "API_KEY_FILE" and not keys:
        raise ConfigError("API_KEY_FILE: the file holds no key")
    for key in keys:
        # Header values reach us as Latin-1; a key outside printable ASCII could never match.
        if not (key.isascii() and key.isprintable()):
            raise ConfigError(f"{source}: a key has a character outside printable ASCII; it could never match")
    return keys


def environment(env: Mapping[str, str] = None) -> dict:
    """The settings as the service reads them: the env file (`ENV_FILE`, else `.env` in the working
    directory, if there is one; KEY=value lines) with the real environment on top."""
    env = os.environ if env is None else env
    path = env.get("ENV_FILE", "").strip()
    name = "ENV_FILE" if path else ".env"
    try:
        with open(path or ".env", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if path:
            raise ConfigError("ENV_FILE: no such file") from None
        return dict(env)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: cannot read the file ({getattr(e, 'strerror', None) or 'not UTF-8'})") from None
    # python-dotenv skips a line it cannot read (and says so in plain text): a mistyped API_KEY line
    # would quietly leave the service without a key.
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(f"{name}: line {binding.original.line} is not KEY=value")
    values = dotenv_values(stream=io.StringIO(text))
    return {**{k: v for k, v in values.items() if v is not None}, **env}


def _decoded(value: str) -> str:
    """RFC 2047 words decoded; a NUL for words that cannot be, so they are refused too."""
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return "\x00"


def _bool(env, name, default):
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _number(env, name, default, kind=int, minimum=1):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {raw!r}")
    return value


def _bind(raw: str) -> str:
    """PORT as the Go service took it (":8084"), or a bare port, or host:port."""
    raw = raw.strip() or ":8084"
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "", raw
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"PORT: expected a port like :8084, 8084 or 127.0.0.1:8084, got {raw!r}")
    return f"{host or '0.0.0.0'}:{port}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warnings(cfg: Config):
    """(level, line) for each risky but allowed setting: said at every start and by `check`."""
    host = cfg.bind.rpartition(":")[0]
    if not cfg.api_keys and not is_loopback(host):
        yield "error", (f"API_KEY is empty and the service listens on {cfg.bind}, beyond this host: anyone who "
                        "reaches the port can send mail through it (set API_KEY; REQUIRE_API_KEY=true refuses "
                        "to start without one)")
    elif not cfg.api_keys:
        yield "warning", "API_KEY is empty: anyone who can reach the service can send mail through it"
    if cfg.smtp_skip_tls_verify:
        yield "warning", "SMTP_SKIP_TLS_VERIFY is true: the SMTP server's certificate is not checked"
    if not (cfg.smtp_use_tls or cfg.smtp_use_starttls) and cfg.smtp_host and not is_loopback(cfg.smtp_host):
        yield "warning", "TLS is off: mail and codes cross the network in clear"


def default_idempotency_store(env: Mapping[str, str]) -> str:
    # The file holds minutes of keys, so a tmpfs suits it: writes cost less, and it is gone at
    # reboot. systemd's RuntimeDirectory= (under /run) sets RUNTIME_DIRECTORY. Elsewhere a
    # directory of this user's own in /dev/shm (the temp dir without one): a fixed name in a
    # shared directory could be planted by another user.
    directory = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not directory:
        shared = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
        directory = os.path.join(shared, f"herald-smtp-{os.geteuid()}")
    return "sqlite:///" + os.path.join(directory, "herald-smtp-idempotency.sqlite3").lstrip("/")


# The gunicorn master's configuration (load_server_config, run by gunicorn.conf.py at start and at
# each reload). Its workers inherit it through fork, so they serve exactly what the master checked,
# even if a file changed since, and a bad configuration at reload leaves the previous one in force.
_in_force = None


def load_server_config():
    """(Config, None), or at a reload with a bad value (the Config in force, the ConfigError).
    At the first load a bad value raises ConfigError."""
    global _in_force
    try:
        cfg = load_config(environment())
    except ConfigError as e:
        if _in_force is None:
            raise
        return _in_force, e
    _in_force = cfg
    return cfg, None


def server_config() -> Config:
    """What the app serves: the gunicorn master's configuration, else (no master) loaded now."""
    return _in_force or load_config(environment())


def load_config(env: Mapping[str, str] = None) -> Config:
    env = os.environ if env is None else env
    cfg = Config(
        bind=_bind(env.get("PORT", "")),
        api_keys=_api_keys(env),
        require_api_key=_bool(env, "REQUIRE_API_KEY", False),
        smtp_host=env.get("SMTP_HOST", "").strip(),
        smtp_port=_number(env, "SMTP_PORT", 587),
        smtp_user=env.get("SMTP_USER", ""),
        smtp_password=_secret(env, "SMTP_PASSWORD"),
        smtp_from=env.get("SMTP_FROM", "").strip(),
        smtp_from_name=env.get("SMTP_FROM_NAME", "").strip(),
        smtp_use_tls=_bool(env, "SMTP_USE_TLS", False),
        smtp_use_starttls=_bool(env, "SMTP_USE_STARTTLS", True),
        smtp_skip_tls_verify=_bool(env, "SMTP_SKIP_TLS_VERIFY", False),
        smtp_ca_file=env.get("SMTP_CA_FILE", "").strip(),
        smtp_timeout_seconds=_number(env, "SMTP_TIMEOUT_SECONDS", 30.0, float, 0.1),
        smtp_max_concurrent_sends=_number(env, "SMTP_MAX_CONCURRENT_SENDS", 16),
        smtp_max_idle_seconds=_number(env, "SMTP_MAX_IDLE_SECONDS", 30.0, float, 0),
        smtp_max_messages_per_connection=_number(env, "SMTP_MAX_MESSAGES_PER_CONNECTION", 100),
        smtp_helo_name=env.get("SMTP_HELO_NAME", "").strip(),
        log_level=(env.get("LOG_LEVEL", "").strip() or "info").upper(),
        idempotency_store=env.get("IDEMPOTENCY_STORE", "").strip() or default_idempotency_store(env),
        idempotency_ttl_seconds=_number(env, "IDEMPOTENCY_TTL_SECONDS", 300),
        idempotency_max_entries=_number(env, "IDEMPOTENCY_MAX_ENTRIES", 10000),
        idempotency_fail_open=_bool(env, "IDEMPOTENCY_FAIL_OPEN", False),
        http_body_limit_bytes=_number(env, "HTTP_BODY_LIMIT_BYTES", 65536),
        http_header_timeout_seconds=_number(env, "HTTP_HEADER_TIMEOUT_SECONDS", 10.0, float, 0.1),
        http_body_timeout_seconds=_number(env, "HTTP_BODY_TIMEOUT_SECONDS", 10.0, float, 0.1),
        web_concurrency=_number(env, "WEB_CONCURRENCY", 2),
        web_threads=_number(env, "WEB_THREADS", 8),
        metrics_require_api_key=_bool(env, "METRICS_REQUIRE_API_KEY", False),
        prometheus_multiproc_dir=env.get("PROMETHEUS_MULTIPROC_DIR", "").strip(),
    )
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.log_level not in {"DEBUG", "INFO", "WARN", "WARNING", "ERROR"}:
        raise ConfigError(f"LOG_LEVEL: expected debug, info, warn or error, got {cfg.log_level.lower()!r}")
    if cfg.smtp_use_tls and cfg.smtp_use_starttls:
        raise ConfigError("SMTP_USE_TLS and SMTP_USE_STARTTLS are both true: choose implicit TLS or STARTTLS")
    for name in ("SMTP_HOST", "SMTP_FROM", "SMTP_FROM_NAME", "SMTP_USER", "SMTP_HELO_NAME"):
        if has_control_chars(getattr(cfg, name.lower())):
            raise ConfigError(f"{name}: contains a control character")
    # The From header's parser decodes RFC 2047 words in the display name: "=?utf-8?q?Acme=0D=0ABcc..."
    # would write a header line of its own. decode_header finds every word that parser would.
    if "=?" in cfg.smtp_from_name and has_control_chars(_decoded(cfg.smtp_from_name)):
        raise ConfigError("SMTP_FROM_NAME: contains an encoded control character (or an encoded word "
                          "that cannot be decoded)")
    if cfg.smtp_from and not re.fullmatch(r"[^@\s<>\"(),;:]+@[^@\s<>\"(),;:]+", cfg.smtp_from):
        raise ConfigError("SMTP_FROM: expected a plain address like noreply@example.com")
    local, _, domain = cfg.smtp_from.rpartition("@")
    if not local.isascii():  # it would need SMTPUTF8, which the sender does not use
        raise ConfigError("SMTP_FROM: the part before @ must be ASCII (the domain may be internationalised)")
    try:
        domain.encode("idna")
    except UnicodeError:
        raise ConfigError("SMTP_FROM: the domain is not a valid (internationalised) domain name") from None
    if cfg.smtp_ca_file and not os.path.isfile(cfg.smtp_ca_file):
        raise ConfigError("SMTP_CA_FILE: no such file")
    encrypted = cfg.smtp_use_tls or cfg.smtp_use_starttls
    if cfg.smtp_user and not encrypted and cfg.smtp_host and not is_loopback(cfg.smtp_host):
        raise ConfigError("SMTP_USER is set but TLS is off: credentials are only sent over "
                          "STARTTLS or implicit TLS to a non-loopback host")
    if cfg.require_api_key and not cfg.api_keys:
        raise ConfigError("REQUIRE_API_KEY: true, but API_KEY is empty; set a key or API_KEY_FILE")
    if cfg.metrics_require_api_key and not cfg.api_keys:
        raise ConfigError("METRICS_REQUIRE_API_KEY is true but API_KEY is empty: set a key to protect /metrics")
    store = cfg.idempotency_store
    if not store.startswith(("sqlite://", "redis://", "rediss://", "unix://", "memory://", "/")):
        raise ConfigError("IDEMPOTENCY_STORE: expected sqlite:///path, redis://..., rediss://... or memory://")
    if store.startswith("memory://") and cfg.web_concurrency > 1:
        raise ConfigError("IDEMPOTENCY_STORE: memory:// holds for one process only; "
                          "use the default SQLite file or redis:// with WEB_CONCURRENCY > 1")
