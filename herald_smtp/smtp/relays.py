"""Choosing a relay: the primary first, then each fallback in turn, and remembering which failed.

A relay that could not take a mail sits out a cool-down (SMTP_RELAY_COOLDOWN_SECONDS), shared by
the threads of a worker: while another relay is available it goes to the back of the line, so a
dead primary costs one send its time, not every send. When the cool-down is over, the next send
tries it first, alone: the sends after it keep it at the back until that one succeeds (then it is
first for all) or fails (another cool-down). A relay in cool-down is still tried when every relay
before it failed: with one relay configured, every send tries it, as if there were no cool-down.
"""

import threading
import time


class Relays:
    def __init__(self, relays: tuple, cooldown: float):
        self.relays = relays
        self.cooldown = cooldown
        self._until = {relay.name: 0.0 for relay in relays}  # time.monotonic() its cool-down ends
        self._lock = threading.Lock()

    def order(self) -> list:
        """The relays in the order to try them for a send starting now."""
        now = time.monotonic()
        with self._lock:
            trial = [r for r in self.relays if 0 < self._until[r.name] <= now]
            for relay in trial:  # this send tries it; for the others its cool-down goes on meanwhile
                self._until[relay.name] = now + self.cooldown
            until = dict(self._until)
        ready = [r for r in self.relays if r in trial or until[r.name] <= now]
        cooling = sorted((r for r in self.relays if r not in ready), key=lambda r: until[r.name])
        return ready + cooling

    def available(self) -> bool:
        """Some relay is not in cool-down (/readyz)."""
        now = time.monotonic()
        with self._lock:
            return any(until <= now for until in self._until.values())

    def failed(self, relay) -> float:
        """The relay could not take a mail: its cool-down starts. Returns when (time.time()) it ends."""
        with self._lock:
            self._until[relay.name] = time.monotonic() + self.cooldown
        return time.time() + self.cooldown

    def succeeded(self, relay) -> bool:
        """The relay took a mail or answered; True if that ended a cool-down."""
        with self._lock:
            was, self._until[relay.name] = self._until[relay.name], 0.0
        return was > 0
