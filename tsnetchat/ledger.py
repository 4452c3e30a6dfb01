"""The one place where a message becomes durable and visible.

``Ledger.send`` takes what a member sent and either refuses it or hands it to the history
(``History``: where messages are made durable; SQLite on threads of its own here, a
different backend behind the same interface in cluster mode). Once the history reports it
stored, the ledger publishes it to the room (``Hub``) and acknowledges it to the sender, in
that order; nobody sees a message or its ack before it is durable. Every message ends in
exactly one of:

* an ack (``Sent``) with its id, after the message was stored and published (or, for a
  resend of a stored message, with the original id and nothing published);
* a refusal: an error event naming its ``client_msg_id``, which means it was NOT stored and
  may be sent again with the same id (rate limit, storage failure or timeout, shutdown);
* a refusal as ``Unconfirmed``: the cluster did not confirm it in time, or a hung disk held
  the write it was in, so it may still appear; sent again with the same ``client_msg_id``
  it is stored once. If the write then commits after all, it is published and acknowledged
  then (``History.submit``);
* ``InvalidInput`` raised at once for malformed input (the caller counts those as strikes
  against a flooding client; refusals above are never strikes, though ``send`` says which
  were refused at once, and the caller cuts off a stream that never waits as told).

Knows nothing of gRPC: refusals go out through the ``refuse`` callback the servicer gives,
which turns the error into an event. Tests drive it directly (tests/test_unit_ledger.py).

Edits, deletions and topic changes are drafts too (kinds EDIT, DELETE, TOPIC): validated and
rate-limited here (``edits_per_minute``, a bucket of their own), decided by the history in
the transaction that stores them (the author within ``edit_window_seconds``; an admin may
delete anything), published from the same settle step, and so replayed on resume like any
message. A draft the history turns down settles as ``Refused`` and reaches the sender as an
error naming its client_msg_id. Direct messages and private rooms are rooms whose name and
access the servicer derives; the ledger path is the same. Mentions are recognised here
(``rooms.Mentions``) and stored with the message. Read positions (``mark_read``) are
gathered here and written in batches, so a client acknowledging every message costs one
write per batch, not one per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from . import codec, render
from .errors import (
    InvalidInput,
    LimitExceeded,
    StoreDamaged,
    StoreError,
    TsnetchatError,
    Unconfirmed,
)
from .hub import Hub, Subscriber
from .metrics import Metrics
from .pb import chat_pb2 as pb
from .rooms import Mentions
from .store import (
    Draft,
    HistoryIdentity,
    Outcome,
    Refused,
    RoomState,
    Sender,
    Settle,
    StoredMessage,
    Topic,
    Written,
)
from .throttle import Buckets, LogLimiter, retry_in

log = logging.getLogger("tsnetchat.ledger")

MAX_CLIENT_MSG_ID = 64
MAX_ID = 2**63 - 1  # SQLite's largest integer; larger numbers are not message ids
# More messages waiting for storage than this and new ones are refused at once: a bound on
# memory while the disk is stalled (each waits at most History's wait before it is refused).
MAX_PENDING = 50_000
# Read positions wait this long for others before they are written in one transaction.
MARK_DELAY = 0.2
# Read positions whose write failed (a locked, full or stalled disk) are tried again this long
# after, with those given meanwhile.
MARK_RETRY = 1.0
# A read by the person who gave them waits at most this long for their positions to be
# written (``written_for``): in cluster mode a write also shares them with the cluster,
# which without a quorum takes until it gives up.
MARK_WAIT = 1.0
# Rooms and conversations a person may bring into being by writing the first message there:
# 50 at once, then one a minute. Each is kept for good (ListRooms, unread counts and search
# walk them all), and a token for every room let one person make a new one with every
# message, 5 a second.
NEW_ROOMS_BURST, NEW_ROOMS_RATE = 50, 1 / 60
CHANGES = (pb.MESSAGE_KIND_EDIT, pb.MESSAGE_KIND_DELETE, pb.MESSAGE_KIND_TOPIC)

def check_client_msg_id(client_msg_id: str) -> None:
    """Raise InvalidInput unless ``client_msg_id`` may name a message: at most
    MAX_CLIENT_MSG_ID characters, none of them control or unshown ones (a NUL and escapes
    were stored and echoed; a review, 2026-11-25)."""
    if len(client_msg_id) > MAX_CLIENT_MSG_ID:
        raise InvalidInput(f"client_msg_id longer than {MAX_CLIENT_MSG_ID} characters")
    if render.UNSAFE.search(client_msg_id):
        raise InvalidInput("client_msg_id holds control or invisible characters")


class History(Protocol):
    """Where messages become durable. ``submit`` never blocks; ``then`` runs on the event
    loop after the outcome is final, in submission order (a refusal for waiting too long may
    come before an earlier message's outcome, which a hung disk holds). After an
    ``Unconfirmed`` it may run once more, with the outcome of the write a hung disk held
    (SqliteHistory; cluster mode's copies are made visible by ``Ledger.applied``). Reads may
    wait on the
    disk, so they are coroutines; ``last_id`` and ``rooms`` answer from memory (what has been
    settled)."""

    def submit(self, draft: Draft, then: Settle) -> None: ...

    @property
    def identity(self) -> HistoryIdentity:
        """Which history the ids belong to; another identity or generation (a restore, a
        replaced database) tells resuming clients to start over (store.HistoryIdentity)."""
        ...

    def pending(self) -> int: ...

    def last_id(self, room: str) -> int: ...

    def rooms(self) -> dict[str, int]: ...

    async def after(self, room: str, after_id: int, limit: int) -> list[StoredMessage]: ...

    async def before(self, room: str, before_id: int, limit: int) -> list[StoredMessage]: ...

    async def latest(self, room: str, n: int) -> list[StoredMessage]: ...

    async def drain(self) -> None: ...

    # A team's day (issue 15). ``submit`` also takes EDIT/DELETE/TOPIC drafts: the backend
    # decides an edit or deletion in the same atomic step that stores it (Draft's rules) and
    # settles a refusal as ``Refused``; a deletion removes the target's text (and its edits')
    # from storage and from the search index, keeping a tombstone (``deleted_by``).

    def people(self) -> dict[str, str]:
        """Every sender seen: login -> display name (for recognising mentions)."""
        ...

    def private_members(self, room: str) -> frozenset[str]:
        """A private room's members, from memory; empty when there is no such room."""
        ...

    def private_rooms(self) -> dict[str, frozenset[str]]: ...

    async def set_members(self, room: str, by: str, add: Sequence[str], remove: Sequence[str],
                          *, create: bool = False, within: float | None = None
                          ) -> frozenset[str]:
        """``within``: the seconds the caller still waits for an answer (None: no limit)."""
        ...

    async def topic(self, room: str) -> Topic | None: ...

    async def topics(self, rooms: Collection[str]) -> dict[str, Topic]:
        """The topics of those of ``rooms`` that have one."""
        ...

    async def mark_read(self, marks: Sequence[tuple[str, str, int]]) -> None: ...

    async def read_mark(self, login: str, room: str) -> int: ...

    async def unread(self, login: str, rooms: Sequence[str]) -> list[RoomState]: ...

    async def mentions_of(self, login: str, *, include_read: bool, limit: int,
                          rooms: Sequence[str] | None = None) -> list[StoredMessage]:
        """Newest first, in ``rooms`` only (None: all), applied before ``limit``."""
        ...

    async def search(self, query: str, rooms: Sequence[str], *, author: str = "",
                     since_ms: int = 0, until_ms: int = 0, newest: bool = False,
                     limit: int = 20, offset: int = 0) -> list[StoredMessage]: ...


class SendLimits(Protocol):
    @property
    def max_message_bytes(self) -> int: ...

    @property
    def rate_burst(self) -> int: ...

    @property
    def rate_per_second(self) -> float: ...

    @property
    def edit_window_seconds(self) -> float: ...

    @property
    def edits_per_minute(self) -> int: ...

    @property
    def max_topic_bytes(self) -> int: ...


# How a refusal reaches the member: (its stream, why, client_msg_id, retry after seconds).
Refuse = Callable[[Subscriber, TsnetchatError, str, float], None]


@dataclass(eq=False)
class _Taken:
    """A send handed to the history: its stream, its client_msg_id, and whether it has had
    its answer (then an outcome is a second one: ``History.submit``)."""

    sub: Subscriber
    client_msg_id: str
    answered: bool = False


class Ledger:
    def __init__(self, history: History, hub: Hub, *, limits: Callable[[], SendLimits],
                 refuse: Refuse, metrics: Metrics | None = None,
                 max_pending: int = MAX_PENDING,
                 may_mention: Callable[[str, str], bool] = lambda room, login: True) -> None:
        self.history, self.hub = history, hub
        # Who may be mentioned in a room (the servicer: members of a private conversation).
        self.may_mention = may_mention
        self.people = Mentions(history.people() if hasattr(history, "people") else {})
        self._marks: dict[tuple[str, str], int] = {}
        # Who gave the positions in ``_marks``: ``written_for`` walked all of them on each
        # Join, ListRooms, Unread and Mentions.
        self._marking: set[str] = set()
        self._marks_due: asyncio.TimerHandle | None = None
        # Batches of read positions being written, and whose positions each holds.
        self._marks_writing: dict[asyncio.Task[None], frozenset[str]] = {}
        self.limits = limits  # read on every send; ``apply`` reaches the buckets
        self.refuse = refuse
        self.metrics = metrics or Metrics()
        self.max_pending = max_pending
        self.accepting = True
        first = limits()
        self._buckets = Buckets(first.rate_burst, first.rate_per_second)  # per person
        self._change_buckets = Buckets(first.edits_per_minute, first.edits_per_minute / 60)
        self._new_room_buckets = Buckets(NEW_ROOMS_BURST, NEW_ROOMS_RATE)
        self._coming_rooms: set[str] = set()  # new rooms whose first message is not settled
        self._storage_log = LogLimiter(burst=3, rate=0.1)
        self._unconfirmed_log = LogLimiter(burst=3, rate=0.1)
        self._marks_log = LogLimiter(burst=3, rate=0.1)

    def send(self, sub: Subscriber, sender: Sender, text: str, kind: int,
             client_msg_id: str, *, target: int = 0, admin: bool = False) -> bool:
        """Take a member's message (or edit, deletion, topic) for ``sub.room`` (see the
        module doc). Raises InvalidInput for malformed input; every other outcome reaches
        ``sub`` as an event. False when it was refused at once (the rate, a full queue,
        shutdown): the servicer counts those against a stream that does not wait."""
        limits = self.limits()
        kind = kind or pb.MESSAGE_KIND_TEXT
        check_client_msg_id(client_msg_id)
        mentions: tuple[str, ...] = ()
        if kind in CHANGES:
            text = self._check_change(kind, text, target, limits)
        else:
            if target:
                raise InvalidInput("target_id is only for edits and deletions")
            render.validate_text(text, kind, limits.max_message_bytes)
            self.people.add(sender.login, sender.display_name)
        if kind in (pb.MESSAGE_KIND_TEXT, pb.MESSAGE_KIND_ACTION, pb.MESSAGE_KIND_EDIT):
            # (an edit's are its new text's: the message edited is mentioning them from then
            # on, and no longer those its old text named; "hey alice" edited to "hey team"
            # still counted for alice: a new user's day, 2026-11-24)
            mentions = tuple(x for x in self.people.find(text)
                             if x != sender.login and self.may_mention(sub.room, x))
        if not self.accepting:
            self._refused(sub, client_msg_id, "shutdown", StoreError(
                "the server is shutting down; this message was not stored: send it again "
                "after reconnecting"))
            return False
        # Refusals that take nothing come first, and the limits of edits and new rooms are
        # looked at before any token is taken: a send refused as busy, or by one of those,
        # had used up a message token (an independent review, 2026-11-25).
        pending = self.history.pending()
        if pending >= self.max_pending:
            self._refused(sub, client_msg_id, "busy", StoreError(
                f"the server has {pending} messages waiting to be stored; this one was not "
                "stored: send it again shortly"), 1.0)
            return False
        if kind in CHANGES:
            wait = self._change_buckets.wait(sender.login)
            if wait:
                self._refused(sub, client_msg_id, "rate", LimitExceeded(
                    f"slow down: at most {limits.edits_per_minute} edits, deletions and topic "
                    f"changes a minute (edits_per_minute); {retry_in(wait)}"), wait)
                return False
        new_room = not self.history.last_id(sub.room) and sub.room not in self._coming_rooms
        if new_room:
            wait = self._new_room_buckets.wait(sender.login)
            if wait:
                self._refused(sub, client_msg_id, "rate", LimitExceeded(
                    f"slow down: at most {NEW_ROOMS_BURST} new rooms and conversations at "
                    f"once, then one a minute; this message was not sent, {retry_in(wait)}"),
                    wait)
                return False
        wait = self._buckets.take(sender.login)
        if wait:
            self._refused(sub, client_msg_id, "rate", LimitExceeded(
                f"slow down: at most {limits.rate_per_second:g} messages/s (bursts of "
                f"{limits.rate_burst}); this one was not sent, {retry_in(wait)}"), wait)
            return False
        if kind in CHANGES:
            self._change_buckets.take(sender.login)  # (there was one: looked at above)
        if new_room:
            self._new_room_buckets.take(sender.login)
            self._coming_rooms.add(sub.room)  # (one token a room, however many lines)
        sub.inflight += 1
        self.history.submit(Draft(sub.room, sender, kind, text, client_msg_id, target, mentions,
                                  admin, int(limits.edit_window_seconds * 1000)),
                            partial(self._settled, _Taken(sub, client_msg_id)))
        return True

    @staticmethod
    def _check_change(kind: int, text: str, target: int, limits: SendLimits) -> str:
        if kind == pb.MESSAGE_KIND_TOPIC:
            if target:
                raise InvalidInput("a topic has no target_id")
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limits.max_topic_bytes:
                raise InvalidInput(f"the topic is {size} bytes; the limit is "
                                   f"{limits.max_topic_bytes} (max_topic_bytes)")
            bad = render.UNSAFE.search(text) or (text and "\n" in text)
            if bad:
                raise InvalidInput("a topic is one line of printable text")
            return render.one_line(text)
        if not target:
            raise InvalidInput("an edit or deletion needs the target_id of a message")
        if target > MAX_ID:
            # Reaching SQLite, it raised OverflowError on the writer thread and ended it: no
            # message of anybody's was stored after one such edit (found 2026-11-22).
            raise InvalidInput(f"target_id {target} is not a message id (at most {MAX_ID})")
        if kind == pb.MESSAGE_KIND_DELETE:
            return ""
        render.validate_text(text, pb.MESSAGE_KIND_TEXT, limits.max_message_bytes)
        return text

    def applied(self, msg: StoredMessage, ours: bool) -> None:
        """Cluster mode (``ClusterHistory.on_applied``): make visible a message stored
        through the cluster that no ``send`` here settles. Another server's (``ours``
        False) counts against its sender's rate limit here too, so the limit holds across
        servers (as far as their buckets are full: a message already stored elsewhere is
        never refused); one of ours, whose sender was refused before this server's copy
        had it, is counted as stored here."""
        if ours:
            self.metrics.inc("messages_total")
        else:
            self._buckets.take(msg.sender.login)
        self.hub.publish(msg.room, codec.message_item(msg))

    def apply(self, limits: SendLimits) -> None:
        """New rate limits (a reload), also for the buckets of people already seen."""
        self._buckets.configure(limits.rate_burst, limits.rate_per_second)
        self._change_buckets.configure(limits.edits_per_minute, limits.edits_per_minute / 60)

    # read positions ----------------------------------------------------------------------

    def mark_read(self, login: str, room: str, last_read: int) -> int:
        """Record that ``login`` has read ``room`` up to ``last_read`` (clamped to the newest
        stored id); written within MARK_DELAY, with others. Returns the clamped id."""
        last_read = min(last_read, self.history.last_id(room))
        key = (login, room)
        if last_read <= self._marks.get(key, 0):
            return last_read
        self._marks[key] = last_read
        self._marking.add(login)
        if self._marks_due is None:
            self._marks_due = asyncio.get_running_loop().call_later(MARK_DELAY, self._write_marks)
        return last_read

    def _write_marks(self) -> asyncio.Task[None] | None:
        """Start writing the read positions gathered so far, on a task of its own (None:
        there are none): it goes on if a caller stops waiting, as the batch holds
        everybody's positions, not only the caller's (a MarkRead whose client hung up
        dropped them all)."""
        if self._marks_due is not None:
            self._marks_due.cancel()
            self._marks_due = None
        marks, self._marks = self._marks, {}
        logins, self._marking = self._marking, set()
        if not marks:
            return None
        task = asyncio.ensure_future(self._store_marks(marks))
        self._marks_writing[task] = frozenset(logins)
        task.add_done_callback(lambda t: self._marks_writing.pop(t, None))
        return task

    async def written_for(self, login: str) -> None:
        """Return once the read positions ``login`` gave so far are written (now, if they
        still wait for others), so that what they read next shows them: unread counts,
        mentions, a Welcome's position; at most MARK_WAIT. Asked right after an Ack, those
        were from before it, for up to MARK_DELAY."""
        if login in self._marking:
            self._write_marks()
        writing = [t for t, logins in self._marks_writing.items() if login in logins]
        if writing:  # (not cancelled if the caller stops waiting: they hold others' too)
            await asyncio.wait(writing, timeout=MARK_WAIT)

    async def flush_marks(self) -> None:
        """Write the read positions gathered so far (now)."""
        task = self._write_marks()
        if task is not None:
            await asyncio.shield(task)

    async def _store_marks(self, marks: dict[tuple[str, str], int]) -> None:
        try:
            await self.history.mark_read([(lg, rm, i) for (lg, rm), i in marks.items()])
        except StoreError as e:  # read positions are a convenience: never fail a stream
            self._marks_log.log(log, logging.WARNING, "could not store %d read positions "
                                "yet: %s", len(marks), e)
            if not self.accepting:  # (the server is stopping: nothing will write them)
                return
            # Kept, and written with the next ones, or MARK_RETRY from now: dropped, a
            # person's positions went back to before a locked or full disk, for good (a
            # chat gives a position once), and their unread counts with them.
            for key, last in marks.items():
                if last > self._marks.get(key, 0):
                    self._marks[key] = last
                self._marking.add(key[0])
            if self._marks_due is None:
                self._marks_due = asyncio.get_running_loop().call_later(MARK_RETRY,
                                                                        self._write_marks)

    def _settled(self, taken: _Taken, outcome: Outcome) -> None:
        """Publish a stored message and acknowledge it; or tell the sender it was not."""
        sub, client_msg_id = taken.sub, taken.client_msg_id
        if taken.answered:  # after an Unconfirmed: the write a hung disk held returned
            # (stored, and nobody saw it: the room's readers went on past its id, and the
            # sender's resend was its only ack)
            if isinstance(outcome, Written) and not outcome.duplicate:
                self.metrics.inc("messages_total")
                self.hub.publish(outcome.message.room, codec.message_item(outcome.message))
                self.hub.reply(sub, codec.sent_item(client_msg_id, outcome.message.id))
            return  # (not stored: the sender was told to send it again, and will)
        taken.answered = True
        sub.inflight -= 1
        self._coming_rooms.discard(sub.room)
        if isinstance(outcome, Unconfirmed):  # it may still appear
            # (refused for 20 s while NATS had no quorum, with nothing in the journal: an
            # operator's run, 2026-11-24)
            self._unconfirmed_log.log(log, logging.WARNING, "refusing messages: they were "
                                      "not confirmed in time (%s)", outcome)
            self._refused(sub, client_msg_id, "unconfirmed", outcome, 1.0)
            return
        if isinstance(outcome, StoreDamaged):  # (no "send it again": only a restore helps)
            self._storage_log.log(log, logging.ERROR, "refusing messages: %s", outcome)
            self._refused(sub, client_msg_id, "storage", outcome)
            return
        if isinstance(outcome, StoreError):
            # Every send fails alike while the disk is full or the database locked: the
            # journal must say so (it said nothing, or only that search indexing lagged).
            self._storage_log.log(log, logging.WARNING,
                                  "refusing messages: the history database failed (%s)", outcome)
            self._refused(sub, client_msg_id, "storage", StoreError(
                f"{outcome}; this message was not stored: send it again"), 1.0)
            return
        if isinstance(outcome, Refused):
            self._refused(sub, client_msg_id, "refused", outcome.error)
            return
        msg, duplicate = outcome
        if not duplicate:
            self.metrics.inc("messages_total")
            self.hub.publish(msg.room, codec.message_item(msg))
        self.hub.reply(sub, codec.sent_item(client_msg_id, msg.id))

    def _refused(self, sub: Subscriber, client_msg_id: str, reason: str,
                 error: TsnetchatError, retry_after: float = 0.0) -> None:
        self.metrics.inc(f"sends_refused_total{{reason=\"{reason}\"}}")
        self.refuse(sub, error, client_msg_id, retry_after)

    def stop_accepting(self) -> None:
        """From now on every send is refused as not stored (the server is going away)."""
        self.accepting = False

    async def drain(self) -> None:
        """Return once every message taken so far is stored (and published and acknowledged)
        or refused."""
        await self.history.drain()
        await self.flush_marks()
        if self._marks_writing:  # (those whose callers stopped waiting)
            await asyncio.wait(set(self._marks_writing))
