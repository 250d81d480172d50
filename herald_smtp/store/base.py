"""What every idempotency store promises: one key, one email, whichever worker or replica a
request reaches.

A record moves pending -> done (remembered for the TTL, replayed) or pending -> failed (kept
only briefly, so requests already waiting on it return the same error; a new request with the
key sends again). A pending record carries a lease: if its owner dies, the key frees up.
A full store never stops new mail: a new key evicts the oldest settled records; only when
records in flight alone fill it is a new key refused.
Stores, chosen by IDEMPOTENCY_STORE (store/opener.py): a SQLite file shared by the workers of one
host (the default, store/sqlite.py), Redis for several replicas (store/redis.py), memory for a
single process (store/memory.py). Each keeps the keys of one sending identity (`scope`) apart
from another's, and answers begin, get, complete, fail, oldest_success_age and close.
"""

import dataclasses
import hashlib
import json
import logging
import time

from ..errors import SendError

log = logging.getLogger("herald_smtp.idempotency")

PENDING, DONE, FAILED = "pending", "done", "failed"
NEW, REPLAY, CONFLICT, WAIT, FULL = "new", "replay", "conflict", "wait", "full"
FAILED_KEEP_SECONDS = 10  # long enough for every waiting follower to see the owner's error
EVICTION_WARNING_EVERY = 60  # seconds between warnings while a full store evicts


class StoreUnavailable(Exception):
    """The store could not be reached; the caller answers 503 rather than send unprotected."""


class NotReplicated(StoreUnavailable):
    """No replica confirmed a write in time (IDEMPOTENCY_WAIT_REPLICAS): a failover now could
    lose it, so it counts as the store being unavailable."""


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


def run_once(store, key, fp, deadline, send, lease, ttl, on_unsaved=None):
    """Send at most once per key: the first caller sends, concurrent callers wait for it.

    Returns (message_id, replayed). `send()` returns the message id or raises SendError.
    `on_unsaved()` is told of each success whose record was not saved (or not replicated).
    """
    delay = 0.005
    while True:
        outcome, rec, token = store.begin(key, fp, lease, deadline)
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
                store.complete(key, token, message_id, ttl, deadline)
            except Exception as e:
                # The mail went out: the answer stays 200. The record stays pending (or, not
                # replicated, may be lost in a failover), so a retry waits for it until its lease
                # ends, and after that sends again.
                log.error("idempotency record not saved: a retry of this key after its lease will send again",
                          extra={"fields": {"idempotency_key": key, "error": type(e).__name__}})
                if on_unsaved:
                    on_unsaved()
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
