"""The Redis forms of IDEMPOTENCY_STORE: one server, a Sentinel-managed master, or a Cluster.

    redis://[[user]:password@]host[:6379][/db][?options]        rediss:// for TLS; unix:///path?db=0
    redis+sentinel://[[user]:password@]host[:26379][,host[:26379]...]/master-name[/db][?options]
    redis+cluster://[[user]:password@]host[:6379][,host[:6379]...][?options]
    rediss+sentinel://... and rediss+cluster://...: TLS to every node (sentinels too)

The user and password are the data nodes' (percent-encoded). Options: ssl_ca_certs, ssl_certfile,
ssl_keyfile (PEM files), ssl_cert_reqs (required, optional, none), ssl_check_hostname (true,
false); for Sentinel, sentinel_username and sentinel_password when the sentinels require their
own. `parse` checks a URL without the redis package; `client` builds the redis-py client.
"""

import dataclasses
import itertools
import os
import re
import threading
import time
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


def client(url: str, **kwargs):
    """A redis-py client for any form; `kwargs` (timeouts, decode_responses, ...) go to every
    connection to a data node. Nothing connects until the first command."""
    import redis

    target = parse(url)
    if target.kind == "server":
        return redis.Redis.from_url(url, **kwargs)
    auth = {"username": target.username or None, "password": target.password or None}
    tls = {"ssl": True, **{k: v for k, v in target.options.items() if k.startswith("ssl_")}} if target.tls else {}
    if target.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        return _LazyCluster(lambda: RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                                                 **auth, **tls, **kwargs),
                            redis.connection.Encoder("utf-8", "strict", kwargs.get("decode_responses", False)))
    from redis.sentinel import Sentinel

    sentinel_kwargs = {"username": target.options.get("sentinel_username") or None,
                       "password": target.options.get("sentinel_password") or None, **tls,
                       **{k: v for k, v in kwargs.items() if k.startswith("socket_")}}
    sentinels = Sentinel(target.nodes, sentinel_kwargs=sentinel_kwargs, db=target.db, **auth, **tls, **kwargs)
    master = sentinels.master_for(target.master)
    _SwitchListener(target, sentinel_kwargs, master.connection_pool).start()
    return master


class _SwitchListener(threading.Thread):
    """Follows the sentinels' +switch-master announcements and moves the pool to the new master
    at once, as go-redis and Jedis do. Otherwise pooled connections keep writing to the old
    master until Sentinel demotes it, on its next look (up to 10 s after a SENTINEL FAILOVER),
    and the new master never sees those writes."""

    def __init__(self, target, sentinel_kwargs, pool):
        super().__init__(name="herald-smtp-sentinel-switch", daemon=True)
        self.target, self.pool = target, pool
        # Blocking reads: a subscription is silent until a failover (TCP keepalive finds a dead peer).
        self.kwargs = {**sentinel_kwargs, "socket_timeout": None}

    def run(self):
        import redis

        for host, port in itertools.cycle(self.target.nodes):
            try:
                with redis.Redis(host, port, **self.kwargs).pubsub(ignore_subscribe_messages=True) as sub:
                    sub.subscribe("+switch-master")
                    self._follow()  # a switch missed while (re)subscribing
                    for message in sub.listen():
                        if message["data"].split()[0].decode() == self.target.master:
                            self._follow()
            except (redis.RedisError, OSError):
                time.sleep(1)  # this sentinel is gone: the next one

    def _follow(self):
        import redis

        try:
            # Asks the sentinels, and if the master moved drops the idle connections; one in use
            # is dropped when it comes back, since the pool no longer owns its address.
            self.pool.get_master_address()
        except redis.RedisError:
            pass  # no master known now: the next command's connect asks again


class _LazyCluster:
    """A RedisCluster made at its first command. RedisCluster reads the cluster's map when it is
    made: a Cluster unreachable at startup must mean 503s until it is back, not workers that
    cannot boot."""

    def __init__(self, make, encoder):
        self._make, self._encoder = make, encoder
        self._cluster = None
        self._lock = threading.Lock()

    def get_encoder(self):
        return self._encoder

    def register_script(self, script):
        from redis.commands.core import Script

        return Script(self, script)  # its commands come back here, and make the cluster then

    def close(self):
        if self._cluster is not None:
            self._cluster.close()

    def __getattr__(self, name):
        with self._lock:
            if self._cluster is None:
                self._cluster = self._make()  # raises (RedisClusterException) until a node answers
        return getattr(self._cluster, name)
