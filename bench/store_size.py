"""What a remembered key costs in each shared store: `.venv/bin/python bench/store_size.py`.

Fills the default SQLite store's layout (a scratch file in the default store's directory, on a
tmpfs where there is one) and a Redis database of its own with keys as Herald sends them (a
UUID, its content's fingerprint, a success remembered for the TTL), then prints the bytes per
key: the SQLite file after a checkpoint, and Redis's MEMORY USAGE of a record and its share of
the index. About 15 seconds.
"""

import argparse
import hashlib
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from herald_smtp.config import default_idempotency_store  # noqa: E402
from herald_smtp.store.opener import sqlite_path  # noqa: E402
from herald_smtp.store.redis import RedisStore  # noqa: E402
from herald_smtp.store.sqlite import SQLiteStore  # noqa: E402

SCOPE = "0123456789abcdef"  # as long as a real sending identity's


def fill(store, n):
    keys = [str(uuid.uuid4()) for _ in range(n)]
    started = time.perf_counter()
    for key in keys:
        _, _, token = store.begin(key, hashlib.sha256(key.encode()).hexdigest(), 35)
        store.complete(key, token, key, 300)
    return keys, n / (time.perf_counter() - started)


def sqlite_bytes(n):
    path = sqlite_path(default_idempotency_store(os.environ)).replace(".sqlite3", "-size-bench.sqlite3")
    store = SQLiteStore(path, 10**9, SCOPE)
    try:
        _, rate = fill(store, n)
        store._run("PRAGMA wal_checkpoint(TRUNCATE)")
        return os.path.getsize(path) / n, rate
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


def redis_bytes(url, n):
    store = RedisStore(url, 10**9, SCOPE)
    store.client.flushdb()
    try:
        keys, rate = fill(store, n)
        sample = keys[:: max(1, n // 2000)]
        record = sum(store.client.memory_usage(store._name(k)) for k in sample) / len(sample)
        return record + store.client.memory_usage(store.done) / n, rate
    finally:
        store.client.flushdb()
        store.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000, help="keys to remember (200000)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                        help="a Redis database of the benchmark's own: it is flushed (redis://127.0.0.1:6379/14)")
    args = parser.parse_args()
    per_key, rate = sqlite_bytes(args.keys)
    print(f"SQLite: {per_key:.0f} bytes a key ({args.keys} keys; {rate:.0f} keys a second in one thread)")
    per_key, rate = redis_bytes(args.redis_url, args.keys // 4)
    print(f"Redis:  {per_key:.0f} bytes a key ({args.keys // 4} keys; {rate:.0f} keys a second in one thread)")


if __name__ == "__main__":
    main()
