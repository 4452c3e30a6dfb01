"""Fan-out of room events to subscribers, with bounded queues. Knows nothing of gRPC or
SQLite: payloads are opaque bytes prepared once by the caller and shared by every queue.

A Subscriber is fed by ``Hub.publish`` (never blocks, O(1) per subscriber) and drained by
exactly one consumer task. When a queue would exceed its limit the subscriber is closed with
``CloseKind.OVERFLOW`` instead of growing: a slow reader never slows the others and never
holds more than ``limit`` items. Everything runs on one event loop; no locks are needed.

Pacing: in a busy room (messages arriving less than ``busy_window`` apart) the hub queues a
message without waking the consumers and wakes the whole room once, ``linger`` later, so
several messages share one frame. A frame costs the server about 25-40 us of CPU (measured:
bench/README.md) and packing one more message into it almost nothing, so the linger is about
one frame-cost per subscriber (a 100-person room waits 2.5 ms), capped at ``linger_max``.
When the event loop itself is saturated (``load``, see tsnetchat.loop) every frame saved is
a message ingested, so the linger stretches towards ``overload_linger``: latency is then
queueing anyway, and bigger frames are what lets the server catch up. One timer per room,
not one sleep per subscriber. Quiet rooms are never delayed.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple


class Item(NamedTuple):
    """One queued event, encoded once for every queue it is in. ``frame`` is the event on
    its own; ``part`` is its encoding inside a batch frame (b"" when it cannot be batched).
    Messages have their id; other events have id 0."""

    id: int
    frame: bytes
    part: bytes = b""


FRAME_BATCH = 256  # most messages in one frame


@dataclass(frozen=True)
class Pacing:
    frame_cost: float = 25e-6
    linger_max: float = 0.005
    busy_window: float = 0.02
    wake_at: int = FRAME_BATCH  # a full frame's worth is drained at once, whatever the linger
    # Above loaded_from the linger is at least min_linger, whatever the room's size; between
    # overload_from and overload_full it moves linearly to overload_linger. Measured load
    # (tsnetchat.loop): 0.45 at 1,000 msg/s into 9 subscribers, 0.57 at 500 msg/s into 100,
    # 0.73 at 1,000 msg/s into 100, 0.97-0.99 saturated (bench/README.md).
    loaded_from: float = 0.6
    overload_from: float = 0.85
    overload_full: float = 0.97
    overload_linger: float = 0.02
    # An idle loop cannot fire a timer sooner than this: epoll waits in whole milliseconds,
    # so a 250 us linger took 1-1.4 ms (measured). A shorter linger is no linger.
    min_linger: float = 0.001

    def linger(self, subscribers: int, load: float = 0.0) -> float:
        normal = min(self.linger_max, self.frame_cost * subscribers)
        if load > self.loaded_from:
            normal = max(normal, self.min_linger)
        if load <= self.overload_from:
            return normal
        f = min(1.0, (load - self.overload_from) / (self.overload_full - self.overload_from))
        return normal + f * max(0.0, self.overload_linger - normal)


class CloseKind(enum.Enum):
    OVERFLOW = "overflow"
    REVOKED = "revoked"
    KICKED = "kicked"
    SHUTDOWN = "shutdown"
    FLOOD = "flood"
    DONE = "done"  # the client finished: end the stream normally


# Closes that drop what is still queued: nothing more should reach that subscriber.
_DROPPING = frozenset({CloseKind.OVERFLOW, CloseKind.REVOKED, CloseKind.KICKED, CloseKind.FLOOD})


@dataclass(frozen=True)
class CloseReason:
    kind: CloseKind
    message: str


@dataclass(eq=False)
class Subscriber:
    room: str
    login: str
    token_id: str
    limit: int
    member: object | None = None  # presence info when this is an interactive member
    replayed_to: int = 0  # highest message id already sent from history; skip up to it
    inflight: int = 0  # this member's sends taken and not yet settled (see wait_for_room)
    queue: deque[Item] = field(default_factory=deque)
    closed: CloseReason | None = None
    # A bare future rather than an asyncio.Event: this is the hottest wait in the server.
    _waiter: asyncio.Future[None] | None = None
    # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call,
    # which was 6% of the loop's time at 100k deliveries/s (py-spy --native).
    _loop: asyncio.AbstractEventLoop | None = None
    _woken: bool = False  # queued without a wake (busy room): wait for the room's timer
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, item: Item, *, wake: bool = True) -> None:
        """Queue an item; with ``wake=False`` the consumer is woken later by ``wake()``."""
        if self.closed is not None:
            return
        if len(self.queue) >= self.limit:
            self.close(CloseReason(CloseKind.OVERFLOW, (
                f"you fell more than {self.limit} events behind in room {self.room!r} and were "
                "disconnected so others are not slowed down; reconnect with after_id set to the "
                "last message you saw to catch up from history")))
            return
        self.queue.append(item)
        if wake:
            self.wake()

    def wake(self) -> None:
        self._woken = True
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def close(self, reason: CloseReason) -> None:
        if self.closed is None:
            self.closed = reason
            if reason.kind in _DROPPING:
                self.queue.clear()
            self.wake()

    async def wait(self) -> None:
        """Return when the consumer has been woken with something to drain, or closed."""
        while not (self._woken and self.queue) and self.closed is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            await self._waiter
        self._woken = False

    def drain(self, max_items: int) -> list[Item]:
        n = min(max_items, len(self.queue))
        q = self.queue
        items = [q.popleft() for _ in range(n)]
        if q:
            self._woken = True  # more than one drain's worth was due: keep going
        self._drained.set()
        return items

    async def wait_for_room(self) -> None:
        """Backpressure for a sender: return once its own queue, counting what its sends
        still being stored will bring (an echo and an ack each), is at most half full.

        A member's sends come back to it as messages and acks; reading its requests faster
        than it reads its stream would overflow its own queue. Waiting here stops reading,
        and HTTP/2 flow control then slows the sender down instead.
        """
        while (len(self.queue) + 2 * self.inflight > self.limit // 2
               and self.closed is None):
            self._drained.clear()
            await self._drained.wait()


@dataclass(eq=False)
class _Room:
    subs: set[Subscriber] = field(default_factory=set)
    members: dict[str, list[Subscriber]] = field(default_factory=dict)
    last_publish: float = 0.0
    flush: asyncio.TimerHandle | None = None

    def wake_all(self) -> None:
        self.flush = None
        for s in self.subs:
            if s.queue:
                s.wake()


class Hub:
    def __init__(self, pacing: Pacing | None = None,
                 load: Callable[[], float] | None = None) -> None:
        self.pacing = pacing or Pacing()
        self.load = load or (lambda: 0.0)  # the event loop's busy fraction, 0..1
        self._rooms: dict[str, _Room] = {}
        self._by_login: dict[str, set[Subscriber]] = {}

    def add(self, sub: Subscriber) -> bool:
        """Register a subscriber. For members, returns True if this login just joined the room
        (first stream of that login there), so the caller announces presence."""
        room = self._rooms.setdefault(sub.room, _Room())
        room.subs.add(sub)
        self._by_login.setdefault(sub.login, set()).add(sub)
        if sub.member is None:
            return False
        streams = room.members.setdefault(sub.login, [])
        streams.append(sub)
        return len(streams) == 1

    def remove(self, sub: Subscriber) -> bool:
        """Unregister; returns True if this was the login's last member stream in the room."""
        room = self._rooms.get(sub.room)
        subs = self._by_login.get(sub.login)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_login[sub.login]
        if room is None:
            return False
        room.subs.discard(sub)
        left = False
        if sub.member is not None and sub.login in room.members:
            streams = room.members[sub.login]
            if sub in streams:
                streams.remove(sub)
            if not streams:
                del room.members[sub.login]
                left = True
        if not room.subs:
            del self._rooms[sub.room]
        return left

    def publish(self, room: str, item: Item) -> int:
        """Queue ``item`` for every subscriber of ``room``; returns how many got it."""
        r = self._rooms.get(room)
        if r is None:
            return 0
        now = time.monotonic()
        busy = now - r.last_publish < self.pacing.busy_window
        r.last_publish = now
        linger = self.pacing.linger(len(r.subs), self.load()) if busy else 0.0
        if linger < self.pacing.min_linger:
            for s in r.subs:
                s.push(item)
            return len(r.subs)
        wake_at = self.pacing.wake_at
        for s in r.subs:
            s.push(item, wake=len(s.queue) + 1 >= wake_at)
        if r.flush is None:
            r.flush = asyncio.get_running_loop().call_later(linger, r.wake_all)
        return len(r.subs)

    def reply(self, sub: Subscriber, item: Item) -> None:
        """Queue an answer for one subscriber (an ack, an error). While its room has a flush
        pending the answer waits for it, so an ack shares a frame with the echo of the
        message it acknowledges; otherwise it goes at once."""
        r = self._rooms.get(sub.room)
        sub.push(item, wake=r is None or r.flush is None)

    def members(self, room: str) -> list[object]:
        r = self._rooms.get(room)
        if r is None:
            return []
        return [streams[0].member for _, streams in sorted(r.members.items())]

    def subscriptions_of(self, login: str) -> int:
        return len(self._by_login.get(login, ()))

    def rooms(self) -> Iterable[str]:
        return list(self._rooms)

    def close_where(self, pred: Callable[[Subscriber], bool], reason: CloseReason) -> int:
        victims = [s for subs in self._by_login.values() for s in subs
                   if s.closed is None and pred(s)]
        for s in victims:
            s.close(reason)
        return len(victims)

    def close_all(self, reason: CloseReason) -> int:
        return self.close_where(lambda _s: True, reason)

    def counts(self) -> tuple[int, int]:
        """(rooms with subscribers, subscribers)."""
        return len(self._rooms), sum(len(r.subs) for r in self._rooms.values())
