"""Opens the store IDEMPOTENCY_STORE names. Above the stores, so that none of them imports
another (base <- sqlite, redis, memory <- opener)."""

from .. import redis_url
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore


def sqlite_path(url: str):
    """The file of a SQLite IDEMPOTENCY_STORE (sqlite:///path or a bare path); None for the others."""
    if url.startswith(("memory://", *redis_url.SCHEMES)):
        return None
    return url[len("sqlite://"):] if url.startswith("sqlite://") else url


def open_store(url: str, max_entries: int, scope: str = "", on_evict=None, replicas: int = 0):
    """The store IDEMPOTENCY_STORE names, for the sending identity `scope`. `on_evict(n)` is
    told of every n settled records evicted to make room (see Evictions); a Redis store's writes
    count once `replicas` replicas have them (IDEMPOTENCY_WAIT_REPLICAS)."""
    path = sqlite_path(url)
    if path is not None:
        return SQLiteStore(path, max_entries, scope, on_evict)
    if url.startswith("memory://"):
        return MemoryStore(max_entries, on_evict)
    return RedisStore(url, max_entries, scope, on_evict, replicas)


def prepare(url: str, max_entries: int, scope: str = "") -> None:
    """Lay out or adopt a SQLite store's file once, in gunicorn's master before any worker
    starts: the workers then find it ready, and a file startup refuses (another host's, another
    user's directory) stops the master with one line (ConfigError). Nothing to do for the others."""
    path = sqlite_path(url)
    if path is not None:
        SQLiteStore(path, max_entries, scope).close()
