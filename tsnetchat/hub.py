"""Fan-out of room events to subscribers. Knows nothing of gRPC or SQLite: events are
encoded once by the caller (``codec.Item``).

Each room keeps one log of its recent events, shared by every subscriber; a subscriber is a
cursor into it, plus a short queue of answers meant for it alone (acks, errors). So:

* ``publish`` is O(1): it appends to the log. It does not touch the subscribers.
* A flush releases the log up to its end (the room's ``mark``) and wakes the subscribers that
  were waiting for it: one wake-up per subscriber per flush, not per message.
* A woken subscriber takes everything between its cursor and the mark as frames. Subscribers
  at the same position get the very same bytes, built once per room and slice
  (``_Room.frames``); only a subscriber that is behind, or that has answers of its own to add,
  costs work of its own.
* The log keeps what its slowest reader has not taken yet (``_Room.trim``, one pass over the
  subscribers each time it has doubled), and never more than ``limit`` events: a subscriber
  that falls further behind is closed with ``CloseKind.OVERFLOW``. A slow reader never slows
  the others, and costs nothing while it stays stuck.

Pacing (measured, bench/README.md): every frame costs the server a write on that stream,
25-45 us of the one core, whatever it holds, and packing one more message into it almost
nothing. A quiet room flushes at once. A busy room flushes at most once per ``linger``: the
time its previous flush takes to write out, one frame-cost per subscriber. Rooms where a
flush wakes at least ``Pacing.measure_from`` subscribers, and nine in ten of the room, time
their own flushes (``_Room``'s wave) and use what a frame really took there, if more than
``Pacing.frame_cost``: at 1,000 subscribers a flush took 42-46 us a frame, so a linger of
25 us a frame started the next flush while the last was still being written, the sender's
stream was read only between flushes, and a message waited 75 ms (p50; p99 200 ms) before
it was even read (bench/README.md, item 22). When the event loop is saturated the linger
stretches further (``Pacing.linger``), from ``frame_cost`` alone: then latency is queueing
anyway, and the time between flushes is what lets the server read new messages at all. A write's
completion reaches the loop through the same queue as a read's, so a read waits behind every
write in flight. At 10,000 subscribers, with the linger capped at 20 ms, the sender got one
message read per pass over the room, and every frame carried one message.

Big rooms roll (``Pacing.roll_from``): a room of 800 or more is not woken all at once but
in chunks of ``Pacing.roll_chunk`` subscribers, in the order they became ready, the next
chunk once half of the last has written (or after ``Pacing.roll_wait``), each subscriber
taking everything up to the log's end when its turn comes. Waking 1,000 at once ran 1,000
writes in one turn of the loop (about 28 ms): the sender's stream was not read meanwhile,
so a message waited for the wave to end, then for the room's linger, then for its place in
the next wave (p99 93 ms at 100 msg/s into 1,000). Waiting on the writes' completions lets
the loop read between chunks, and what arrives during a pass goes out in the same pass.
The price is the whole core for a busy room (about 28 us a frame, 2.7 messages a frame
there), so a room whose frames carry many messages (``Pacing.saturated_above``: its sender
is faster than its readers) goes back to flushing once per linger, where big frames are
what lets the server read at all (rolling, saturation at 1,000 fell from 3.3M to 0.8M
deliveries/s). bench/README.md, item 24.

Everything runs on one event loop; no locks are needed.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import codec
from .codec import Item

__all__ = ["FRAME_BATCH", "CloseKind", "CloseReason", "Hub", "Item", "Pacing", "Subscriber"]

FRAME_BATCH = 256  # most messages in one frame
# The frames a room keeps built for ranges of its log (``_Room.frames``), in bytes: kept by
# number alone (the 64 newest ranges), 64 readers each once behind at its own place in 256
# messages of 4 KB left 35 MB in a room whose readers had all caught up (a review,
# 2026-11-25). Readers at one place share the newest range, the one worth keeping.
FRAMES_KEPT_BYTES = 4 * codec.FRAME_BYTES


@dataclass(frozen=True)
class Pacing:
    # Server CPU per frame written to one stream (bench/README.md): the least a room assumes.
    frame_cost: float = 25e-6
    # A flush that wakes this many subscribers or more (and nine in ten of the room) is
    # timed, and the room's linger uses the time a frame took there (``_Room.wave_cost``)
    # when that is more than frame_cost.
    measure_from: int = 20
    # A room is quiet, and a message goes out at once, when the one before it is older than
    # this and than the room's linger. (Counting from the last flush instead let the first of
    # every clump of arrivals go out alone: 36% of the flushes at 1,000 msg/s into 100, and a
    # p99 4x round 1's.)
    busy_window: float = 0.02
    # Above loaded_from the linger is at least min_linger, whatever the room's size; between
    # overload_from and overload_full it moves linearly to overload_factor times the normal
    # linger (at least overload_linger). Measured load (tsnetchat.loop): 0.45 at 1,000 msg/s
    # into 9 subscribers, 0.57 at 500 msg/s into 100, 0.73 at 1,000 msg/s into 100,
    # 0.97-0.99 saturated (bench/README.md).
    loaded_from: float = 0.6
    overload_from: float = 0.85
    overload_full: float = 0.97
    overload_factor: float = 4.0
    overload_linger: float = 0.02
    # An idle loop cannot fire a timer sooner than this: epoll waits in whole milliseconds,
    # so a 250 us linger took 1-1.4 ms (measured). A shorter linger is no linger.
    min_linger: float = 0.001
    # Above commit_from messages wait up to commit_window for others to share their SQLite
    # commit (SqliteHistory.linger): at saturation an idle writer thread committed every 2.8
    # messages (measured), and a commit is most of what storing a message costs. Round 1
    # measured 0.5 instead of 0.85 to cost the 9-subscriber p99 at 1,000 msg/s (2.3 -> 4.5 ms).
    commit_from: float = 0.85
    commit_window: float = 0.002
    # Rooms of at least roll_from subscribers roll while not saturated (see the module's
    # docstring; 0: never). At 25-45 us a frame a flush of 800 takes 20-36 ms, longer than
    # busy_window. The next chunk of roll_chunk goes once roll_gate of the last one has
    # written or after roll_wait, whichever is first (one stalled reader must not hold it).
    # Tried at 100 msg/s into 1,000 (2026-11-22, in a version whose big rooms began by
    # flushing per linger): chunks of 32, 64 and 128 and gates of 0.25, 0.5 and 0.75 all gave
    # a p99 of 37-59 ms, one run each, within the noise; 64 and 0.5 kept.
    roll_from: int = 800
    roll_chunk: int = 64
    roll_gate: float = 0.5
    roll_wait: float = 0.005
    # A big room is saturated when its frames carried more than saturated_above messages on
    # average over its last min(room, 1,024) frames, and no longer when under
    # saturated_below. Measured: 2.7 a frame rolling at 100 msg/s into 1,000; 23 rolling
    # and 150-190 flushed per linger with a sender at full speed.
    saturated_above: float = 16.0
    saturated_below: float = 8.0

    def linger(self, subscribers: int, load: float = 0.0, measured: float = 0.0) -> float:
        """Least time between two flushes of a busy room. ``measured`` is the time a frame
        took in the room's own recent flushes (0: not known): a room whose flushes are long
        enough to wait for does not flush again sooner than its last flush took to write
        out. Smaller rooms keep going out at once: 20 subscribers at 500 msg/s, one of them
        stalled, had a p99 of 3.7 ms with a measured 1 ms linger and 1.7 without. Saturated,
        it moves to the stretched linger, which comes from ``frame_cost`` alone: flushes
        timed on a saturated core take longer still, and a floor from those cost 23% of the
        saturation figure at 1,000 subscribers. (Medians of 3 alternated runs, 2026-11-22.)"""
        normal = self.frame_cost * subscribers
        if normal >= self.min_linger:  # (a room whose flush is shorter goes out at once)
            # At most the overload factor: one stall of the loop during a timed flush must
            # not hold the room for many times its flush.
            measured = min(measured, self.frame_cost * self.overload_factor)
            normal = max(normal, measured * subscribers)
        if load > self.loaded_from:
            normal = max(normal, self.min_linger)
        if load <= self.overload_from:
            return normal
        f = min(1.0, (load - self.overload_from) / (self.overload_full - self.overload_from))
        stretched = max(self.frame_cost * subscribers * self.overload_factor,
                        self.overload_linger, normal)  # (never shorter as the load rises)
        return normal + f * (stretched - normal)

    def commit_linger(self, load: float) -> float:
        return self.commit_window if load > self.commit_from else 0.0


class CloseKind(enum.Enum):
    OVERFLOW = "overflow"
    KICKED = "kicked"
    SHUTDOWN = "shutdown"
    FLOOD = "flood"
    # Authorization decided again while the stream was open (gate.py):
    REFUSED = "refused"  # a lock no longer passes (token revoked or expired, key, device)
    NARROWED = "narrowed"  # the room is no longer allowed
    UNVERIFIED = "unverified"  # tailscaled cannot say who is behind the connection
    DONE = "done"  # the client finished: end the stream normally
    FAILED = "failed"  # a bug of the server's while it handled the stream (INTERNAL)


# Closes that mean the subscriber may no longer read the room: nothing more reaches it, from
# the log or from history (``CloseReason.withdraws``).
_WITHDRAWN = frozenset({CloseKind.KICKED, CloseKind.REFUSED, CloseKind.NARROWED,
                        CloseKind.UNVERIFIED})
# Closes that drop what is still queued: nothing more should reach that subscriber.
_DROPPING = _WITHDRAWN | {CloseKind.OVERFLOW, CloseKind.FLOOD}


@dataclass(frozen=True)
class CloseReason:
    kind: CloseKind
    message: str

    @property
    def withdraws(self) -> bool:
        """The subscriber may no longer read the room: kicked, or its lease failed (token
        revoked or expired, grant narrowed, removed from a private room). Its replay from
        history stops at once too (ChatService._replay)."""
        return self.kind in _WITHDRAWN


@dataclass(eq=False)
class Subscriber:
    room: str
    login: str
    token_id: str
    limit: int
    member: object | None = None  # presence info when this is an interactive member
    batch_acks: bool = False  # acks may share batch frames with messages (Hello.batch_acks)
    replayed_to: int = 0  # highest message id already sent from history; skip up to it
    inflight: int = 0  # this member's sends taken and not yet settled (see wait_for_room)
    cursor: int = 0  # the next position in the room's log to send
    # Answers for this subscriber alone, each due once the cursor reaches its position (an
    # ack follows the echo of its message).
    replies: deque[tuple[int, Item]] = field(default_factory=deque)
    closed: CloseReason | None = None
    _room: _Room | None = None
    # A bare future rather than an asyncio.Event: this is the hottest wait in the server.
    _waiter: asyncio.Future[None] | None = None
    # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call,
    # which was 6% of the loop's time at 100k deliveries/s (py-spy --native).
    _loop: asyncio.AbstractEventLoop | None = None
    _drained: asyncio.Event = field(default_factory=asyncio.Event)
    _wave: int = 0  # the timed flush that woke this subscriber, until it is back (_Room)
    _chunk: int = 0  # the rolling chunk that woke this subscriber, until it is back (_Room)

    def _own_due(self) -> bool:
        """Closed, or an answer of its own is due: what needs no flush or chunk."""
        return self.closed is not None or bool(self.replies
                                               and self.replies[0][0] <= self.cursor)

    async def wait(self) -> None:
        """Return when there is something to ``take``, or the subscriber is closed."""
        r = self._room
        if self._chunk:  # back from writing what a rolling chunk let it take
            if r is not None and self._chunk == r.chunk:
                r.chunk_returned()
            self._chunk = 0
        if self._wave:  # back from writing what a timed flush released
            if r is not None and self._wave == r.wave:
                r.returned()
            self._wave = 0
        while r is not None:
            if self._own_due():
                return
            if r.rolling:
                # With something to take, queue for a chunk; caught up, wait for a publish.
                queued = self.cursor < r.end
            elif self.cursor < r.mark:
                return
            else:
                queued = False
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            # The waiter exists before the room may look for it (``next_chunk``).
            self._waiter = self._loop.create_future()
            if queued:
                r.queue[self] = None
                if not r.passing:
                    r.next_chunk()
            else:
                r.idle[self] = None
            try:
                await self._waiter
            finally:
                self._waiter = None
                r.idle.pop(self, None)
                r.queue.pop(self, None)
            if r.rolling:
                return  # its turn (or it was closed, or an answer of its own is due)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def take(self) -> tuple[list[bytes], int]:
        """The frames due now (at most FRAME_BATCH messages of the log at a time, then the
        answers that are due), and how many messages they deliver. Advances the cursor."""
        r = self._room
        self._drained.set()
        if r is None or (self.closed is not None and self.closed.kind in _DROPPING):
            return [], 0
        if self.cursor < r.base:
            self.close(_overflow(self))
            return [], 0
        # A closed (finishing) subscriber gets everything published before the close.
        # (A rolling room's readers take everything stored when their turn comes.)
        upto = r.end if self.closed is not None or r.rolling else r.mark
        start, stop = self.cursor, min(upto, self.cursor + FRAME_BATCH)
        self.cursor = max(start, stop)
        due: list[Item] = []
        while self.replies and self.replies[0][0] <= self.cursor:
            due.append(self.replies.popleft()[1])
        frames: list[bytes] = []
        n = 0
        if start < stop:
            if due and self.batch_acks:  # its own frame: acks ride with the messages
                items = r.slice(start, stop)
                n = sum(1 for i in items if i.id > self.replayed_to)
                frames = codec.pack([*items, *due], self.replayed_to, batch_acks=True)
                r.count_frame(n)
                return frames, n
            frames, n = r.frames(start, stop, self.replayed_to)
            if n:
                self.replayed_to = 0  # ids only grow: the replay cannot matter any more
                r.count_frame(n)
        if due:
            frames = [*frames, *codec.pack(due, batch_acks=self.batch_acks)]
        return frames, n

    def backlog(self) -> int:
        """Events due to this subscriber and not yet taken."""
        r = self._room
        return (r.end - self.cursor if r is not None else 0) + len(self.replies)

    def reply(self, item: Item) -> None:
        r = self._room
        if r is None or self.closed is not None:
            return
        if len(self.replies) >= self.limit:
            self.close(_overflow(self))
            return
        self.replies.append((r.end, item))
        if self in r.idle and r.end <= self.cursor:
            self._wake()

    def close(self, reason: CloseReason) -> None:
        if self.closed is None:
            self.closed = reason
            if reason.kind in _DROPPING:
                self.replies.clear()
            self._wake()

    async def wait_for_room(self) -> None:
        """Backpressure for a sender: return once what is due to it, counting what its sends
        still being stored will bring (an echo and an ack each), is at most half its limit.

        A member's sends come back to it as messages and acks; reading its requests faster
        than it reads its stream would make it fall behind and be cut off. Waiting here stops
        reading, and HTTP/2 flow control then slows the sender down instead.
        """
        while self.backlog() + 2 * self.inflight > self.limit // 2 and self.closed is None:
            self._drained.clear()
            await self._drained.wait()

    async def wait_settled(self) -> None:
        """Return once every send of this member is settled (its ack or refusal queued
        here), or the subscriber is closed. Each settle queues an answer, which is taken
        (``take``) before this wakes. A client that half-closes its stream after sending is
        owed those answers before the stream ends: the stream ended at once, OK, and a
        message stored a moment later was neither acknowledged nor refused."""
        while self.inflight and self.closed is None:
            self._drained.clear()
            await self._drained.wait()


def _overflow(sub: Subscriber) -> CloseReason:
    return CloseReason(CloseKind.OVERFLOW, (
        f"you fell more than {sub.limit} events behind in room {sub.room!r} and were "
        "disconnected so others are not slowed down; reconnect with after_id set to the "
        "last message you saw to catch up from history"))


@dataclass(eq=False)
class _Room:
    limit: int  # events kept in the log: how far behind a subscriber may fall
    pacing: Pacing
    log: deque[Item] = field(default_factory=deque)
    base: int = 0  # the position of log[0]
    mark: int = 0  # positions before this are released to subscribers
    subs: set[Subscriber] = field(default_factory=set)
    # Caught up, waiting for a flush; in the order they began to wait (a dict: ordered).
    idle: dict[Subscriber, None] = field(default_factory=dict)
    members: dict[str, list[Subscriber]] = field(default_factory=dict)
    last_publish: float = -math.inf
    timer: asyncio.TimerHandle | None = None
    _trim_at: int = 64  # log length at which to look for what every reader has taken
    _frames: dict[tuple[int, int], tuple[list[bytes], int]] = field(default_factory=dict)
    _frames_bytes: int = 0  # what ``_frames`` holds (FRAMES_KEPT_BYTES)
    # The last timed flush ("wave"): its number, when it woke how many, how many of those
    # are not back yet; and the time a frame took, smoothed over waves (seconds).
    wave: int = 0
    wave_started: float = 0.0
    wave_size: int = 0
    wave_left: int = 0
    wave_cost: float = 0.0
    # Rolling (see the module's docstring): whether the room rolls, and whether its frames
    # say it is saturated (counted over ``counted_frames`` frames); who has something to take
    # and waits for a chunk, in order; the last chunk: its number, how many of it are not
    # back yet, at how many left the next one goes, whether it is out, its timer.
    rolling: bool = False
    saturated: bool = False
    counted_frames: int = 0
    counted_messages: int = 0
    queue: dict[Subscriber, None] = field(default_factory=dict)
    chunk: int = 0
    chunk_left: int = 0
    chunk_gate: int = 0
    passing: bool = False
    chunk_timer: asyncio.TimerHandle | None = None

    @property
    def end(self) -> int:
        return self.base + len(self.log)

    def append(self, item: Item) -> None:
        self.log.append(item)
        if len(self.log) > self.limit:
            self.log.popleft()
            self.base += 1
        elif len(self.log) >= self._trim_at:
            self.trim()

    def trim(self) -> None:
        """Drop what every reader has taken; close readers the log has already left behind.
        (A log kept at its limit held 8,192 events of 2 KB, 16 MB, in a room whose readers
        were all current.)"""
        low = self.end
        for s in self.subs:
            if s.closed is not None:
                continue
            if s.cursor < self.base:
                s.close(_overflow(s))
            elif s.cursor < low:
                low = s.cursor
        for _ in range(low - self.base):
            self.log.popleft()
        self.base = low
        self._trim_at = max(64, 2 * len(self.log))

    def flush(self, at_once: bool = False) -> None:
        """Release the log up to its end and wake whoever was waiting for it (in a rolling
        room, queue them for chunks unless ``at_once``); time the flush if it wakes at least
        ``Pacing.measure_from`` subscribers at once."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.mark = self.end
        queue = self.rolling and not at_once
        # Timed only when nearly the whole room is waiting: a flush that wakes half of it
        # while the other half is still writing would count their writes as its own.
        woken = len(self.idle)
        timed = (not queue and 0 < self.pacing.measure_from <= woken
                 and woken >= len(self.subs) - len(self.subs) // 10)
        if timed:
            self.wave += 1
            self.wave_started = time.monotonic()
            self.wave_size = self.wave_left = woken
        if queue:
            self.queue.update(self.idle)
        else:
            for s in self.idle:
                if timed:
                    s._wave = self.wave
                s._wake()
        self.idle.clear()
        if queue and not self.passing:
            self.next_chunk()

    def next_chunk(self) -> None:
        """Wake the next ``roll_chunk`` subscribers that wait with something to take, in
        the order they began to wait. The next chunk goes when ``roll_gate`` of these have
        written (``chunk_returned``) or after ``roll_wait``."""
        if self.chunk_timer is not None:
            self.chunk_timer.cancel()
            self.chunk_timer = None
        self.chunk += 1
        n = 0
        while self.queue and n < self.pacing.roll_chunk:
            s = next(iter(self.queue))
            del self.queue[s]
            s._chunk = self.chunk
            s._wake()
            n += 1
        self.passing = n > 0
        if n:
            self.chunk_left = n
            self.chunk_gate = int(n * (1 - self.pacing.roll_gate))
            self.chunk_timer = asyncio.get_running_loop().call_later(self.pacing.roll_wait,
                                                                     self.next_chunk)

    def chunk_returned(self) -> None:
        self.chunk_left -= 1
        if self.chunk_left == self.chunk_gate:
            self.next_chunk()

    def count_frame(self, messages: int) -> None:
        """A frame of ``messages`` was taken: every min(room, 1,024) frames, decide again
        whether the room is saturated."""
        self.counted_frames += 1
        self.counted_messages += messages
        if self.counted_frames < min(len(self.subs), 1024):
            return
        per_frame = self.counted_messages / self.counted_frames
        self.counted_frames = self.counted_messages = 0
        if per_frame > self.pacing.saturated_above:
            self.saturated = True
        elif per_frame < self.pacing.saturated_below:
            self.saturated = False
        self.choose_mode()

    def choose_mode(self) -> None:
        """Roll when big enough and not saturated. Leaving it, release everything to
        everyone: the queued readers are woken and the waiting ones flushed."""
        roll = 0 < self.pacing.roll_from <= len(self.subs) and not self.saturated
        if roll == self.rolling:
            return
        self.rolling = roll
        if roll:
            return
        if self.chunk_timer is not None:
            self.chunk_timer.cancel()
            self.chunk_timer = None
        self.passing = False
        queued, self.queue = self.queue, {}
        for s in queued:
            s._wake()
        self.flush()

    def returned(self) -> None:
        """A subscriber woken by the last timed flush has written what it took. When nine in
        ten are back, that is the flush's time per frame. (Not all: one stalled reader would
        keep the wave open for ever.)"""
        self.wave_left -= 1
        if self.wave_left == self.wave_size // 10:
            took = (time.monotonic() - self.wave_started) / (self.wave_size - self.wave_left)
            self.wave_cost = took if not self.wave_cost else 0.7 * self.wave_cost + 0.3 * took

    def slice(self, start: int, stop: int) -> list[Item]:
        return list(itertools.islice(self.log, start - self.base, stop - self.base))

    def frames(self, start: int, stop: int, skip_through: int) -> tuple[list[bytes], int]:
        """Frames for log positions [start, stop), and the messages they deliver; built once
        and shared, except for a subscriber whose replay already covered some of them."""
        cached = self._frames.get((start, stop))
        if cached is not None and not skip_through:
            return cached
        items = self.slice(start, stop)
        first = next((i.id for i in items if i.id), 0)
        if skip_through and first and first <= skip_through:
            return (codec.pack(items, skip_through),
                    sum(1 for i in items if i.id > skip_through))
        if cached is None:
            # (a rolling room may not flush for a long time)
            if len(self._frames) >= 64 or self._frames_bytes >= FRAMES_KEPT_BYTES:
                self._frames.clear()
                self._frames_bytes = 0
            frames = codec.pack(items)
            cached = self._frames[(start, stop)] = (frames, sum(1 for i in items if i.id))
            self._frames_bytes += sum(map(len, frames))
        return cached


class Hub:
    def __init__(self, pacing: Pacing | None = None,
                 load: Callable[[], float] | None = None) -> None:
        self.pacing = pacing or Pacing()
        self.load = load or (lambda: 0.0)  # the event loop's busy fraction, 0..1
        self._rooms: dict[str, _Room] = {}
        self._by_login: dict[str, set[Subscriber]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, sub: Subscriber) -> None:
        """Register a subscriber; it gets what is published from now on. (Who is announced
        as joining is the servicer's to decide, by the streams whose replay is done.)"""
        room = self._rooms.get(sub.room)
        if room is None:
            room = self._rooms[sub.room] = _Room(sub.limit, self.pacing)
        room.limit = max(room.limit, sub.limit)
        room.subs.add(sub)
        room.choose_mode()
        sub._room = room
        sub.cursor = room.end
        self._by_login.setdefault(sub.login, set()).add(sub)
        if sub.member is not None:
            room.members.setdefault(sub.login, []).append(sub)

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
        room.idle.pop(sub, None)
        room.queue.pop(sub, None)
        room.choose_mode()
        left = False
        if sub.member is not None and sub.login in room.members:
            streams = room.members[sub.login]
            if sub in streams:
                streams.remove(sub)
            if not streams:
                del room.members[sub.login]
                left = True
        if not room.subs:
            for t in (room.timer, room.chunk_timer):
                if t is not None:
                    t.cancel()
            del self._rooms[sub.room]
        return left

    def publish(self, room: str, item: Item) -> int:
        """Add ``item`` to the room's log (O(1)) and see that it is flushed: at once in a
        quiet room, else within the room's linger. Returns how many subscribers get it."""
        r = self._rooms.get(room)
        if r is None:
            return 0
        r.append(item)
        now = time.monotonic()
        since, r.last_publish = now - r.last_publish, now
        if r.rolling:
            if r.idle:  # (the readers with something to take are queued or writing)
                # Quiet, as below: everyone at once, the quickest way to the last reader.
                quiet = since >= max(self.pacing.linger(len(r.subs), 0.0, r.wave_cost),
                                     self.pacing.busy_window)
                r.flush(at_once=quiet)
            return len(r.subs)
        if r.timer is not None:
            if r.end - r.mark >= r.limit // 4:  # never let a linger push readers out
                r.flush()
            return len(r.subs)
        linger = self.pacing.linger(len(r.subs), self.load(), r.wave_cost)
        if linger < self.pacing.min_linger or since >= max(linger, self.pacing.busy_window):
            r.flush()  # a quiet room: at once
        else:
            # Busy: this message and those after it go out one linger from now.
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            r.timer = self._loop.call_later(linger, r.flush)
        return len(r.subs)

    def flush(self, room: str) -> None:
        """Release what a room holds now (e.g. before its streams are closed)."""
        r = self._rooms.get(room)
        if r is not None:
            r.flush(at_once=True)

    def reply(self, sub: Subscriber, item: Item) -> None:
        """Queue an answer for one subscriber (an ack, an error). It follows everything
        published to the room before it: while the room has a flush pending it waits for
        it, so an ack shares a frame with the echo of the message it acknowledges."""
        sub.reply(item)

    def members(self, room: str) -> list[object]:
        r = self._rooms.get(room)
        if r is None:
            return []
        return [streams[0].member for _, streams in sorted(r.members.items())]

    def subscriptions_of(self, login: str) -> int:
        return len(self._by_login.get(login, ()))

    def rooms(self) -> Iterable[str]:
        return list(self._rooms)

    def rooms_of(self, login: str, *, member: bool = False) -> set[str]:
        """The rooms where ``login`` has an open stream (``member``: a member's, not only a
        read-only feed's)."""
        return {s.room for s in self._by_login.get(login, ())
                if not member or s.member is not None}

    def close_where(self, pred: Callable[[Subscriber], bool], reason: CloseReason) -> int:
        victims = [s for subs in self._by_login.values() for s in subs
                   if s.closed is None and pred(s)]
        for s in victims:
            s.close(reason)
        return len(victims)

    def counts(self) -> tuple[int, int]:
        """(rooms with subscribers, subscribers)."""
        return len(self._rooms), sum(len(r.subs) for r in self._rooms.values())
