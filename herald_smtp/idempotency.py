"""Idempotency store: one key, one email, whichever worker or replica a request reaches.

A record moves pending -> done (remembered for the TTL, replayed) or pending -> failed (kept
only briefly, so requests already waiting on it return the same error; a new request with the
key sends again). A pending record carries a lease: if its owner dies, the key frees up.
A full store never stops new mail: a new key evicts the oldest settled records; only when
records in flight alone fill it is a new key refused.
Backends, chosen by IDEMPOTENCY_STORE: a SQLite file shared by the workers of one host (the
default), Redis for several replicas, memory for a single process. Each keeps the keys of one
sending identity (`scope`) apart from another's.
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from urllib.parse import urlsplit

from . import redis_url
from .config import ConfigError
from .errors import SendError

log = logging.getLogger("herald_smtp.idempotency")

PENDING, DONE, FAILED = "pending", "done", "failed"
NEW, REPLAY, CONFLICT, WAIT, FULL = "new", "replay", "conflict", "wait", "full"
FAILED_KEEP_SECONDS = 10  # long enough for every waiting follower to see the owner's error
EVICTION_WARNING_EVERY = 60  # seconds between warnings while a full store evicts


class StoreUnavailable(Exception):
    """The store could not be reached; the caller answers 503 rather than send unprotected."""


@dataclasses.dataclass
class Record:
    fingerprint: str
    state: str
    token: str
    message_id: str = ""
    error_code: str = ""
    error_message: str = ""


def fingerprint(parts: dict) -> str:
    """Hash of every field that changes the email; the key itself is not part of it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def decide(rec, fp: str) -> str:
    """What an existing live record means for a new request with fingerprint `fp`."""
    if rec is None or rec.state == FAILED:
        return NEW
    if rec.fingerprint != fp:
        return CONFLICT
    return REPLAY if rec.state == DONE else WAIT


def run_once(store, key, fp, deadline, send, lease, ttl):
    """Send at most once per key: the first caller sends, concurrent callers wait for it.

    Returns (message_id, replayed). `send()` returns the message id or raises SendError.
    """
    delay = 0.005
    while True:
        outcome, rec, token = store.begin(key, fp, lease)
        if outcome == NEW:
            try:
                message_id = send()
            except SendError as err:
                _quietly(store.fail, key, token, err.code, err.message)
                raise
            except BaseException:
                _quietly(store.fail, key, token, "send_failed", "internal error")
                raise
            try:
                store.complete(key, token, message_id, ttl)
            except Exception as e:
                # The mail went out: the answer stays 200. The record stays pending, so a retry
                # waits for it until its lease ends, and after that sends again.
                log.error("idempotency record not saved: a retry of this key after its lease will send again",
                          extra={"fields": {"idempotency_key": key, "error": type(e).__name__}})
            return message_id, False
        if outcome == REPLAY:
            return rec.message_id, True
        if outcome == CONFLICT:
            raise SendError("idempotency_conflict", "this Idempotency-Key was already used for a different message")
        if outcome == FULL:
            raise SendError("rate_limited", "idempotency store is full; retry later")
        # WAIT: another request holds the key; follow it until it settles.
        while True:
            if time.monotonic() + delay >= deadline:
                raise SendError("timeout", "an earlier request with this Idempotency-Key is still sending")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
            try:
                cur = store.get(key)
            except StoreUnavailable:
                # Another request holds the key and may be sending: a 503 beats a second email,
                # IDEMPOTENCY_FAIL_OPEN or not.
                raise SendError("provider_down", "idempotency store unavailable while an earlier request "
                                "with this Idempotency-Key was sending") from None
            if cur is None or cur.token != rec.token:
                break  # the lease ran out or another owner took over: start again
            if cur.state == DONE:
                return cur.message_id, True
            if cur.state == FAILED:
                raise SendError(cur.error_code, cur.error_message)


def _quietly(fn, *args):
    # The outcome is already decided by the SMTP server; a store hiccup must not change
    # the answer (a 500 here would make Herald retry a mail that was sent).
    try:
        fn(*args)
    except Exception as e:
        log.warning("idempotency store update failed", extra={"fields": {"error": type(e).__name__}})


def sqlite_path(url: str):
    """The file of a SQLite IDEMPOTENCY_STORE (sqlite:///path or a bare path); None for the others."""
    if url.startswith(("memory://", *redis_url.SCHEMES)):
        return None
    return url[len("sqlite://"):] if url.startswith("sqlite://") else url


def open_store(url: str, max_entries: int, scope: str = "", on_evict=None):
    """The store IDEMPOTENCY_STORE names, for the sending identity `scope`. `on_evict(n)` is
    told of every n settled records evicted to make room (see Evictions)."""
    path = sqlite_path(url)
    if path is not None:
        return SQLiteStore(path, max_entries, scope, on_evict)
    if url.startswith("memory://"):
        return MemoryStore(max_entries, on_evict)
    return RedisStore(url, max_entries, scope, on_evict)


class Evictions:
    """What a store calls when it evicts: counts them (the metric) and, while they go on, warns
    at most once a minute, since each eviction shortens how long replays are remembered."""

    def __init__(self, count=None):
        self.count = count
        self._warned, self._since = -EVICTION_WARNING_EVERY, 0

    def __call__(self, n: int) -> None:
        if self.count:
            self.count(n)
        self._since += n
        now = time.monotonic()
        if now - self._warned >= EVICTION_WARNING_EVERY:
            self._warned, evicted, self._since = now, self._since, 0
            log.warning("idempotency store full: evicting the oldest settled keys, so replays are remembered "
                        "for less than IDEMPOTENCY_TTL_SECONDS; raise IDEMPOTENCY_MAX_ENTRIES",
                        extra={"fields": {"evicted": evicted}})


class MemoryStore:
    """One process only (config refuses it with more than one worker). Records in reservation
    order, so the oldest are found first, for expiry and for eviction."""

    def __init__(self, max_entries: int, on_evict=None):
        self.max_entries = max_entries
        self.on_evict = on_evict
        self._records = collections.OrderedDict()  # key -> (Record, expires_at)
        self._lock = threading.Lock()

    def _live(self, key, now):
        item = self._records.get(key)
        if item and item[1] <= now:
            del self._records[key]
            return None
        return item[0] if item else None

    def begin(self, key, fp, lease):
        evicted = 0
        with self._lock:
            now = time.monotonic()
            rec = self._live(key, now)
            outcome = decide(rec, fp)
            if outcome != NEW:
                return outcome, rec, None
            self._records.pop(key, None)  # a failed record: the new reservation goes in as the newest
            while self._records and next(iter(self._records.values()))[1] <= now:
                self._records.popitem(last=False)
            if len(self._records) >= self.max_entries:
                settled = (k for k, (r, _) in self._records.items() if r.state != PENDING)  # oldest first
                for k in list(itertools.islice(settled, len(self._records) - self.max_entries + 1)):
                    del self._records[k]
                    evicted += 1
                if len(self._records) >= self.max_entries:
                    return FULL, None, None
            token = uuid.uuid4().hex
            self._records[key] = (Record(fp, PENDING, token), now + lease)
        if evicted and self.on_evict:
            self.on_evict(evicted)
        return NEW, None, token

    def get(self, key):
        with self._lock:
            rec = self._live(key, time.monotonic())
            return dataclasses.replace(rec) if rec else None

    def _settle(self, key, token, keep, **changes):
        with self._lock:
            rec = self._live(key, time.monotonic())
            if rec and rec.token == token:
                self._records[key] = (dataclasses.replace(rec, **changes), time.monotonic() + keep)

    def complete(self, key, token, message_id, ttl):
        self._settle(key, token, ttl, state=DONE, message_id=message_id)

    def fail(self, key, token, code, message):
        self._settle(key, token, FAILED_KEEP_SECONDS, state=FAILED, error_code=code, error_message=message)

    def oldest_success_age(self, ttl):
        """Seconds since the oldest success still remembered was recorded (0: none)."""
        with self._lock:
            now = time.monotonic()
            expiries = [exp for rec, exp in self._records.values() if rec.state == DONE and exp > now]
        return max(0.0, now - (min(expiries) - ttl)) if expiries else 0.0

    def close(self):
        pass


def _refuse_shared_temp_dir(directory: str) -> None:
    """In a directory anyone can write (/tmp, /dev/shm) anyone can create ours first: use it
    only if no one else can write it."""
    if not os.stat(os.path.dirname(os.path.abspath(directory))).st_mode & 0o002:
        return
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"IDEMPOTENCY_STORE: {directory} belongs to another user or others can write it; "
                          "remove it or set IDEMPOTENCY_STORE to a private path")


def _boot_id() -> str:
    """This boot of the machine (and of its containers): time.monotonic() starts again at boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class SQLiteStore:
    """A file every worker of one host shares; WAL lets readers run beside the one writer.

    Laid out for few, small writes, since each costs six file locks and whole WAL pages:
    - A new key is one plain INSERT, its completion one UPDATE. Rows go in rowid order (a unique
      index finds a key), so both land on the newest page, and the oldest rows come first:
      expiry deletes from the bottom, and a full store evicts its oldest settled rows there.
    - There is no expiry index and no row counter to keep up: rows are counted only when the
      rowids given out since the last count could have filled the store.
    - One connection per process, one statement at a time: its threads queue on a lock, and a
      statement that finds another process writing looks again within 100 us rather than
      sleeping in SQLite's busy handler, which sleeps whole milliseconds.
    - Times are time.monotonic(), which every process of the host shares and no clock step
      moves, so a lease never ends early. The file records the boot and the wall clock's offset;
      opened after a reboot, it converts its times and forgets the reservations (their owners
      are gone).
    """

    PURGE_EVERY = 1.0  # seconds between deletions of the expired rows at the bottom
    BUSY_TIMEOUT = 10.0  # seconds a statement waits for other processes' writes
    EVICT_SHARE = 10  # a full store evicts down to (1 - 1/EVICT_SHARE) of its capacity at a time
    LEGACY_TABLES = ("idempotency", "idempotency_keys")  # earlier layouts, times on the wall clock

    def __init__(self, path: str, max_entries: int, scope: str = "", on_evict=None):
        self.path = path
        self.max_entries = max_entries
        self.on_evict = on_evict
        self.table = f"idempotency_{scope or 'default'}"
        if not self.table.isidentifier():
            raise ValueError(f"scope {scope!r} cannot name a table")
        self._lock = threading.Lock()  # this process's connection: one statement at a time
        self._conn, self._pid = None, None
        self._next_purge = 0.0
        # Rows at the last count, and the rowid given out then: no more rows can be there now
        # than that count plus every rowid given out since. (0, 0): count at the first insert.
        self._count = self._counted_at = 0
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            _refuse_shared_temp_dir(directory)
        with self._lock:
            db = self._connect()
            # WAL is a property of the file, set once (workers opening a new file together wait
            # their turn like any other statement).
            self._execute(db, "PRAGMA journal_mode=WAL")
            self._execute(db, "BEGIN IMMEDIATE")
            try:
                db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT NOT NULL UNIQUE,"
                           " fingerprint TEXT NOT NULL, state TEXT NOT NULL, token TEXT NOT NULL,"
                           " message_id TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '',"
                           " error_message TEXT NOT NULL DEFAULT '', expires_at REAL NOT NULL)")
                self._adopt_clock(db)
            finally:
                db.execute("COMMIT")

    def _adopt_clock(self, db):
        """Bring the table's times onto this boot's monotonic clock, and carry the live keys of
        an earlier layout over."""
        db.execute("CREATE TABLE IF NOT EXISTS herald_smtp_clock (name TEXT PRIMARY KEY, boot TEXT NOT NULL,"
                   " wall_offset REAL NOT NULL)")
        boot, offset = _boot_id(), time.time() - time.monotonic()
        row = db.execute("SELECT boot, wall_offset FROM herald_smtp_clock WHERE name = ?", (self.table,)).fetchone()
        if row is not None and row[0] == boot:
            return
        if row is not None:  # a reboot: the owners of reservations are gone
            db.execute(f"DELETE FROM {self.table} WHERE state = 'pending'")
            db.execute(f"UPDATE {self.table} SET expires_at = expires_at + ?", (row[1] - offset,))
        for legacy in self.LEGACY_TABLES:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (legacy,)).fetchone():
                db.execute(f"INSERT OR IGNORE INTO {self.table} SELECT key, fingerprint, state, token, message_id,"
                           f" error_code, error_message, expires_at - ? FROM {legacy} WHERE expires_at > ?",
                           (offset, time.time()))
                db.execute(f"DROP TABLE {legacy}")  # its indexes and triggers go with it
        db.execute("DROP TABLE IF EXISTS idempotency_size")
        db.execute("INSERT OR REPLACE INTO herald_smtp_clock VALUES (?, ?, ?)", (self.table, boot, offset))

    def _connect(self):
        # Opened lazily, so each forked worker has its own; the caller holds the lock. No busy
        # timeout: _execute waits for another process's write itself.
        if self._pid != os.getpid():
            self._conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            self._execute(self._conn, "PRAGMA synchronous=NORMAL")
            self._pid = os.getpid()
        return self._conn

    def _execute(self, db, sql, args=()):
        """Run a statement, retrying while another process holds the write lock. SQLite's own
        busy handler sleeps 1, 2, 5, 10... ms, and all this worker's threads wait on our lock
        meanwhile; a write takes tens of microseconds, so look again every 100 us."""
        deadline = None
        while True:
            try:
                return db.execute(sql, args)
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                deadline = deadline or time.monotonic() + self.BUSY_TIMEOUT
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.0001)

    def _run(self, sql, args=()):
        """One statement that writes; its cursor's rowcount is read afterwards."""
        with self._lock:
            return self._execute(self._connect(), sql, args)

    def _fetch(self, sql, args=()):
        """One query's first row."""
        with self._lock:
            return self._execute(self._connect(), sql, args).fetchone()

    def _row(self, key, now):
        row = self._fetch(f"SELECT fingerprint, state, token, message_id, error_code, error_message"
                          f" FROM {self.table} WHERE key = ? AND expires_at > ?", (key, now))
        return Record(*row) if row else None

    def begin(self, key, fp, lease):
        try:
            while True:
                now, token = time.monotonic(), uuid.uuid4().hex
                if now >= self._next_purge:
                    self._purge(now)
                rowid, roomy = self._insert(key, fp, token, now + lease)
                if rowid:
                    if not roomy and not self._make_room(rowid, now):
                        self._run(f"DELETE FROM {self.table} WHERE rowid = ? AND token = ?", (rowid, token))
                        return FULL, None, None
                    return NEW, None, token
                # A known key: free it if its lease ran out or its send failed, and insert it
                # anew, as the newest row.
                if self._run(f"DELETE FROM {self.table} WHERE key = ? AND (expires_at <= ? OR state = 'failed')",
                             (key, now)).rowcount:
                    continue
                rec = self._row(key, now)
                if rec is not None and rec.state != FAILED:
                    return decide(rec, fp), rec, None
                # The row failed or expired since the statement: try again.
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def _insert(self, key, fp, token, expires):
        """A new key's row: (its rowid, whether the store surely has room for it), or (0, _) if
        the key is known. The bound is read under the insert's lock, in the order of the rowids."""
        with self._lock:
            cur = self._execute(self._connect(), f"INSERT INTO {self.table} (key, fingerprint, state, token,"
                                " expires_at) VALUES (?, ?, 'pending', ?, ?) ON CONFLICT (key) DO NOTHING",
                                (key, fp, token, expires))
            if not cur.rowcount:
                return 0, False
            rowid = cur.lastrowid
            # A rowid at or below the last counted one: the newest rows went and rowids came round.
            return rowid, self._counted_at < rowid and self._count + rowid - self._counted_at <= self.max_entries

    def _make_room(self, rowid, now) -> bool:
        """Count the rows; if the one just added is one too many, evict the oldest settled (or
        expired) rows, down to 1/EVICT_SHARE below capacity, so a busy full store counts once
        per that many new keys. False when records in flight alone fill the store."""
        evicted = 0
        with self._lock:
            db = self._connect()
            count = self._execute(db, f"SELECT count(*) FROM {self.table}").fetchone()[0]
            if count > self.max_entries:
                excess = count - self.max_entries + self.max_entries // self.EVICT_SHARE
                evicted = self._execute(db, f"DELETE FROM {self.table} WHERE rowid IN (SELECT rowid FROM {self.table}"
                                            " WHERE state != 'pending' OR expires_at <= ? ORDER BY rowid LIMIT ?)",
                                        (now, excess)).rowcount
                count -= evicted
            self._count, self._counted_at = count, rowid
        if evicted and self.on_evict:
            self.on_evict(evicted)
        return count <= self.max_entries

    def _purge(self, now):
        """Expired rows go without a separate job: now and then, whichever request is due
        deletes the expired rows at the bottom, up to the oldest live one (the others follow
        when they get there; expired, they are already as good as gone)."""
        self._next_purge = now + self.PURGE_EVERY  # set first: a purge that fails waits its turn too
        self._run(f"DELETE FROM {self.table} WHERE rowid < ifnull((SELECT rowid FROM {self.table}"
                  " WHERE expires_at > ? ORDER BY rowid LIMIT 1), 9223372036854775807)", (now,))

    def get(self, key):
        try:
            return self._row(key, time.monotonic())
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def _settle(self, key, token, keep, state, message_id="", code="", message=""):
        self._run(f"UPDATE {self.table} SET state = ?, message_id = ?, error_code = ?, error_message = ?,"
                  " expires_at = ? WHERE key = ? AND token = ?",
                  (state, message_id, code, message, time.monotonic() + keep, key, token))

    def complete(self, key, token, message_id, ttl):
        self._settle(key, token, ttl, DONE, message_id=message_id)

    def fail(self, key, token, code, message):
        self._settle(key, token, FAILED_KEEP_SECONDS, FAILED, code=code, message=message)

    def oldest_success_age(self, ttl):
        """Seconds since the oldest success still remembered was recorded (0: none)."""
        now = time.monotonic()
        row = self._fetch(f"SELECT expires_at FROM {self.table} WHERE state = 'done' AND expires_at > ?"
                          " ORDER BY rowid LIMIT 1", (now,))
        return max(0.0, now - (row[0] - ttl)) if row else 0.0

    def close(self):
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn, self._pid = None, None


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
    """Shared by every replica. A key's record lives under a hash of the key, so any text is safe."""

    def __init__(self, url: str, max_entries: int, scope: str = "", on_evict=None):
        import redis  # only deployments that choose Redis need the client loaded

        self.max_entries = max_entries
        self.on_evict = on_evict
        self.prefix = f"{{herald-smtp:{scope or 'default'}}}:idem:"
        self.pending, self.done = self.prefix + "pending", self.prefix + "done"
        # A Cluster without a node for the slot raises RedisClusterException, no RedisError.
        self._errors = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
        self.client = redis_url.client(url, socket_timeout=5, socket_connect_timeout=3,
                                       health_check_interval=30, decode_responses=True)
        self._begin = self.client.register_script(_BEGIN)
        self._settle_script = self.client.register_script(_SETTLE)
        self._oldest = self.client.register_script(_OLDEST)
        self.description = f"redis {urlsplit(url).hostname or 'socket'}"

    def _name(self, key):
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()

    def begin(self, key, fp, lease):
        token = uuid.uuid4().hex
        try:
            res = self._begin(keys=[self._name(key), self.pending, self.done],
                              args=[fp, token, int(lease * 1000), self.max_entries])
        except self._errors as e:
            raise StoreUnavailable(type(e).__name__) from None
        if res[0] in (REPLAY, WAIT):
            return res[0], Record(res[1], res[2], res[3], res[4] or ""), None
        if res[0] == NEW and res[1] and self.on_evict:
            self.on_evict(res[1])
        return res[0], None, token if res[0] == NEW else None

    def get(self, key):
        try:
            h = self.client.hgetall(self._name(key))
        except self._errors as e:
            raise StoreUnavailable(type(e).__name__) from None
        if not h:
            return None
        return Record(h["fp"], h["state"], h["token"], h.get("mid", ""), h.get("code", ""), h.get("msg", ""))

    def _settle(self, key, token, state, keep, mid="", code="", msg=""):
        self._settle_script(keys=[self._name(key), self.pending, self.done],
                            args=[token, state, mid, code, msg, int(keep * 1000)])

    def complete(self, key, token, message_id, ttl):
        self._settle(key, token, DONE, ttl, mid=message_id)

    def fail(self, key, token, code, message):
        self._settle(key, token, FAILED, FAILED_KEEP_SECONDS, code=code, msg=message)

    def oldest_success_age(self, ttl):
        """Seconds since the oldest success still remembered was recorded (0: none), by Redis's clock."""
        now, expires = self._oldest(keys=[self.done])
        return max(0.0, (int(now) - float(expires)) / 1000 + ttl) if expires else 0.0

    def close(self):
        self.client.close()
