"""Configuration: parsed once from the environment into an immutable object.

Names and defaults follow the original Go herald-smtp so its `.env` works unchanged.
A bad value raises ConfigError with one line naming the variable; nothing below the
app factory reads os.environ.
"""

import dataclasses
import hashlib
import io
import ipaddress
import os
import re
import ssl
import tempfile
from typing import Mapping
from urllib.parse import urlsplit

from . import redis_url

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from email.errors import HeaderParseError
from email.header import decode_header, make_header

# C0, DEL, C1 and the Unicode line separators: anything a parser might take as a line break.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}
# The IDEMPOTENCY_STORE forms whose Redis replicates by design: IDEMPOTENCY_WAIT_REPLICAS is 1 there.
REPLICATED_SCHEMES = ("redis+sentinel://", "rediss+sentinel://", "redis+cluster://", "rediss+cluster://")


def has_control_chars(value: str) -> bool:
    return _CONTROL.search(value) is not None


class ConfigError(ValueError):
    """A configuration value that stops startup; str() is the one line to print."""


@dataclasses.dataclass(frozen=True)
class Relay:
    """One SMTP server to send through: the primary (SMTP_*) or a fallback (SMTP_FALLBACK_<n>_*)."""
    name: str  # what logs, metrics and `check` call it: "primary", "fallback-1", ...
    prefix: str  # its variables' common prefix, for configuration errors: "SMTP_", "SMTP_FALLBACK_1_"
    host: str
    port: int = 587
    user: str = ""
    password: str = dataclasses.field(default="", repr=False)
    use_tls: bool = False
    use_starttls: bool = True
    skip_tls_verify: bool = False
    ca_file: str = ""
    helo_name: str = ""


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
    smtp_fallbacks: tuple = ()  # Relays tried when the primary cannot take a mail
    smtp_relay_cooldown_seconds: float = 30.0
    smtp_chunking: bool = True
    log_level: str = "INFO"
    idempotency_store: str = ""
    idempotency_ttl_seconds: int = 300
    idempotency_max_entries: int = 1_200_000
    idempotency_fail_open: bool = False
    idempotency_wait_replicas: int = 0  # replicas that must have a key's records before it counts (Redis WAIT)
    http_body_limit_bytes: int = 65536
    http_header_timeout_seconds: float = 10.0
    http_body_timeout_seconds: float = 10.0
    web_concurrency: int = 2
    web_threads: int = 8
    metrics_require_api_key: bool = False
    forwarded_allow_ips: tuple = ()  # proxies whose X-Forwarded-* headers are believed (gunicorn's forwarded_allow_ips)
    otlp_enabled: bool = False
    otlp_endpoint: str = ""  # the collector's full traces URL (.../v1/traces)
    prometheus_multiproc_dir: str = ""

    def __repr__(self):  # secrets stay out of tracebacks and debug output
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        shown["api_keys"] = f"<{len(self.api_keys)} key(s)>"
        shown["idempotency_store"] = redis_url.redacted(self.idempotency_store)
        return f"Config({shown})"

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host and self.smtp_from)

    @property
    def relays(self) -> tuple:
        """The primary, then the fallbacks, in the order they are tried."""
        primary = Relay("primary", "SMTP_", self.smtp_host, self.smtp_port, self.smtp_user, self.smtp_password,
                        self.smtp_use_tls, self.smtp_use_starttls, self.smtp_skip_tls_verify, self.smtp_ca_file,
                        self.smtp_helo_name)
        return (primary, *self.smtp_fallbacks)

    @property
    def idempotency_lease_seconds(self) -> float:
        # A send is over by its deadline (enforced on every byte) plus the moment it takes to
        # answer; the lease outlives that by a wide margin, so a live owner never loses its key,
        # while a killed owner's key frees up soon after.
        return self.smtp_timeout_seconds + 5

    @property
    def sender_scope(self) -> str:
        """Names the sending identity (SMTP host, port, user and SMTP_FROM): what one deployment
        remembers under a key, another with another identity never sees."""
        identity = "\0".join((self.smtp_host.lower(), str(self.smtp_port), self.smtp_user, self.smtp_from.lower()))
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


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


_RELAY_SETTINGS = ("HOST", "PORT", "USER", "PASSWORD", "PASSWORD_FILE", "USE_TLS", "USE_STARTTLS",
                   "SKIP_TLS_VERIFY", "CA_FILE", "HELO_NAME")


def _fallbacks(env: Mapping[str, str], helo_name: str) -> tuple:
    """SMTP_FALLBACK_1_HOST, SMTP_FALLBACK_2_HOST, ...: each with the primary's settings under its
    prefix and the same defaults. A setting for a fallback that is not there is an error, not ignored."""
    relays = []
    while env.get(f"SMTP_FALLBACK_{len(relays) + 1}_HOST", "").strip():
        n = len(relays) + 1
        p = f"SMTP_FALLBACK_{n}_"
        relays.append(Relay(
            f"fallback-{n}", p, env[p + "HOST"].strip(), _number(env, p + "PORT", 587), env.get(p + "USER", ""),
            _secret(env, p + "PASSWORD"), _bool(env, p + "USE_TLS", False), _bool(env, p + "USE_STARTTLS", True),
            _bool(env, p + "SKIP_TLS_VERIFY", False), env.get(p + "CA_FILE", "").strip(),
            env.get(p + "HELO_NAME", "").strip() or helo_name))
    for name in sorted(env):
        match = re.fullmatch(r"SMTP_FALLBACK_(\d+)_(.*)", name)
        if not match or not env[name].strip():
            continue
        if match.group(2) not in _RELAY_SETTINGS:
            raise ConfigError(f"{name}: not a setting; a fallback takes {', '.join(_RELAY_SETTINGS)}")
        if int(match.group(1)) > len(relays):
            raise ConfigError(f"{name}: set, but SMTP_FALLBACK_{match.group(1)}_HOST is empty "
                              "(fallbacks are numbered from 1, without gaps)")
    return tuple(relays)


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


def _addresses(env, name) -> tuple:
    """A comma-separated list of IP addresses and networks (CIDR), or `*`, as gunicorn takes it."""
    items = tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())
    for item in items:
        try:
            if item != "*":
                ipaddress.ip_network(item)  # strict, as gunicorn: 10.0.0.1/8 is a mistake, not 10.0.0.0/8
        except ValueError:
            raise ConfigError(f"{name}: expected IP addresses or networks like 127.0.0.1,10.0.0.0/8, got {item!r}") from None
    return items


def _otlp_endpoint(raw: str) -> str:
    """OTLP_ENDPOINT as Herald takes it (http://collector:4318, or host:port) -> the traces URL."""
    raw = raw.strip()
    if not raw:
        return ""
    url = urlsplit(raw if "://" in raw else "http://" + raw)
    try:
        url.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname or has_control_chars(raw):
        # The value is not echoed: a collector URL may carry a token.
        raise ConfigError("OTLP_ENDPOINT: expected the collector's OTLP/HTTP URL, like http://otel-collector:4318")
    path = url.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"  # the base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it
    return url._replace(path=path).geturl()


def warnings(cfg: Config):
    """(level, line) for each risky but allowed setting: said at every start and by `check`."""
    host = cfg.bind.rpartition(":")[0]
    if not cfg.api_keys and not is_loopback(host):
        yield "error", (f"API_KEY is empty and the service listens on {cfg.bind}, beyond this host: anyone who "
                        "reaches the port can send mail through it (set API_KEY; REQUIRE_API_KEY=true refuses "
                        "to start without one)")
    elif not cfg.api_keys:
        yield "warning", "API_KEY is empty: anyone who can reach the service can send mail through it"
    if "*" in cfg.forwarded_allow_ips:
        yield "warning", ("FORWARDED_ALLOW_IPS is *: every peer is taken for a proxy, so any client can write the "
                          "address the access log shows for it")
    for relay in cfg.relays:
        server = "the SMTP server's" if relay.name == "primary" else f"{relay.name}'s"
        if relay.skip_tls_verify:
            yield "warning", f"{relay.prefix}SKIP_TLS_VERIFY is true: {server} certificate is not checked"
        if not (relay.use_tls or relay.use_starttls) and relay.host and not is_loopback(relay.host):
            yield "warning", (f"TLS is off{'' if relay.name == 'primary' else ' to ' + relay.name}: mail and codes "
                              "cross the network in clear")


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


def reloading() -> bool:
    """True once the master has a configuration in force: a load now is a reload (SIGHUP)."""
    return _in_force is not None


def server_config() -> Config:
    """What the app serves: the gunicorn master's configuration, else (no master) loaded now."""
    return _in_force or load_config(environment())


def load_config(env: Mapping[str, str] = None) -> Config:
    env = os.environ if env is None else env
    store = _secret(env, "IDEMPOTENCY_STORE").strip() or default_idempotency_store(env)
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
        smtp_fallbacks=_fallbacks(env, env.get("SMTP_HELO_NAME", "").strip()),
        smtp_relay_cooldown_seconds=_number(env, "SMTP_RELAY_COOLDOWN_SECONDS", 30.0, float, 0),
        smtp_chunking=_bool(env, "SMTP_CHUNKING", True),
        log_level=(env.get("LOG_LEVEL", "").strip() or "info").upper(),
        idempotency_store=store,
        idempotency_ttl_seconds=_number(env, "IDEMPOTENCY_TTL_SECONDS", 300),
        # Ten minutes of new keys at 2000 a second, above the most this service has been measured to
        # take on one host: the default TTL's 5 minutes of keys always fit, with room to spare.
        idempotency_max_entries=_number(env, "IDEMPOTENCY_MAX_ENTRIES", 1_200_000),
        idempotency_fail_open=_bool(env, "IDEMPOTENCY_FAIL_OPEN", False),
        # On by default where Redis replicates (Sentinel, Cluster): a failover must not forget an
        # answered key. A plain redis:// server may have replicas too; then set it.
        idempotency_wait_replicas=_number(env, "IDEMPOTENCY_WAIT_REPLICAS",
                                          1 if store.startswith(REPLICATED_SCHEMES) else 0, minimum=0),
        http_body_limit_bytes=_number(env, "HTTP_BODY_LIMIT_BYTES", 65536),
        http_header_timeout_seconds=_number(env, "HTTP_HEADER_TIMEOUT_SECONDS", 10.0, float, 0.1),
        http_body_timeout_seconds=_number(env, "HTTP_BODY_TIMEOUT_SECONDS", 10.0, float, 0.1),
        web_concurrency=_number(env, "WEB_CONCURRENCY", 2),
        web_threads=_number(env, "WEB_THREADS", 8),
        metrics_require_api_key=_bool(env, "METRICS_REQUIRE_API_KEY", False),
        forwarded_allow_ips=_addresses(env, "FORWARDED_ALLOW_IPS"),
        otlp_enabled=_bool(env, "OTLP_ENABLED", False),
        otlp_endpoint=_otlp_endpoint(env.get("OTLP_ENDPOINT", "")),
        prometheus_multiproc_dir=env.get("PROMETHEUS_MULTIPROC_DIR", "").strip(),
    )
    _check(cfg)
    return cfg


def _check_relay(relay: Relay) -> None:
    p = relay.prefix
    if relay.use_tls and relay.use_starttls:
        raise ConfigError(f"{p}USE_TLS and {p}USE_STARTTLS are both true: choose implicit TLS or STARTTLS")
    for name in ("HOST", "USER", "HELO_NAME"):
        if has_control_chars(getattr(relay, name.lower())):
            raise ConfigError(f"{p}{name}: contains a control character")
    if relay.ca_file:
        try:  # loaded now, so a wrong file stops startup here rather than in every worker
            ssl.create_default_context().load_verify_locations(cafile=relay.ca_file)
        except OSError as e:
            reason = e.strerror if not isinstance(e, ssl.SSLError) else "no PEM certificate in it"
            raise ConfigError(f"{p}CA_FILE: cannot load the file ({reason})") from None
    encrypted = relay.use_tls or relay.use_starttls
    if relay.user and not encrypted and relay.host and not is_loopback(relay.host):
        raise ConfigError(f"{p}USER is set but TLS is off: credentials are only sent over "
                          "STARTTLS or implicit TLS to a non-loopback host")


def _check(cfg: Config) -> None:
    if cfg.log_level not in {"DEBUG", "INFO", "WARN", "WARNING", "ERROR"}:
        raise ConfigError(f"LOG_LEVEL: expected debug, info, warn or error, got {cfg.log_level.lower()!r}")
    for name in ("SMTP_FROM", "SMTP_FROM_NAME"):
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
    for relay in cfg.relays:
        _check_relay(relay)
    if cfg.require_api_key and not cfg.api_keys:
        raise ConfigError("REQUIRE_API_KEY: true, but API_KEY is empty; set a key or API_KEY_FILE")
    if cfg.metrics_require_api_key and not cfg.api_keys:
        raise ConfigError("METRICS_REQUIRE_API_KEY is true but API_KEY is empty: set a key to protect /metrics")
    if cfg.otlp_enabled and not cfg.otlp_endpoint:
        raise ConfigError("OTLP_ENABLED is true but OTLP_ENDPOINT is empty: set the collector's URL, "
                          "like http://otel-collector:4318")
    store = cfg.idempotency_store
    if not store.startswith(("sqlite://", "memory://", "/", *redis_url.SCHEMES)):
        raise ConfigError("IDEMPOTENCY_STORE: expected sqlite:///path, redis://..., redis+sentinel://..., "
                          "redis+cluster://... (rediss for TLS) or memory://")
    if store.startswith(redis_url.SCHEMES):
        try:
            redis_url.parse(store)
        except ValueError as e:
            raise ConfigError(f"IDEMPOTENCY_STORE: {e}") from None
    if cfg.idempotency_wait_replicas and not store.startswith(redis_url.SCHEMES):
        raise ConfigError("IDEMPOTENCY_WAIT_REPLICAS: only a Redis IDEMPOTENCY_STORE has replicas to wait for; "
                          "set it to 0 or leave it empty")
    if store.startswith("memory://") and cfg.web_concurrency > 1:
        raise ConfigError("IDEMPOTENCY_STORE: memory:// holds for one process only; "
                          "use the default SQLite file or redis:// with WEB_CONCURRENCY > 1")
