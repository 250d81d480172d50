"""memory://: the store of a single process."""

import collections
import dataclasses
import itertools
import threading
import time
import uuid

from .base import DONE, FAILED, FAILED_KEEP_SECONDS, FULL, NEW, PENDING, Record, decide


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

    def begin(self, key, fp, lease, deadline=None):
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

    def complete(self, key, token, message_id, ttl, deadline=None):
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
