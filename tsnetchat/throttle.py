"""Token buckets: per person (messages, calls), per connection and per device (refusals), and
for the log (refusal lines); and ``Coalescer``, which holds back what goes over a bucket and
lets the latest of it out when the bucket allows (a person's comings and goings in a room).

A bucket holds at most ``burst`` tokens and refills at ``rate`` per second. ``Buckets`` keeps
one per key and forgets keys whose bucket is full again (a full bucket is the same as a new
one), so a stream of one-off keys (connections) costs memory only while they are active.
``configure`` changes the numbers of every bucket, existing ones included (a SIGHUP reload).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


def retry_in(wait: float) -> str:
    """"retry in 0.3s": a bucket's wait as a hint, rounded up (a wait of 20 ms said "retry in
    0.0s", and a client reading the words tried again at once)."""
    return f"retry in {math.ceil(wait * 10) / 10:.1f}s"


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = float(burst), rate
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> float:
        """Take one token; returns 0 on success or the seconds until one is available."""
        self._refill(time.monotonic())
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def wait(self) -> float:
        """Seconds until a token is available (0: now), taking nothing."""
        self._refill(time.monotonic())
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def spend(self, n: float) -> None:
        """Take ``n`` tokens for what was already done (a cost known only after it): the
        bucket may go below zero, and ``wait`` says when it is back above one."""
        self._refill(time.monotonic())
        self.tokens -= n

    def configure(self, burst: int, rate: float) -> None:
        """New numbers from now on; the tokens already held are kept (up to the new burst)."""
        self._refill(time.monotonic())
        self.burst, self.rate = float(burst), rate
        self.tokens = min(self.tokens, self.burst)

    @property
    def full(self) -> bool:
        self._refill(time.monotonic())
        return self.tokens >= self.burst


class Buckets:
    """One TokenBucket per key, all with the same numbers."""

    SWEEP_EVERY = 1024  # takes between sweeps of full buckets

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self._b: dict[str, TokenBucket] = {}
        self._ops = 0

    def get(self, key: str) -> TokenBucket:
        b = self._b.get(key)
        if b is None:
            b = self._b[key] = TokenBucket(self.burst, self.rate)
            self._ops += 1
            if self._ops >= self.SWEEP_EVERY:
                self._ops = 0
                self._b = {k: v for k, v in self._b.items() if v is b or not v.full}
        return b

    def take(self, key: str) -> float:
        return self.get(key).take()

    def wait(self, key: str) -> float:
        b = self._b.get(key)
        return 0.0 if b is None else b.wait()

    def spend(self, key: str, n: float) -> None:
        self.get(key).spend(n)

    def configure(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        for b in self._b.values():
            b.configure(burst, rate)

    def __len__(self) -> int:
        return len(self._b)


class LogLimiter:
    """At most ``burst`` lines at once and ``rate`` per second after that. ``log`` writes a
    line when the limit allows and ends it with how many like it were dropped since the last
    one written; otherwise it counts the line as dropped."""

    def __init__(self, burst: int = 20, rate: float = 2.0) -> None:
        self._bucket = TokenBucket(burst, rate)
        self._skipped = 0

    def log(self, logger: logging.Logger, level: int, msg: str, *args: object,
            exc_info: BaseException | None = None) -> bool:
        """``logger.log(level, msg, *args)`` if allowed (True), else count it (False)."""
        if self._bucket.take():
            self._skipped += 1
            return False
        if self._skipped:
            msg += f" ({self._skipped} more like this not logged)"
            self._skipped = 0
        logger.log(level, msg, *args, exc_info=exc_info)
        return True


class Coalescer(Generic[T]):
    """Events per ``who`` (a bucket each: ``burst`` at once, then ``rate`` a second), about a
    ``topic`` each. One over the limit is held; later ones for the same (who, topic) replace
    it, and when the bucket allows ``emit`` gets the latest. Nothing is lost but the steps
    in between: what is said last is the latest."""

    def __init__(self, burst: int, rate: float, emit: Callable[[T], None]) -> None:
        self._buckets = Buckets(burst, rate)
        self._emit = emit
        # who -> topic -> the latest event held, topics in the order they were first held;
        # one timer per person, whatever the number of topics. (A timer per topic, each
        # trying the bucket every second, cost a share of the core that grew with the rooms
        # a person opened and closed: 2% at 3,000; an attacker over the lab, 2026-11-24.)
        self._held: dict[str, dict[Hashable, T]] = {}

    def offer(self, who: str, topic: Hashable, event: T) -> bool:
        """Say ``event`` now (True), or hold it (False)."""
        held = self._held.get(who)
        if held is not None:  # after what is already held for them (or in its place)
            held[topic] = event
            return False
        wait = self._buckets.take(who)
        if not wait:
            self._emit(event)
            return True
        self._held[who] = {topic: event}
        asyncio.get_running_loop().call_later(wait, self._release, who)
        return False

    def withdraw(self, who: str, topic: Hashable) -> None:
        """Take back, unsaid, what is held for (``who``, ``topic``), if anything: a person who
        left a room before their coming there was said has nothing to say in it (held, the
        coming and then the going stayed, one per room: 501 after 576 Joins into new rooms
        in 10 s, let out one a second; a review, 2026-11-25). Their timer stays set."""
        held = self._held.get(who)
        if held is not None:
            held.pop(topic, None)

    def _release(self, who: str) -> None:
        held = self._held[who]
        if not held:  # (all of it withdrawn: the next offer takes the bucket again)
            del self._held[who]
            return
        wait = self._buckets.take(who)
        if wait:
            asyncio.get_running_loop().call_later(wait, self._release, who)
            return
        event = held.pop(next(iter(held)))
        if held:  # (the next one's turn is set before this one is said, whatever emit does)
            asyncio.get_running_loop().call_later(max(self._buckets.wait(who), 0.001),
                                                  self._release, who)
        else:
            del self._held[who]
        self._emit(event)

    def __len__(self) -> int:
        return sum(len(h) for h in self._held.values())
