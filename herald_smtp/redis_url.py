"""The Redis forms of IDEMPOTENCY_STORE: one server, a Sentinel-managed master, or a Cluster.

    redis://[[user]:password@]host[:6379][/db][?options]        rediss:// for TLS; unix:///path?db=0
    redis+sentinel://[[user]:password@]host[:26379][,host[:26379]...]/master-name[/db][?options]
    redis+cluster://[[user]:password@]host[:6379][,host[:6379]...][?options]
    rediss+sentinel://... and rediss+cluster://...: TLS to every node (sentinels too)

The user and password are the data nodes' (percent-encoded). Options: ssl_ca_certs, ssl_certfile,
ssl_keyfile (PEM files), ssl_cert_reqs (required, optional, none), ssl_check_hostname (true,
false); for Sentinel, sentinel_username and sentinel_password when the sentinels require their
own. `parse` checks a URL without the redis package (config uses it); herald_smtp/store/redis.py
builds the redis-py client for each form.
"""

import dataclasses
import os
import re
from urllib.parse import parse_qsl, unquote, urlsplit

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://",
           "redis+cluster://", "rediss+cluster://")
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_OPTIONS = {*_TLS_FILES, "ssl_cert_reqs", "ssl_check_hostname", "db"}
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password"}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NODE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d{1,5}))?")


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str  # "server", "sentinel" or "cluster"
    nodes: tuple = ()  # (host, port) of the sentinels or the cluster's seed nodes
    master: str = ""  # the Sentinel master (service) name
    db: int = 0
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)
    tls: bool = False
    options: dict = dataclasses.field(default_factory=dict, repr=False)


def parse(url: str) -> Target:
    """Check a Redis IDEMPOTENCY_STORE; ValueError says what is wrong (never the password)."""
    scheme, _, rest = url.partition("://")
    if url.startswith(("redis://", "rediss://", "unix://")):
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise ValueError("expected a port number after the host") from None
        return Target("server", tls=scheme == "rediss", options=_options(parts.query, _OPTIONS, scheme == "rediss"))
    if not url.startswith(SCHEMES):
        raise ValueError("expected redis://, rediss://, redis+sentinel://, redis+cluster:// (or rediss+...)")
    kind = scheme.partition("+")[2]
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_node(n, 26379 if kind == "sentinel" else 6379) for n in hosts.split(","))
    known = _OPTIONS | (_SENTINEL_OPTIONS if kind == "sentinel" else set())
    options = _options(query, known, scheme.startswith("rediss"))
    segments = [unquote(s) for s in path.split("/") if s]
    master, db = "", options.pop("db", 0)
    if kind == "sentinel":
        if not segments:
            raise ValueError("redis+sentinel:// needs the master's name: redis+sentinel://host:26379/mymaster")
        master = segments.pop(0)
    if segments:
        if kind == "cluster" or len(segments) > 1 or not segments[0].isdigit():
            raise ValueError("after the hosts, expected " + ("nothing (a Cluster has database 0 only)"
                                                             if kind == "cluster" else "/master-name[/db]"))
        db = int(segments[0])
    return Target(kind, nodes, master, int(db), unquote(username), unquote(password), scheme.startswith("rediss"),
                  options)


def _node(text: str, default_port: int):
    m = _NODE.fullmatch(text.strip())
    if m is None or (m["port"] and not 0 < int(m["port"]) < 65536):
        raise ValueError("expected host:port addresses separated by commas")
    return m["v6"] or m["host"], int(m["port"] or default_port)


def _options(query: str, known: set, tls: bool) -> dict:
    options = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            raise ValueError(f"unknown option {name!r} (known: {', '.join(sorted(known))})")
        if name.startswith("ssl_") and not tls:
            raise ValueError(f"{name} is a TLS option: use rediss://, rediss+sentinel:// or rediss+cluster://")
        if name in _TLS_FILES and not os.path.isfile(value):
            raise ValueError(f"{name}: no such file")
        if name == "ssl_cert_reqs" and value not in ("required", "optional", "none"):
            raise ValueError("ssl_cert_reqs: expected required, optional or none")
        if name == "ssl_check_hostname":
            if value.lower() not in _BOOLEANS:
                raise ValueError("ssl_check_hostname: expected true or false")
            value = _BOOLEANS[value.lower()]
        if name == "db":
            if not value.isdigit():
                raise ValueError("db: expected a whole number")
            value = int(value)
        options[name] = value
    return options


def redacted(url: str) -> str:
    """The URL with any password replaced, for repr and logs."""
    url = re.sub(r"(://[^/@?]*?:)[^/@?]*@", r"\1***@", url)
    return re.sub(r"((?:^|[?&])sentinel_password=)[^&]*", r"\1***", url)
