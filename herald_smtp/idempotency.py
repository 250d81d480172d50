"""Idempotency store: one key, one email, whichever worker or replica a request reaches.

A record moves pending -> done (remembered for the TTL, replayed) or pending -> failed (kept
only briefly, so requests already waiting on it return the same error; a new request with the
key sends again). A pending record carries a lease: if its owner dies, the key frees up.
Backends, chosen by IDEMPOTENCY_STORE: a SQLite file shared by the workers of one host (the
default), Redis for several replicas, memory for a single process.
"""

import dataclasses
import hashlib
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
            _quietly(store.complete, key, token, message_id, ttl)
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


def open_store(url: str, max_entries: int):
    path = sqlite_path(url)
    if path is not None:
        return SQLiteStore(path, max_entries)
    if url.startswith("memory://"):
        return MemoryStore(max_entries)
    return RedisStore(url, max_entries)


class MemoryStore:
    """One process only (config refuses it with more than one worker)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._records = {}  # key -> (Record, expires_at)
        self._lock = threading.Lock()

    def _live(self, key, now):
        item = self._records.get(key)
        if item and item[1] <= now:
            del self._records[key]
            return None
        return item[0] if item else None

    def begin(self, key, fp, lease):
        with self._lock:
            now = time.monotonic()
            rec = self._live(key, now)
            outcome = decide(rec, fp)
            if outcome != NEW:
                return outcome, rec, None
            if rec is None and len(self._records) >= self.max_entries:
                for k in [k for k, (_, exp) in self._records.items() if exp <= now]:
                    del self._records[k]
                if len(self._records) >= self.max_entries:
                    return FULL, None, None
            token = uuid.uuid4().hex
            self._records[key] = (Record(fp, PENDING, token), now + lease)
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


class SQLiteStore:
    """A file every worker of one host shares; WAL lets readers run beside the one writer.

    Laid out for few, small writes, since each costs six file locks and whole WAL pages:
    - A new key is one plain INSERT, its completion one UPDATE. Rows go in rowid order (a unique
      index finds a key), so both land on the newest page.
    - There is no expiry index and no row counter to keep up: expired rows go in a scan now and
      then, and rows are counted only when the rowid span says the store may be full.
    - One connection per process, one statement at a time: its threads queue on a lock, and a
      statement that finds another process writing looks again within 100 us rather than
      sleeping in SQLite's busy handler, which sleeps whole milliseconds.
    """

    PURGE_EVERY = 1.0  # seconds; longer for a big table, so a scan covers ~10k rows a second
    BUSY_TIMEOUT = 10.0  # seconds a statement waits for other processes' writes
    TABLE = "idempotency_keys"

    def __init__(self, path: str, max_entries: int):
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()  # this process's connection: one statement at a time
        self._conn, self._pid = None, None
        self._next_purge = 0.0
        self._oldest = self._newest = 0  # the smallest rowid at the last purge; the largest seen
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
                db.execute(f"CREATE TABLE IF NOT EXISTS {self.TABLE} (key TEXT NOT NULL UNIQUE,"
                           " fingerprint TEXT NOT NULL, state TEXT NOT NULL, token TEXT NOT NULL,"
                           " message_id TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '',"
                           " error_message TEXT NOT NULL DEFAULT '', expires_at REAL NOT NULL)")
                self._migrate(db)
            finally:
                db.execute("COMMIT")

    def _migrate(self, db):
        """Carry live keys over from the earlier layout (a WITHOUT ROWID table and a row counter)."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'idempotency'").fetchone() is None:
            return
        db.execute(f"INSERT OR IGNORE INTO {self.TABLE} SELECT key, fingerprint, state, token, message_id,"
                   " error_code, error_message, expires_at FROM idempotency WHERE expires_at > ?", (time.time(),))
        db.execute("DROP TABLE idempotency")  # its index and triggers go with it
        db.execute("DROP TABLE IF EXISTS idempotency_size")

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
                          f" FROM {self.TABLE} WHERE key = ? AND expires_at > ?", (key, now))
        return Record(*row) if row else None

    def begin(self, key, fp, lease):
        try:
            while True:
                now, token = time.time(), uuid.uuid4().hex
                if now >= self._next_purge:
                    self._purge(now)
                rowid = self._insert(key, fp, token, now + lease)
                if rowid:
                    if self._over_capacity(rowid, now):
                        self._run(f"DELETE FROM {self.TABLE} WHERE rowid = ? AND token = ?", (rowid, token))
                        return FULL, None, None
                    return NEW, None, token
                # A known key: take it over if its lease ran out or its send failed.
                if self._run(f"UPDATE {self.TABLE} SET fingerprint = ?, state = 'pending', token = ?,"
                             " message_id = '', error_code = '', error_message = '', expires_at = ?"
                             " WHERE key = ? AND (expires_at <= ? OR state = 'failed')",
                             (fp, token, now + lease, key, now)).rowcount:
                    return NEW, None, token
                rec = self._row(key, now)
                if rec is not None and rec.state != FAILED:
                    return decide(rec, fp), rec, None
                # The row failed or was purged since the statement: try again.
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def _insert(self, key, fp, token, expires):
        """A new key's row: its rowid, or 0 if the key is known. Under the same lock as the insert,
        so this process sees its rowids in the order SQLite gave them."""
        with self._lock:
            cur = self._execute(self._connect(), f"INSERT INTO {self.TABLE} (key, fingerprint, state, token,"
                                " expires_at) VALUES (?, ?, 'pending', ?, ?) ON CONFLICT (key) DO NOTHING",
                                (key, fp, token, expires))
            if not cur.rowcount:
                return 0
            if cur.lastrowid <= self._newest:  # the newest rows went, so rowids came round again: the
                self._oldest = 0               # span from the oldest seen means nothing until a purge
            self._newest = cur.lastrowid
            return cur.lastrowid

    def _over_capacity(self, rowid, now):
        """Whether the row just added is one too many. A new row's rowid is the largest plus
        one, so the span from the oldest row bounds the count; only near the limit are the live
        rows counted, counting others' new rows too."""
        if rowid - self._oldest + 1 <= self.max_entries:
            return False
        live = self._fetch(f"SELECT count(*) FROM {self.TABLE} WHERE expires_at > ?", (now,))[0]
        return live > self.max_entries

    def _purge(self, now):
        """Expired rows go without a separate job: a scan now and then, by whichever request is due."""
        self._next_purge = now + self.PURGE_EVERY  # set first: a scan that fails waits its turn too
        with self._lock:  # the bounds are read and kept in one turn, as _insert keeps them
            db = self._connect()
            self._execute(db, f"DELETE FROM {self.TABLE} WHERE expires_at <= ?", (now,))
            oldest, newest = self._execute(db, f"SELECT ifnull(min(rowid), 0), ifnull(max(rowid), 0)"
                                               f" FROM {self.TABLE}").fetchone()
            self._oldest, self._newest = oldest, newest
        self._next_purge = now + max(self.PURGE_EVERY, (newest - oldest) / 10000)

    def get(self, key):
        try:
            return self._row(key, time.time())
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def _settle(self, key, token, keep, state, message_id="", code="", message=""):
        self._run(f"UPDATE {self.TABLE} SET state = ?, message_id = ?, error_code = ?, error_message = ?,"
                  " expires_at = ? WHERE key = ? AND token = ?",
                  (state, message_id, code, message, time.time() + keep, key, token))

    def complete(self, key, token, message_id, ttl):
        self._settle(key, token, ttl, DONE, message_id=message_id)

    def fail(self, key, token, code, message):
        self._settle(key, token, FAILED_KEEP_SECONDS, FAILED, code=code, message=message)

    def close(self):
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn, self._pid = None, None


# Redis: a hash per key (expiring with its record) and a sorted set of live keys by expiry,
# which bounds the store. Scripts run atomically on the server, with the server's clock. All
# names share one {hash tag}, so on a Redis Cluster a script's keys sit in one slot.
_BEGIN = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'token', 'mid', 'code', 'msg')
if rec[1] and rec[2] ~= 'failed' then
  if rec[1] ~= ARGV[1] then return {'conflict'} end
  if rec[2] == 'done' then return {'replay', rec[1], rec[2], rec[3], rec[4]} end
  return {'wait', rec[1], rec[2], rec[3], ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not rec[1] and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {'full'} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'pending', 'token', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), KEYS[1])
return {'new'}
"""
_SETTLE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'mid', ARGV[3], 'code', ARGV[4], 'msg', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if ARGV[2] == 'done' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6]), KEYS[1])
else
  redis.call('ZREM', KEYS[2], KEYS[1])
end
return 1
"""


class RedisStore:
    """Shared by every replica. A key's record lives under a hash of the key, so any text is safe."""

    def __init__(self, url: str, max_entries: int, prefix: str = "{herald-smtp}:idem:"):
        import redis  # only deployments that choose Redis need the client loaded

        self.max_entries = max_entries
        self.prefix = prefix
        self.index = prefix + "index"
        # A Cluster without a node for the slot raises RedisClusterException, no RedisError.
        self._errors = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
        self.client = redis_url.client(url, socket_timeout=5, socket_connect_timeout=3,
                                       health_check_interval=30, decode_responses=True)
        self._begin = self.client.register_script(_BEGIN)
        self._settle_script = self.client.register_script(_SETTLE)
        self.description = f"redis {urlsplit(url).hostname or 'socket'}"

    def _name(self, key):
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()

    def begin(self, key, fp, lease):
        token = uuid.uuid4().hex
        try:
            res = self._begin(keys=[self._name(key), self.index],
                              args=[fp, token, int(lease * 1000), self.max_entries])
        except self._errors as e:
            raise StoreUnavailable(type(e).__name__) from None
        if res[0] in (REPLAY, WAIT):
            return res[0], Record(res[1], res[2], res[3], res[4] or ""), None
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
        self._settle_script(keys=[self._name(key), self.index],
                            args=[token, state, mid, code, msg, int(keep * 1000)])

    def complete(self, key, token, message_id, ttl):
        self._settle(key, token, DONE, ttl, mid=message_id)

    def fail(self, key, token, code, message):
        self._settle(key, token, FAILED, FAILED_KEEP_SECONDS, code=code, msg=message)

    def close(self):
        self.client.close()
