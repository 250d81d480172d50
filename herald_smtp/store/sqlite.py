"""The default store: a SQLite file shared by the workers of one host."""

import logging
import os
import sqlite3
import threading
import time
import uuid

from ..config import ConfigError
from .base import DONE, FAILED, FAILED_KEEP_SECONDS, FULL, NEW, Record, StoreUnavailable, decide

log = logging.getLogger("herald_smtp.idempotency")


def _refuse_shared_temp_dir(directory: str) -> None:
    """In a directory anyone can write (/tmp, /dev/shm) anyone can create ours first: use it
    only if no one else can write it."""
    if not os.stat(os.path.dirname(os.path.abspath(directory))).st_mode & 0o002:
        return
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"IDEMPOTENCY_STORE: {directory} belongs to another user or others can write it; "
                          "remove it or set IDEMPOTENCY_STORE to a private path")


def _read_id(*paths) -> str:
    """The first of these files that holds an id; "" where none does."""
    for path in paths:
        try:
            with open(path) as f:
                if value := f.read().strip():
                    return value
        except OSError:
            pass
    return ""


def _boot_id() -> str:
    """This boot of the machine (and of its containers): time.monotonic() starts again at boot."""
    return _read_id("/proc/sys/kernel/random/boot_id")


def _machine_id() -> str:
    """This host, across reboots (systemd's and D-Bus's id)."""
    return _read_id("/etc/machine-id", "/var/lib/dbus/machine-id")


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
    - The file records the host it belongs to (its machine id). Another host's file (a network
      filesystem, a volume two machines share) is refused at startup: SQLite's locks do not hold
      across hosts, and the times are the other host's.
    - Layout changes only add tables, and statements name their columns, so a file written by
      another version of this store opens (several versions share the default file while they
      run side by side); a file that still does not fit stops startup with one line.
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
            try:
                self._open()
            except sqlite3.Error as e:
                self._close()
                raise ConfigError(f"IDEMPOTENCY_STORE: cannot use {path}: {e}") from None
            except ConfigError:
                self._close()
                raise

    def _open(self):
        """Create the table, or adopt what the file holds, in one transaction: processes opening
        the file together take their turns."""
        db = self._connect()
        # WAL is a property of the file, set once.
        self._execute(db, "PRAGMA journal_mode=WAL")
        self._execute(db, "BEGIN IMMEDIATE")
        try:
            self._claim_host(db)
            db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT NOT NULL UNIQUE,"
                       " fingerprint TEXT NOT NULL, state TEXT NOT NULL, token TEXT NOT NULL,"
                       " message_id TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '',"
                       " error_message TEXT NOT NULL DEFAULT '', expires_at REAL NOT NULL)")
            self._adopt_clock(db)
        except BaseException:
            if db.in_transaction:  # some errors end the transaction themselves
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _claim_host(self, db):
        """A new file, or one from before hosts were recorded, becomes this host's; another
        host's is refused rather than adopted (adopting would drop its reservations)."""
        db.execute("CREATE TABLE IF NOT EXISTS herald_smtp_host (machine_id TEXT NOT NULL)")
        mine = _machine_id()
        row = db.execute("SELECT machine_id FROM herald_smtp_host").fetchone()
        if row is None or not row[0]:
            db.execute("DELETE FROM herald_smtp_host")
            db.execute("INSERT INTO herald_smtp_host (machine_id) VALUES (?)", (mine,))
        elif mine and row[0] != mine:
            # The ids themselves stay out of the line: systemd asks that they be kept private.
            raise ConfigError(f"IDEMPOTENCY_STORE: {self.path} belongs to another host (its machine id is not this "
                              "one's): SQLite's locking is not safe across hosts and its times are per host; give "
                              "each host a file of its own, or use Redis")

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
        db.execute("INSERT OR REPLACE INTO herald_smtp_clock (name, boot, wall_offset) VALUES (?, ?, ?)",
                   (self.table, boot, offset))

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

    def begin(self, key, fp, lease, deadline=None):
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

    def complete(self, key, token, message_id, ttl, deadline=None):
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
            self._close()

    def _close(self):
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn, self._pid = None, None
