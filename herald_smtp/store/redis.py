"""The Redis store: one server, a Sentinel-managed master or a Cluster, shared by every replica."""

import hashlib
import itertools
import threading
import time
import uuid
from urllib.parse import urlsplit

from .. import redis_url
from .base import DONE, FAILED, FAILED_KEEP_SECONDS, NEW, REPLAY, WAIT, NotReplicated, Record, StoreUnavailable


# Redis: a hash per key (expiring with its record), and two sorted sets of keys by expiry: the
# reservations in flight and the successes, which bound the store (a failure, kept a few seconds
# for its followers, is in neither). Scripts run atomically on the server, with the server's clock.
# All names share one {hash tag}, so on a Redis Cluster a script's keys sit in one slot.
_BEGIN = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'token', 'mid', 'code', 'msg')
if rec[3] == ARGV[2] and rec[2] == 'pending' then return {'new', 0} end  -- this call, retried by the client
if rec[1] and rec[2] ~= 'failed' then
  if rec[1] ~= ARGV[1] then return {'conflict'} end
  if rec[2] == 'done' then return {'replay', rec[1], rec[2], rec[3], rec[4]} end
  return {'wait', rec[1], rec[2], rec[3], ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local pending = redis.call('ZCARD', KEYS[2])
if pending >= tonumber(ARGV[4]) then return {'full'} end
local evicted = 0
local over = pending + redis.call('ZCARD', KEYS[3]) + 1 - tonumber(ARGV[4])
if over > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[3], over)
  for i = 1, #oldest, 2 do redis.call('DEL', oldest[i]) end
  evicted = #oldest / 2
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'pending', 'token', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), KEYS[1])
return {'new', evicted}
"""
_SETTLE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'mid', ARGV[3], 'code', ARGV[4], 'msg', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], KEYS[1])
if ARGV[2] == 'done' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6]), KEYS[1])
end
return 1
"""
_OLDEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {tostring(now), first[2] or ''}
"""


class RedisStore:
    """Shared by every replica. A key's record lives under a hash of the key, so any text is safe.

    With `replicas` (IDEMPOTENCY_WAIT_REPLICAS), a reservation and a completion count only once
    that many replicas have them: Redis's WAIT, sent with the script in one round trip, on the
    connection that wrote (WAIT counts what the replicas have of that connection's writes).
    """

    WAIT_MAX = 1.0  # seconds a write waits for its replicas at most; the send's deadline may cut it shorter
    WAIT_MIN = 0.05  # ...but never below this: WAIT 0 would wait for ever, and a reply takes a moment

    def __init__(self, url: str, max_entries: int, scope: str = "", on_evict=None, replicas: int = 0):
        import redis  # only deployments that choose Redis need the client loaded

        self.max_entries = max_entries
        self.on_evict = on_evict
        self.replicas = replicas
        self.prefix = f"{{herald-smtp:{scope or 'default'}}}:idem:"
        self.pending, self.done = self.prefix + "pending", self.prefix + "done"
        # A Cluster without a node for the slot raises RedisClusterException, no RedisError.
        self._errors = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
        # Worth one more try: a node without our scripts, a slot that moved (MovedError is an
        # AskError), a dropped connection.
        self._noscript = redis.exceptions.NoScriptError
        self._reply_error = redis.exceptions.ResponseError
        self._retry = (self._noscript, redis.exceptions.AskError, redis.ConnectionError)
        self.client = client(url, socket_timeout=5, socket_connect_timeout=3,
                             health_check_interval=30, decode_responses=True)
        self._cluster = redis_url.parse(url).kind == "cluster"
        self._begin = self.client.register_script(_BEGIN)
        self._settle_script = self.client.register_script(_SETTLE)
        self._oldest = self.client.register_script(_OLDEST)
        self.description = f"redis {urlsplit(url).hostname or 'socket'}"

    def _name(self, key):
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()

    def _node(self, name):
        """The client of the node that holds `name`: on a Cluster, that node's own, since WAIT
        has no key to route it by and must go down the connection that wrote."""
        if self._cluster:
            return self.client.get_redis_connection(self.client.get_node_from_key(name))
        return self.client

    def confirming_replicas(self) -> int:
        """How many replicas confirm a write within WAIT_MAX, now (`check` asks)."""
        name = self.prefix + "check"
        commands = [("SET", name, "1", "PX", 1000), ("WAIT", max(self.replicas, 1), int(self.WAIT_MAX * 1000))]
        try:
            replies = self._round_trip(self._node(name), commands)  # as a send's writes go
        except self._errors as e:
            raise StoreUnavailable(type(e).__name__) from None
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable(type(reply).__name__)
        return replies[1]

    def _write(self, script, keys, args, deadline=None, replicate=True):
        """Run a script on the node that holds its keys: its reply, and whether `replicas`
        replicas confirmed it (True without WAIT)."""
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args)]
        if self.replicas and replicate:
            left = self.WAIT_MAX if deadline is None else deadline - time.monotonic()
            commands.append(("WAIT", self.replicas, int(max(self.WAIT_MIN, min(left, self.WAIT_MAX)) * 1000)))
        for attempt in range(2):
            node = self._node(keys[0])
            try:
                replies = self._round_trip(node, commands)
            except self._retry as e:
                replies = [e]
            if attempt == 0 and isinstance(replies[0], self._retry):
                if isinstance(replies[0], self._noscript):
                    node.script_load(script.script)  # a restarted or new node: load it and run it again
                elif self._cluster:
                    self.client.nodes_manager.initialize()  # the slot moved (MOVED, ASK) or its node is gone
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies[0], len(replies) == 1 or replies[1] >= self.replicas

    def _round_trip(self, node, commands):
        """The commands in one write down one pooled connection, and their replies (an error
        reply as its exception). redis-py's Pipeline does the same with more bookkeeping per
        call, which this store pays twice per send."""
        pool = node.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except self._reply_error as e:
                    replies.append(e)
            return replies
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)

    def begin(self, key, fp, lease, deadline=None):
        token, name = uuid.uuid4().hex, self._name(key)
        try:
            res, replicated = self._write(self._begin, [name, self.pending, self.done],
                                          [fp, token, int(lease * 1000), self.max_entries], deadline)
        except self._errors as e:
            raise StoreUnavailable(type(e).__name__) from None
        if res[0] in (REPLAY, WAIT):
            return res[0], Record(res[1], res[2], res[3], res[4] or ""), None
        if res[0] == NEW and res[1] and self.on_evict:
            self.on_evict(res[1])
        if res[0] == NEW and not replicated:
            # A failover could forget this reservation and let a retry send a second copy: no send.
            # Released as failed, so requests waiting on it answer the same and a retry sends.
            try:
                self._settle(key, token, FAILED, FAILED_KEEP_SECONDS, code="provider_down",
                             msg="idempotency store not replicated; not sending unprotected", replicate=False)
            except self._errors:
                pass  # the lease frees it
            raise NotReplicated(f"no replica confirmed the reservation within {self.WAIT_MAX:g} s")
        return res[0], None, token if res[0] == NEW else None

    def get(self, key):
        try:
            h = self.client.hgetall(self._name(key))
        except self._errors as e:
            raise StoreUnavailable(type(e).__name__) from None
        if not h:
            return None
        return Record(h["fp"], h["state"], h["token"], h.get("mid", ""), h.get("code", ""), h.get("msg", ""))

    def _settle(self, key, token, state, keep, mid="", code="", msg="", deadline=None, replicate=True):
        return self._write(self._settle_script, [self._name(key), self.pending, self.done],
                           [token, state, mid, code, msg, int(keep * 1000)], deadline, replicate)[1]

    def complete(self, key, token, message_id, ttl, deadline=None):
        # Until a replica has it, a failover could forget the success. The master may be failing
        # over right now: while the deadline allows, write it again (to the new master, once the
        # client finds it; the script is the same for a second run).
        while True:
            try:
                if self._settle(key, token, DONE, ttl, mid=message_id, deadline=deadline):
                    return
                error = NotReplicated("no replica confirmed the completion")
            except self._errors as e:
                error = e
            if deadline is None or time.monotonic() + self.WAIT_MIN >= deadline:
                raise error
            time.sleep(self.WAIT_MIN)

    def fail(self, key, token, code, message):
        # Failures are not remembered beyond a few seconds: nothing to wait for.
        self._settle(key, token, FAILED, FAILED_KEEP_SECONDS, code=code, msg=message, replicate=False)

    def oldest_success_age(self, ttl):
        """Seconds since the oldest success still remembered was recorded (0: none), by Redis's clock."""
        now, expires = self._oldest(keys=[self.done])
        return max(0.0, (int(now) - float(expires)) / 1000 + ttl) if expires else 0.0

    def close(self):
        self.client.close()


def client(url: str, **kwargs):
    """A redis-py client for any form; `kwargs` (timeouts, decode_responses, ...) go to every
    connection to a data node. Nothing connects until the first command."""
    import redis

    target = redis_url.parse(url)
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
