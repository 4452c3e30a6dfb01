"""The gRPC servicer: tsnetchat.v1.Chat on grpc.aio.

It joins the pieces: the Gate admits a call (and keeps deciding it while it runs), the Ledger
takes messages (stores, publishes and acknowledges them, or refuses them), the Hub fans out,
the codec encodes, the history answers reads. It is the only module that maps tsnetchat
errors to gRPC status codes (``status_for``). Nothing a client sends ends in a traceback: an
unexpected error is logged (a few per minute at most) and answered INTERNAL. Handlers are
registered by hand (``handlers()``) so that responses may be pre-encoded bytes (sent as-is,
encoded once for all subscribers) and undecodable requests reach the handler as GARBAGE and
get INVALID_ARGUMENT instead of an opaque INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import grpc
from google.protobuf.message import DecodeError

from . import auth, codec, render, rooms
from .config import Limits
from .errors import (
    RESUME_HINT,
    InvalidInput,
    LimitExceeded,
    LocalAPIUnavailable,
    PermissionDenied,
    StoreDamaged,
    StoreError,
    TailnetError,
    TsnetchatError,
    Unauthenticated,
    Unavailable,
)
from .gate import Gate, Lease
from .hub import FRAME_BATCH, CloseKind, CloseReason, Hub, Subscriber
from .ledger import MAX_ID, History, Ledger, check_client_msg_id
from .metrics import Metrics
from .pb import chat_pb2 as pb
from .store import Sender, Topic, search_words
from .tailnet import Tailnet
from .throttle import Buckets, Coalescer, LogLimiter, TokenBucket, retry_in

if TYPE_CHECKING:
    from .enroll import Enrollment

# An Away event is announced to every stream of every room its person is in: 10 at once, then
# one every 5 s (a client sends one per /away or /back). Unlimited, one member sent about 2,470
# presence events to a room in 3 s (a review over the real server, 2026-11-23).
AWAY_BURST, AWAY_RATE = 10, 0.2
# A person's first stream into a room announces them (JOINED), their last one leaving LEFT:
# 40 at once (a client reconnecting its 16 rooms is 32), then one a second; more are held
# and only the latest goes out. Unlimited, one member opening and closing Joins sent 898
# presence events in 5 s to everyone in the room (an attacker's run, 2026-11-23).
COMINGS_BURST, COMINGS_RATE = 40, 1.0
MAX_SEARCH_ROOMS = 100  # rooms named in one Search
# Calls that only read: their answer is withheld if the lease failed while it was worked out
# (a change that was made is answered, whatever happened meanwhile), and keeps to the private
# rooms the caller is still a member of (``_still_readable``).
READS = frozenset({"History", "ListRooms", "Unread", "Mentions", "Search", "WhoAmI"})
MAX_LOGINS = 1000  # logins named in one CreateRoom or SetRoomMembers
# How long the tailnet's logins, once asked of tailscaled, answer for the next new DM names.
# Asked for each name, one Search naming 100 DMs made 100 LocalAPI status calls, and 30 such
# searches took 3.4 s of the server's core and took bob's WhoAmI from 5 to 55 ms on average
# (an attacker's run over the lab, 2026-11-24); the status grows with the tailnet.
PEERS_FRESH = 2.0

log = logging.getLogger("tsnetchat.service")

SERVICE_NAME = "tsnetchat.v1.Chat"
HELLO_TIMEOUT = 10.0
# Malformed events in a row (garbage, bad text, a second hello) before a Join stream is cut
# off as flooding. Refusals (rate limit, storage) never count: a client that is told to wait
# has done nothing wrong (issues 16 and 18); only one that never waits is cut off (below).
INVALID_IN_A_ROW = 20
# Events a Join stream sends that do nothing (a send or an away change refused at once: its
# rate, the server busy or shutting down, a topic only admins may set; an ack that moves no
# read mark; a malformed event), after which it is cut off: a burst of IDLE_BURST, then
# IDLE_RATE a second.
# One member sending without ever waiting as told (retry_after) had 16,500 events a second
# refused on 4 streams, or 32,000 acks a second taken, and everyone else's messages took
# 96 ms instead of 8 (an attacker's run over the lab, 2026-11-25). A client that waits as
# told, or a window of 512 refused at once, stays far below.
IDLE_BURST, IDLE_RATE = 1000, 50.0
# Streams a person may open beyond max_rooms_per_client in rooms they already have open
# (``_check_capacity``).
SAME_ROOM_HEADROOM = 4



async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                 details: str) -> None:
    """End the call with ``code``, unless it already has a status: a stream closed a moment
    before (``ChatService._live``) made grpc.aio raise UsageError "Abort already called!"
    here, a traceback in the log (seen by the kill -9 review, 2026-11-22)."""
    try:
        await context.abort(code, details)
    except grpc.aio.UsageError:
        raise grpc.aio.AbortError() from None

def said_bug(method: str, e: Exception, logger: logging.Logger, error_log: LogLimiter) -> str:
    """Log a bug, not the client's doing, ``e`` in ``logger`` as often as ``error_log`` lets
    (a client must not be able to fill the journal with tracebacks by repeating the
    request); return what the caller is told."""
    error_log.log(logger, logging.ERROR, "%s failed unexpectedly", method, exc_info=e)
    return f"{method}: internal error; the server's log says more"


async def abort_bug(context: grpc.aio.ServicerContext[Any, Any], method: str, e: Exception,
                    logger: logging.Logger, error_log: LogLimiter) -> None:
    """Answer a bug: INTERNAL, said as ``said_bug`` says it."""
    await _abort(context, grpc.StatusCode.INTERNAL, said_bug(method, e, logger, error_log))


class _Garbage:
    """Stands for a request that could not be decoded."""


GARBAGE = _Garbage()


class _Coming(NamedTuple):
    """A person's coming into a room (JOINED) or going (LEFT), as the room is told it."""

    room: str
    kind: int
    who: pb.Identity
    reason: str = ""


def status_for(e: BaseException) -> grpc.StatusCode:
    if isinstance(e, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(e, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(e, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, StoreDamaged):  # (not UNAVAILABLE: nothing gets better by waiting)
        return grpc.StatusCode.DATA_LOSS
    if isinstance(e, LocalAPIUnavailable | StoreError | Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


_CLOSE_STATUS = {
    CloseKind.OVERFLOW: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CloseKind.FLOOD: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CloseKind.KICKED: grpc.StatusCode.PERMISSION_DENIED,
    CloseKind.SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
    CloseKind.REFUSED: grpc.StatusCode.UNAUTHENTICATED,
    CloseKind.NARROWED: grpc.StatusCode.PERMISSION_DENIED,
    CloseKind.UNVERIFIED: grpc.StatusCode.UNAVAILABLE,
    CloseKind.FAILED: grpc.StatusCode.INTERNAL,
}


# What the others in the room are told when a member's stream is closed (Presence.reason).
# Not the close's own message, which speaks to the member ("you were removed from '+team' by
# alice@...", "token lock: your token was revoked; ask an admin"), and which everyone in
# the room used to see (a new user's day, 2026-11-23). A token or grant taken away is the
# member's business: they just leave.
LEFT_BECAUSE = {
    CloseKind.OVERFLOW: "fell too far behind",
    CloseKind.FLOOD: "sent too many invalid requests",
    CloseKind.KICKED: "removed from the room",
    CloseKind.UNVERIFIED: "their device went offline or left the tailnet",
}


async def _end(reason: CloseReason, context: grpc.aio.ServicerContext) -> None:
    """End a closed subscriber's call with the status its close stands for."""
    await context.abort(_CLOSE_STATUS.get(reason.kind, grpc.StatusCode.INTERNAL),
                        reason.message)


async def _end_if_cut_off(sub: Subscriber, lease: Lease,
                          context: grpc.aio.ServicerContext) -> None:
    """End the call now if the subscriber may no longer read its room (its lease failed, it
    was kicked or removed), or the server is shutting down: a replay closed by the shutdown
    went on to its end, or until the grace ran out and its client was told only CANCELLED (a
    review, 2026-11-25). Any other close ends the stream after the replay (``_live``)."""
    if lease.error is not None:  # (the lease, not the first close: SHUTDOWN, then revoked)
        await _end(_closing(lease.error), context)
    if sub.closed is not None and (sub.closed.withdraws
                                   or sub.closed.kind is CloseKind.SHUTDOWN):
        await _end(sub.closed, context)


def _closing(e: TsnetchatError) -> CloseReason:
    """How a stream whose lease failed is closed: the status says which lock failed."""
    code = status_for(e)
    kind = (CloseKind.NARROWED if code == grpc.StatusCode.PERMISSION_DENIED else
            CloseKind.UNVERIFIED if code == grpc.StatusCode.UNAVAILABLE else CloseKind.REFUSED)
    return CloseReason(kind, str(e))


def _check_id(name: str, value: int) -> None:
    if value > MAX_ID:
        raise InvalidInput(f"{name} {value} is not a message id (at most {MAX_ID})")


def _safe(cls: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError):
            return GARBAGE

    return decode


# What an answer needs to get back to the caller before its deadline (a refusal it can read
# instead of its own DEADLINE_EXCEEDED); over the lab's tailnet a reply takes a few ms.
ANSWER_MARGIN = 0.5


def _answer_within(context: grpc.aio.ServicerContext) -> float | None:
    """How long a call may wait for the cluster and still answer before the caller's
    deadline (None: the caller set none)."""
    left = context.time_remaining()
    return None if left is None else max(0.1, left - ANSWER_MARGIN)


def _encode(x: Any) -> bytes:
    return x if isinstance(x, bytes) else bytes(x.SerializeToString())


class ServerStore(History, Protocol):
    """What the servicer needs of storage: the message history, and revocations."""

    async def revoke(self, jti: str, *, within: float | None = None) -> bool: ...

    async def knows_token(self, jti: str) -> bool:
        """Whether ``jti`` may be a token this server's history signed or heard of (a
        cluster's: any id, since its tokens are recorded where they were signed)."""
        ...

    async def caught_up(self, room: str, after: int, within: float | None = None) -> bool:
        """Whether this server's history has message ``after`` of ``room`` if there is one
        (cluster mode: this server's copy, if the cluster has it), waiting for it a while."""
        ...


# A person's History answers may come this many seconds' worth of history_kib_per_second
# at once (a chat scrolling back, `history` reading its 50 pages), then at that rate. Counted
# in what was answered: asked one page after another, small pages cost little.
HISTORY_BURST_SECONDS = 8


# The most a History page (or the Mentions answer) holds, encoded: under the 4 MiB a stock
# gRPC client (this one's too) accepts. 200 messages of the 60,000 bytes max_message_bytes
# allows made a page of 12 MB, and 80 one of 4.7 MB, refused by the client: "Received
# message larger than max" (a review, 2026-11-25). A History page cut short says there is
# more (as replays keep to codec.FRAME_BYTES a frame).
HISTORY_PAGE_BYTES = 3 * codec.FRAME_BYTES


def _within(page: list[pb.ChatMessage], most: int, *, from_first: bool
            ) -> list[pb.ChatMessage]:
    """The messages of ``page`` that fit in ``most`` bytes encoded, counted from its first
    (``from_first``) or its last; at least one."""
    size, n = 0, 0
    for m in page if from_first else reversed(page):
        size += m.ByteSize() + 8  # (and its field's tag and length)
        if size > most and n:
            break
        n += 1
    return page[:n] if from_first else page[len(page) - n:]


def _history_budget(limits: Limits) -> tuple[int, float]:
    kib = limits.history_kib_per_second
    return kib * HISTORY_BURST_SECONDS, float(kib)


MAX_RETRY_AFTER_MS = 2**32 - 1  # Error.retry_after_ms is a uint32


def _failed_unseen(room: str, by: str, task: asyncio.Future[Any]) -> None:
    """Say in the log how a membership change whose caller stopped waiting ended, if it
    failed (its caller was told only its own deadline or hang-up)."""
    if task.cancelled() or task.exception() is None:
        return
    e = task.exception()
    if isinstance(e, TsnetchatError):
        log.warning("private room %r: the change by %r failed after its caller stopped "
                    "waiting (nobody was added or removed): %s", room, by, e)
    else:
        log.error("private room %r: the change by %r failed unexpectedly after its caller "
                  "stopped waiting", room, by, exc_info=e)


def _nobody(room: str) -> list[pb.Identity]:
    return []


@dataclass(frozen=True)
class Elsewhere:
    """What the servicer asks of the other servers of a chat cluster (tsnetchat.cluster),
    given at construction; the defaults are a server alone's. ``servers``: every server, for
    the Welcome and the ReplayDone (a Subscribe stream's only news of them); ``kick``: a
    kick passed on to the others (room, login, by whom, seconds the caller still waits),
    raising StoreError when the cluster does not confirm it; ``members``: who is in a room
    through the others; ``share_presence``: a coming or going here, told to the others."""

    servers: Callable[[], list[pb.ClusterServer]] = list
    kick: Callable[[str, str, str, float | None], Awaitable[None]] | None = None
    members: Callable[[str], list[pb.Identity]] = _nobody
    share_presence: Callable[[str, int, pb.Identity], None] | None = None


class ChatService:
    def __init__(self, *, store: ServerStore, hub: Hub, gate: Gate, limits: Limits,
                 tailnet: Tailnet, metrics: Metrics | None = None,
                 enrollment: Enrollment | None = None,
                 elsewhere: Elsewhere = Elsewhere()) -> None:
        self.store, self.hub, self.gate, self.limits = store, hub, gate, limits
        self.tailnet = tailnet  # who is on the tailnet (a new DM's logins)
        self.enrollment = enrollment  # Login and RenewToken (enroll.py)
        self.metrics = metrics or Metrics()
        self.ledger = Ledger(store, hub, limits=lambda: self.limits, refuse=self._refuse,
                             metrics=self.metrics, may_mention=self._may_mention)
        self._call_buckets = Buckets(limits.call_burst, limits.call_rate)  # calls
        self._search_buckets = Buckets(limits.searches_per_minute,
                                       limits.searches_per_minute / 60)
        self._history_kib = Buckets(*_history_budget(limits))  # KiB of History answered
        self._away_buckets = Buckets(AWAY_BURST, AWAY_RATE)  # Away events, per person
        self._comings: Coalescer[_Coming] = Coalescer(COMINGS_BURST, COMINGS_RATE,
                                                      self._came_or_went)
        self._present: set[tuple[str, str]] = set()  # (login, room) rooms were told are in
        # (login, room) -> the person's Join streams there whose replay is done: the first
        # of them announces the person; their last stream of all, replaying or not, their
        # going. (The hub's first stream announced them, replaying or not: one that ended in
        # its replay while a second was open left the room told neither; an independent
        # review, 2026-11-25.)
        self._inside: dict[tuple[str, str], int] = {}
        self._away: dict[str, str] = {}  # login -> away message (set by an Away event)
        self._error_log = LogLimiter(burst=5, rate=0.2)
        # (when answered, or asked while in flight; the question)
        self._logins_asked: tuple[float, asyncio.Future[set[str]]] | None = None
        # Set by ``begin_shutdown``; awaited by a Join still reading its hello (not yet in
        # the hub, so not closed with the rest).
        self._going_away = asyncio.Event()
        self.servers = elsewhere.servers  # (cluster mode: ``Elsewhere``)
        self.kick_elsewhere = elsewhere.kick
        self.members_elsewhere = elsewhere.members
        self.presence_shared = elsewhere.share_presence

    def apply(self, limits: Limits) -> None:
        """New limits (a reload): for new calls, and for the rate buckets of everyone.
        Admins reading others' conversations stop when admins_read_dms is turned off."""
        self.limits = limits
        if not limits.admins_read_dms:
            self.hub.close_where(
                lambda s: rooms.is_dm(s.room) and s.login not in rooms.dm_members(s.room),
                CloseReason(CloseKind.NARROWED, "admins_read_dms was turned off: admins no "
                                                "longer read conversations they are not in"))
        self.ledger.apply(limits)
        self._call_buckets.configure(limits.call_burst, limits.call_rate)
        self._search_buckets.configure(limits.searches_per_minute,
                                       limits.searches_per_minute / 60)
        self._history_kib.configure(*_history_budget(limits))

    # who may read what (tsnetchat.rooms) ---------------------------------------------

    def access(self) -> rooms.Access:
        return rooms.Access(self.store.private_members, self.limits.admins_read_dms)

    def _canonical(self, p: auth.Principal, room: str) -> str:
        """The room ``room`` names for ``p`` (a DM's canonical name); raises InvalidInput."""
        if rooms.is_dm(room):
            return self._dm(p, room)[0]
        rooms.check_name(room)
        return room

    def _dm(self, p: auth.Principal, room: str,
            peers: Collection[str] | None = None) -> tuple[str, list[str]]:
        """The conversation DM ``room`` names for ``p``, and the logins in it that nobody
        known has (kept as typed). Each login is spelled as the one person who has it,
        compared case-insensitively (rooms.spelling), among whoever has used this server
        (``ledger.people``) and ``peers`` (the tailnet's logins); failing those, among the
        members of stored conversations (who may have left the tailnet since).

        To read (``peers`` None), a stored conversation named exactly is that one, as
        before. To write, the person comes first: "Bob@X" is bob@x's conversation even
        where a conversation with "Bob@X" was stored before logins were resolved."""
        listed = rooms.dm_members(room)
        # An admin allowed to read others' conversations names them as they are.
        me = "" if (p.admin and self.limits.admins_read_dms and len(listed) > 1
                    and p.login not in listed) else p.login
        name = rooms.dm_room(me, room, self.limits.max_dm_members)
        if peers is None and self.store.last_id(name):
            return name, []
        spelled, unknown = self._spell(sorted(rooms.dm_members(name) - {p.login}), peers)
        name = rooms.dm_room(me, rooms.DM_PREFIX + ",".join(spelled),
                             self.limits.max_dm_members)
        return name, unknown

    def _spell(self, logins: Iterable[str], peers: Collection[str] | None
               ) -> tuple[list[str], list[str]]:
        """``logins`` spelled as the one person who has each, compared case-insensitively
        (rooms.spelling), among whoever has used this server (``ledger.people``) and
        ``peers`` (the tailnet's logins); failing those, among the members of stored
        conversations (who may have left the tailnet since). Also the logins nobody known
        has (kept as typed in the first list)."""
        stored: set[str] | None = None
        spelled, unknown = [], []
        for login in logins:
            key = login.lower()
            like = self.ledger.people.logins_like(login)
            like |= {x for x in peers or () if x.lower() == key}
            if not like:
                if stored is None:
                    stored = {m for r in self.store.rooms() if rooms.is_dm(r)
                              for m in rooms.dm_members(r)}
                like = {x for x in stored if x.lower() == key}
            known = rooms.spelling(login, like)
            spelled.append(known or login)
            if known is None:
                unknown.append(login)
        return spelled, unknown

    async def _conversation(self, p: auth.Principal, room: str, *, speak: bool = False) -> str:
        """The room ``room`` names for ``p`` (``_canonical``); a DM's logins checked as
        somebody's (``_dm_to_write``) when ``p`` takes part in it (``speak``: a Join) or it
        is not stored yet. A Subscribe is listed as the conversation's while it lasts: one to
        a made-up login put "it-support-reset-your-password-at@evil.example" in alice's list
        of conversations (an attacker's run, 2026-11-24); a Search naming a typo read as
        done, "no messages match"."""
        name = self._canonical(p, room)
        if rooms.is_dm(name) and (speak or not self.store.last_id(name)):
            name = await self._dm_to_write(p, room)
        return name

    async def _dm_to_write(self, p: auth.Principal, room: str) -> str:
        """``_dm`` with each login that of somebody (``_conversation``): a message to a typo
        would be stored where nobody ever reads it. Asks tailscaled who is on the tailnet
        unless every login is of somebody who has used this server. Raises InvalidInput, or
        Unavailable when tailscaled cannot say."""
        name, unknown = self._dm(p, room, ())  # (a malformed name is refused here)
        typed = {x.strip() for x in room[len(rooms.DM_PREFIX):].split(",")} - {"", p.login}
        if unknown or not all(self.ledger.people.knows(x) for x in typed):
            # (a login typed exactly as somebody's is theirs, whatever the tailnet says)
            name, unknown = self._dm(p, room, await self._peers(f"in {room[:80]!r}"))
        if unknown:
            raise InvalidInput(
                f"nobody with the login {unknown[0][:60]!r} is on the tailnet or has used this "
                "server (or several people have it, in different capitals); check the "
                "spelling")
        return name

    async def _peers(self, where: str) -> set[str]:
        """``_tailnet_logins``, or Unavailable saying that the logins ``where`` could not be
        checked."""
        try:
            return await self._tailnet_logins()
        except TailnetError as e:
            raise Unavailable(f"cannot check the logins {where}: tailscaled did not say who "
                              f"is on the tailnet ({e}); try again") from e

    async def _tailnet_logins(self) -> set[str]:
        """The logins (and tags) of every device on the server's tailnet, itself included:
        asked of tailscaled again once the answer is ``PEERS_FRESH`` seconds old (callers
        meanwhile share it, or the question in flight); a failure is not kept."""
        loop = asyncio.get_running_loop()
        asked = self._logins_asked
        if asked is not None and asked[1].done() and (
                asked[1].cancelled() or asked[1].exception() is not None
                or loop.time() - asked[0] > PEERS_FRESH):
            asked = None
        if asked is None:
            question = asyncio.ensure_future(self._ask_logins())
            asked = self._logins_asked = (loop.time(), question)

            def answered(f: asyncio.Future[set[str]]) -> None:  # (fresh from the answer on)
                if self._logins_asked is not None and self._logins_asked[1] is f:
                    self._logins_asked = (loop.time(), f)

            question.add_done_callback(answered)
        return await asyncio.shield(asked[1])

    async def _ask_logins(self) -> set[str]:
        st = await self.tailnet.status()
        out: set[str] = set()
        for node in (st.self_node, *st.peers):
            out.update(node.tags)
            if node.login and not node.tags:  # a tagged node's login is "tagged-devices"
                out.add(node.login)
        return out

    async def _readable(self, p: auth.Principal, room: str) -> str:
        """The room ``room`` names for ``p`` (``_conversation``: a DM not stored is refused
        if it names a login nobody has), which ``p`` may read; raises PermissionDenied. (A
        MarkRead of a DM naming a typo was answered as done, read up to 0, where History of
        it said nobody has that login; a review, 2026-11-25.)"""
        room = (await self._conversation(p, room) if rooms.is_conversation(room)
                else self._canonical(p, room))
        self.access().check(p, room)
        return room

    def _still_readable(self, lease: Lease) -> Callable[[str], bool]:
        """Whether the caller may read a room as decided now, for a read's answer once it
        is worked out (``READS``; the lease itself is checked by ``_call``): a member removed
        from a private room while their History or Search of it was still reading got its
        messages (an independent review, 2026-11-25)."""
        access, p = self.access(), lease.principal
        return lambda room: access.may_read(p, room)

    async def _hold(self, lease: Lease, room: str, *,
                    speak: bool = False) -> tuple[auth.Principal, str]:
        """Enter a room for a stream (``speak``: to take part, a Join): token rooms are held
        against the token (the gate), private rooms and DMs against their membership."""
        if rooms.is_conversation(room):
            room = await self._conversation(lease.principal, room, speak=speak)
            p = await lease.hold_conversation(lambda q: self.access().may_read(q, room))
            self.access().check(p, room)
            if speak and rooms.is_dm(room) and p.login not in rooms.dm_members(room):
                raise PermissionDenied(
                    "admins_read_dms lets an admin read a conversation they are not part of "
                    "(History, Subscribe, Search), not join it or write in it")
            return p, room
        return await lease.hold_room(room), room

    def _may_mention(self, room: str, login: str) -> bool:
        if rooms.is_dm(room):
            return login in rooms.dm_members(room)
        if rooms.is_private(room):
            return login in self.store.private_members(room)
        return True

    def _room_members(self, room: str) -> list[str]:
        if rooms.is_dm(room):
            return sorted(rooms.dm_members(room))
        return sorted(self.store.private_members(room))

    async def _topic(self, room: str) -> pb.Topic | None:
        return self._topic_pb(await self.store.topic(room))

    @staticmethod
    def _topic_pb(t: Topic | None) -> pb.Topic | None:
        if t is None or not t.text:
            return None
        return pb.Topic(text=t.text, set_by=codec.identity_pb(t.set_by.login,
                                                               t.set_by.display_name,
                                                               t.set_by.node),
                        set_unix_ms=t.ts_ms, id=t.id)

    # registration ------------------------------------------------------------------

    def handlers(self) -> grpc.GenericRpcHandler:
        h = {
            "Join": grpc.stream_stream_rpc_method_handler(
                self.Join, request_deserializer=_safe(pb.ClientEvent), response_serializer=_encode),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self.Subscribe, request_deserializer=_safe(pb.SubscribeRequest),
                response_serializer=_encode),
        }
        for name, req in [("History", pb.HistoryRequest), ("ListRooms", pb.ListRoomsRequest),
                          ("WhoAmI", pb.WhoAmIRequest), ("Kick", pb.KickRequest),
                          ("RevokeToken", pb.RevokeTokenRequest),
                          ("Unread", pb.UnreadRequest), ("MarkRead", pb.MarkReadRequest),
                          ("Mentions", pb.MentionsRequest), ("Search", pb.SearchRequest),
                          ("CreateRoom", pb.CreateRoomRequest),
                          ("SetRoomMembers", pb.SetRoomMembersRequest)]:
            h[name] = grpc.unary_unary_rpc_method_handler(
                getattr(self, name), request_deserializer=_safe(req), response_serializer=_encode)
        if self.enrollment is not None:
            for name, req in [("Login", pb.LoginRequest), ("RenewToken", pb.RenewTokenRequest)]:
                h[name] = grpc.unary_unary_rpc_method_handler(
                    getattr(self.enrollment, name), request_deserializer=_safe(req),
                    response_serializer=_encode)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, h)

    # helpers -----------------------------------------------------------------------

    @asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext, request: Any = None,
                    method: str = "", *, stream: bool = False) -> AsyncIterator[Lease]:
        """Admit the caller for the whole call (the lease stays decided while it runs),
        translate our errors to statuses, count outcomes. Refusals are logged by the gate."""
        try:
            self._check_going_away()
            async with self.gate.admit(context.peer(), context.invocation_metadata() or (),
                                       method, stream=stream) as lease:
                login = lease.principal.login
                # Everybody who calls can be mentioned by login, short login or name.
                self.ledger.people.add(login, lease.principal.display_name)
                wait = self._call_buckets.take(login)
                if wait:
                    raise LimitExceeded(f"{method}: too many calls (at most "
                                        f"{self.limits.call_rate:g}/s, bursts of "
                                        f"{self.limits.call_burst}); {retry_in(wait)}")
                if request is GARBAGE:
                    raise InvalidInput(f"{method}: the request could not be decoded as a "
                                       f"tsnetchat.v1 message (garbage or wrong schema)")
                yield lease
                if method in READS:
                    # What was read while the lease failed (a revocation, a grant gone) is
                    # not sent: a Search behind busy readers answered after its token was
                    # revoked (an attacker's run, 2026-11-25).
                    lease.check()
        except TsnetchatError as e:
            code = status_for(e)
            self.metrics.inc(f"rpc_errors_total{{code=\"{code.name}\"}}")
            await _abort(context, code, str(e))
        except grpc.aio.AbortError:
            raise  # a status already chosen (a closed stream): not an error of ours
        except grpc.aio.InternalError:
            # grpc core could not send the status just chosen: the caller is gone (a stream
            # closed by a revocation as its client hung up; seen in CI, 2026-11-22). grpc.aio
            # drops it then; a second abort here would be its AssertionError "Abort error
            # has been replaced!" and an ERROR with a traceback.
            raise
        except Exception as e:
            self.metrics.inc("rpc_errors_total{code=\"INTERNAL\"}")
            await abort_bug(context, method, e, log, self._error_log)

    def _enter(self, p: auth.Principal, sub: Subscriber) -> None:
        """Put a Join's or Subscribe's ``sub`` in its room (``hub.add``; from then on
        ``begin_shutdown`` and ``removed_here`` close it), its access and the person's
        streams (``_check_capacity``) decided again with no await between: the wait for this
        server's copy (``_resumable``, cluster mode) came after ``_hold``, and a member
        removed meanwhile entered the room (an independent review, 2026-11-25); streams
        opened all at once each found max_rooms_per_client unspent, and all entered (a
        review, 2026-11-25)."""
        self._check_going_away()
        self.access().check(p, sub.room)
        self._check_capacity(p, sub.room)
        self.hub.add(sub)

    def _check_going_away(self) -> None:
        """Refuse a call, or a stream about to enter its room (``hub.add``: after that,
        ``begin_shutdown`` closes it), once the server is shutting down. A Join admitted
        before and whose hello came after was welcomed, announced as JOINED, and held open
        until gRPC cancelled it at the end of the grace (an independent review)."""
        if self._going_away.is_set():
            raise Unavailable("the server is shutting down; reconnect shortly")

    @staticmethod
    def _me(p: auth.Principal) -> pb.Identity:
        return codec.identity_pb(p.login, p.display_name, p.node)

    def _check_capacity(self, p: auth.Principal, room: str) -> None:
        """At most max_rooms_per_client streams a person, and SAME_ROOM_HEADROOM more in
        rooms they already have open: a /topic, /edit or /delete is a Join stream of its
        own, and with 16 rooms open (two chats of 8, say) it was refused even in a room
        that was open (a daily user's day, 2026-11-25)."""
        n, limit = self.hub.subscriptions_of(p.login), self.limits.max_rooms_per_client
        if n >= limit and not (n < limit + SAME_ROOM_HEADROOM
                               and room in self.hub.rooms_of(p.login)):
            raise LimitExceeded(
                f"you already have {self.limits.max_rooms_per_client} open room streams (the "
                "limit per person); leave a room first")

    async def _replay(self, sub: Subscriber, after: int | None, lease: Lease,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """History frames: everything after ``after``, or the recent backlog. Sets
        ``sub.replayed_to`` so live items already sent here are skipped. Ends the call as
        soon as the subscriber may no longer read the room (its lease failed, or it was
        kicked; whatever closed it first), or the server is shutting down
        (``_end_if_cut_off``): a reader slow enough to stay in its replay got every message
        stored after its token was revoked (an attack on an in-process server, 2026-11-23:
        1,316 of them in 27 s)."""
        room = sub.room
        if after is None:
            msgs = await self.store.latest(room, self.limits.history_on_join)
            sub.replayed_to = msgs[-1].id if msgs else 0
            for i in range(0, len(msgs), FRAME_BATCH):
                chunk = [codec.message_item(m) for m in msgs[i:i + FRAME_BATCH]]
                for f in codec.pack(chunk):
                    await _end_if_cut_off(sub, lease, context)
                    yield f
            return
        cursor = min(after, self.store.last_id(room))
        sub.replayed_to = cursor
        while True:
            await _end_if_cut_off(sub, lease, context)
            msgs = await self.store.after(room, cursor, FRAME_BATCH)
            if not msgs:
                return
            cursor = msgs[-1].id
            sub.replayed_to = cursor
            for f in codec.pack([codec.message_item(m) for m in msgs]):
                await _end_if_cut_off(sub, lease, context)
                yield f

    async def _resumable(self, room: str, after: int | None,
                         context: grpc.aio.ServicerContext) -> None:
        """A stream resuming after an id this server's history does not have yet, and the
        cluster does (cluster mode: this server's copy is behind the stream), waits for the
        copy to have it, and is refused (UNAVAILABLE: try again) if it cannot. Answered at
        once, the client took the copy's lower newest id for a restored history, said so,
        and showed the room again (a failover to a server whose copy was behind; a review
        over the lab, 2026-11-25)."""
        if after is None or after <= self.store.last_id(room):
            return
        if not await self.store.caught_up(room, after, _answer_within(context)):
            raise Unavailable(f"this server's copy of the chat cluster has not caught up with "
                              f"{room!r} yet; try again, or another server of the cluster")

    def _replay_done(self, sub: Subscriber) -> pb.ReplayDone:
        who = self.store.identity
        return pb.ReplayDone(last_id=sub.replayed_to, history_id=who.history_id,
                             history_generation=who.generation, servers=self.servers())

    async def _live(self, sub: Subscriber,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        counters = self.metrics.counters
        while True:
            await sub.wait()
            frames, delivered = sub.take()
            if frames:
                counters["deliveries_total"] += delivered
                counters["frames_total"] += len(frames)
                for f in frames:
                    yield f
                continue
            if sub.closed is None:
                continue  # what was due had been sent from history already
            if sub.closed.kind is CloseKind.DONE:
                return
            await _end(sub.closed, context)

    def members(self, room: str) -> list[pb.Identity]:
        """Who is in the room: here, and (cluster mode) on the other servers."""
        here = [m for m in self.hub.members(room) if isinstance(m, pb.Identity)]
        logins = {m.login for m in here}
        there = [m for m in self.members_elsewhere(room) if m.login not in logins]
        return sorted([*here, *there], key=lambda m: m.login) if there else here

    def _came_or_went(self, c: _Coming) -> None:
        """``Coalescer``'s emit: a person's coming or going, unless the room was told so
        last (``_present``: who it was last told is in). Comings and goings do not always
        turn: a Join ended in its replay as the person's last stream leaves without having
        been announced, and one whose replay ends while another has not ended comes again."""
        key = (c.who.login, c.room)
        if (c.kind == pb.PRESENCE_KIND_JOINED) == (key in self._present):
            return
        if c.kind == pb.PRESENCE_KIND_JOINED:
            self._present.add(key)
        else:
            self._present.discard(key)
        # Somebody also in the room through another server of a cluster neither comes nor
        # goes here (as the other servers' word of them is not said to whoever has them here:
        # Server.start's ``elsewhere``): bob's second stream, on this server, said he joined
        # a room whose member list had him, and its end that he left while he was still in it
        # (a review over the lab and a real NATS cluster, 2026-11-25).
        if all(m.login != c.who.login for m in self.members_elsewhere(c.room)):
            self.announce(c.room, c.kind, c.who, reason=c.reason)
        if self.presence_shared is not None:
            self.presence_shared(c.room, c.kind, c.who)

    def _presence(self, room: str, kind: int, who: pb.Identity, *, away_message: str = "",
                  reason: str = "") -> None:
        self.announce(room, kind, who, away_message=away_message, reason=reason)
        if self.presence_shared is not None:
            self.presence_shared(room, kind, who)

    def announce(self, room: str, kind: int, who: pb.Identity, *, away_message: str = "",
                 reason: str = "") -> None:
        """Tell the room's streams here that ``who`` joined, left or went away."""
        members = self.members(room)
        self.hub.publish(room, codec.event_item(presence=pb.Presence(
            room=room, kind=kind, who=who, members=members,  # type: ignore[arg-type]
            away_message=away_message, reason=reason, away_logins=self._away_of(members))))

    def _away_of(self, members: Iterable[pb.Identity]) -> list[str]:
        return sorted({m.login for m in members if m.login in self._away})

    # RPCs ----------------------------------------------------------------------------

    async def Join(self, request_iterator: AsyncIterator[Any],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # The whole stream runs inside its lease: admitted (and so revocable) before the hello
        # is read, decided again before the room is entered, closed when it fails.
        async with self._call(context, None, "Join", stream=True) as lease:
            hello = await self._read_hello(request_iterator, lease)
            p, room = await self._hold(lease, hello.room, speak=True)
            hello.room = room
            after = hello.after_id if hello.HasField("after_id") else None
            await self._resumable(room, after, context)
            me = self._me(p)
            self.ledger.people.add(p.login, p.display_name)
            sub = Subscriber(hello.room, p.login, p.token_id, self.limits.subscriber_queue,
                             member=me, batch_acks=hello.batch_acks)
            self._enter(p, sub)
            inside = (p.login, hello.room)
            entered = False
            lease.attach(lambda e: sub.close(_closing(e)))
            reader: asyncio.Task[None] | None = None
            self.metrics.inc("streams_opened_total{kind=\"join\"}")
            try:
                await self.ledger.written_for(p.login)  # (its position, as just acked)
                topic = await self._topic(room)
                last_read = await self.store.read_mark(p.login, room)
                # (removed from a private room during those awaits, the Welcome still told
                # its topic and members; an independent review, 2026-11-25)
                await _end_if_cut_off(sub, lease, context)
                members = self.members(hello.room)
                yield codec.event(welcome=pb.Welcome(
                    room=hello.room, you=me, members=members,
                    last_id=self.store.last_id(hello.room),
                    max_message_bytes=self.limits.max_message_bytes,
                    rate_per_second=self.limits.rate_per_second,
                    rate_burst=self.limits.rate_burst, topic=topic,
                    private=rooms.is_conversation(room),
                    member_logins=self._room_members(room) if rooms.is_conversation(room)
                    else (),
                    last_read_id=last_read,
                    history_id=self.store.identity.history_id,
                    history_generation=self.store.identity.generation,
                    servers=self.servers(), away_logins=self._away_of(members)))
                async for f in self._replay(sub, after, lease, context):
                    yield f
                yield codec.event(replay_done=self._replay_done(sub))
                entered = True
                self._inside[inside] = self._inside.get(inside, 0) + 1
                if self._inside[inside] == 1:
                    self._comings.offer(p.login, hello.room,
                                        _Coming(hello.room, pb.PRESENCE_KIND_JOINED, me))
                reader = asyncio.create_task(self._read_client(request_iterator, sub, lease))
                async for f in self._live(sub, context):
                    yield f
            finally:
                if reader is not None:
                    reader.cancel()
                if entered:
                    left = self._inside.pop(inside) - 1
                    if left:
                        self._inside[inside] = left
                if self.hub.remove(sub):  # (their last stream in the room)
                    if inside in self._present:
                        self._comings.offer(p.login, hello.room, _Coming(
                            hello.room, pb.PRESENCE_KIND_LEFT, me,
                            LEFT_BECAUSE.get(sub.closed.kind, "") if sub.closed else ""))
                    else:  # never said to be here: a coming still held is taken back (with
                        # a going held in its place, one per room, let out one a second: 501
                        # held after 576 Joins into new rooms in 10 s; a review, 2026-11-25)
                        self._comings.withdraw(p.login, hello.room)

    async def _read_hello(self, it: AsyncIterator[Any], lease: Lease) -> pb.Hello:
        """The first event, which must be a hello; given up as soon as the lease fails or
        the server begins to stop (UNAVAILABLE: not yet in the hub, the Join was not closed
        by ``begin_shutdown``, the server waited the whole grace for it and its client was
        told only CANCELLED; a review, 2026-11-25)."""
        read = asyncio.ensure_future(anext(it, None))
        going: asyncio.Future[Any] = asyncio.ensure_future(self._going_away.wait())
        try:
            done, _ = await asyncio.wait({read, lease.failure(), going}, timeout=HELLO_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, going):
                if not task.done():
                    task.cancel()
        lease.check()
        self._check_going_away()
        if read not in done:
            raise InvalidInput(f"Join: no hello within {HELLO_TIMEOUT:.0f}s; the first event "
                               "must be hello{room}")
        first = read.result()
        if first is None:
            raise InvalidInput("Join: the stream ended before a hello")
        if first is GARBAGE:
            raise InvalidInput("Join: the first event could not be decoded (garbage)")
        if first.WhichOneof("event") != "hello":
            raise InvalidInput("Join: the first event must be hello{room, after_id}")
        _check_id("after_id", first.hello.after_id)
        return first.hello  # type: ignore[no-any-return]

    async def _read_client(self, it: AsyncIterator[Any], sub: Subscriber, lease: Lease) -> None:
        # The sender is the connection's identity. send.claimed_sender is ignored on purpose.
        p = lease.principal
        sender = Sender(p.login, p.display_name, p.node)
        send = self.ledger.send
        strikes = 0
        idle = TokenBucket(IDLE_BURST, IDLE_RATE)
        acked = 0
        try:
            while True:
                try:
                    ev = await anext(it, None)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the call was cancelled or broke: end it quietly
                    log.debug("reader ended: %r", e)
                    sub.close(CloseReason(CloseKind.DONE, "connection ended"))
                    return
                if ev is None:  # the client finished
                    await sub.wait_settled()  # (its acks or refusals first, then the end)
                    sub.close(CloseReason(CloseKind.DONE, "client finished"))
                    return
                await sub.wait_for_room()
                if sub.closed is not None:
                    return
                if lease.stale or lease.conn.stale:
                    # Decided again before it is read: what a stalled server read after a
                    # narrowed grant was stored, 10 messages in a room no longer allowed,
                    # before the gate's round came (an attacker's run, 2026-11-24). A
                    # failed lease ends the stream (``Join``); this event is dropped.
                    try:
                        await lease.current()
                    except TsnetchatError:
                        return
                cmid = ""
                try:
                    if ev is GARBAGE:
                        raise InvalidInput("could not decode that event (garbage); ignored")
                    which = ev.WhichOneof("event")
                    if which == "send":
                        m = ev.send
                        cmid = m.client_msg_id
                        # Rights as decided now: a grant that took admin away while the
                        # stream stayed open takes admin deletes and topics with it.
                        p = lease.principal
                        if (m.kind == pb.MESSAGE_KIND_TOPIC and self.limits.topic_admins_only
                                and not p.admin):
                            self._refuse(sub, PermissionDenied(
                                "only admins may set topics here (topic_admins_only)"), cmid)
                            if idle.take():
                                break
                            continue
                        taken = send(sub, sender, m.text, m.kind, cmid, target=m.target_id,
                                     admin=p.admin)
                        if not taken and idle.take():
                            break
                    elif which == "ack":
                        _check_id("last_seen_id", ev.ack.last_seen_id)
                        read_to = self.ledger.mark_read(p.login, sub.room, ev.ack.last_seen_id)
                        if read_to > acked:
                            acked = read_to
                        elif idle.take():
                            break
                        continue
                    elif which == "away":
                        check_client_msg_id(ev.away.client_msg_id)
                        cmid = ev.away.client_msg_id
                        # (looked at before it is counted: ten malformed, and the corrected
                        # one was told to slow down)
                        message = self._away_message(ev.away.message)
                        wait = self._away_buckets.take(p.login)
                        if wait:  # (each change is a presence event to every room's streams)
                            self._refuse(sub, LimitExceeded(
                                f"slow down: at most {AWAY_BURST} away changes at once, then "
                                f"one every {1 / AWAY_RATE:.0f}s; {retry_in(wait)}"),
                                cmid, retry_after=wait)
                            if idle.take():
                                break
                            continue
                        self._set_away(p, ev.away.away, message)
                    elif which == "hello":
                        raise InvalidInput("already in a room on this stream; open another Join "
                                           "stream to be in another room")
                    else:
                        raise InvalidInput("empty or unknown event; ignored")
                    strikes = 0
                except InvalidInput as e:
                    strikes += 1
                    self._refuse(sub, e, cmid)
                    if strikes >= INVALID_IN_A_ROW:
                        sub.close(CloseReason(CloseKind.FLOOD, (
                            f"{strikes} malformed events in a row (flooding); disconnected")))
                        return
                    # (does nothing either: 19 between two refused sends, whose strikes start
                    # again, were answered for ever)
                    if idle.take():
                        break
            sub.close(CloseReason(CloseKind.FLOOD, (
                f"more than {IDLE_BURST} events refused at once or doing nothing, faster than "
                f"{IDLE_RATE:g} a second (not waiting as told: retry_after); disconnected")))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug of ours handling an event, answered as ``_call`` answers one (it was
            # taken for the connection ending: the stream ended OK, the event unanswered,
            # and the log said so at debug level).
            self.metrics.inc("rpc_errors_total{code=\"INTERNAL\"}")
            sub.close(CloseReason(CloseKind.FAILED, said_bug("Join", e, log, self._error_log)))

    def _away_message(self, message: str) -> str:
        """An Away event's message as it is kept; raises InvalidInput."""
        message = render.one_line(message)  # (as a topic's)
        if len(message.encode()) > self.limits.max_topic_bytes or (
                render.UNSAFE.search(message) or "\n" in message):
            raise InvalidInput(f"an away message is one line of at most "
                               f"{self.limits.max_topic_bytes} bytes of printable text")
        return message

    def _set_away(self, p: auth.Principal, away: bool, message: str) -> None:
        """/away [message] (or back), ``message`` as ``_away_message`` keeps it: for the
        person, announced in every room they are in."""
        if away and self._away.get(p.login) == message:
            return  # nothing changed: nothing to announce
        if away:
            self._away[p.login] = message
        elif self._away.pop(p.login, None) is None:
            return
        me = self._me(p)
        # (not where they only tail: a Subscribe's person is not among the members; nor
        # where an admin only reads along)
        for room in self.hub.rooms_of(p.login, member=True):
            if self._may_mention(room, p.login):
                self._presence(room, pb.PRESENCE_KIND_AWAY if away else pb.PRESENCE_KIND_BACK,
                               me, away_message=message)

    def _refuse(self, sub: Subscriber, problem: TsnetchatError, client_msg_id: str,
                retry_after: float = 0.0) -> None:
        """Tell a member why the event it sent was not taken (an error event, not the end
        of the stream). The wait is capped at what the protocol's field holds: a rate of
        1e-9 a second made it overflow, which ended the stream's reader and left later sends
        unanswered (an operator's run, 2026-11-24)."""
        self.hub.reply(sub, codec.event_item(error=pb.Error(
            code=status_for(problem).value[0], message=str(problem),
            client_msg_id=client_msg_id,
            retry_after_ms=min(round(retry_after * 1000), MAX_RETRY_AFTER_MS))))

    async def Subscribe(self, request: Any,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async with self._call(context, request, "Subscribe", stream=True) as lease:
            _check_id("after_id", request.after_id)
            p, room = await self._hold(lease, request.room)
            after = request.after_id if request.HasField("after_id") else None
            await self._resumable(room, after, context)
            sub = Subscriber(room, p.login, p.token_id, self.limits.subscriber_queue)
            self._enter(p, sub)
            lease.attach(lambda e: sub.close(_closing(e)))
            self.metrics.inc("streams_opened_total{kind=\"subscribe\"}")
            try:
                async for f in self._replay(sub, after, lease, context):
                    yield f
                yield codec.event(replay_done=self._replay_done(sub))
                async for f in self._live(sub, context):
                    yield f
            finally:
                self.hub.remove(sub)

    async def History(self, request: Any, context: grpc.aio.ServicerContext) -> pb.HistoryResponse:
        async with self._call(context, request, "History") as lease:
            p = lease.principal
            # (a DM with a typo'd login answered "no messages", as a Search once did; a daily
            # user's day, 2026-11-25)
            room = await self._readable(p, request.room)
            _check_id("after_id", request.after_id)
            _check_id("before_id", request.before_id)
            limit = min(request.limit or self.limits.max_page, self.limits.max_page)
            wait = self._history_kib.wait(p.login)
            if wait:
                raise LimitExceeded(
                    f"slow down: at most {self.limits.history_kib_per_second} KiB of history "
                    f"a second (history_kib_per_second); {retry_in(wait)}")
            # Spent before the read as the most the page may be (at most the whole burst),
            # and made what was answered after it: spent only after, pages asked all at once
            # each found the budget unspent (100 of 800 KB answered from 16 MiB; a review,
            # 2026-11-25).
            most = min(limit * self.limits.max_message_bytes, HISTORY_PAGE_BYTES) / 1024
            reserved = min(most, _history_budget(self.limits)[0])
            self._history_kib.spend(p.login, reserved)
            answered = 0.0
            try:
                anchor = request.WhichOneof("anchor")
                if anchor == "after_id":
                    msgs = await self.store.after(room, request.after_id, limit + 1)
                    more = len(msgs) > limit
                    msgs = msgs[:limit]
                else:
                    before = request.before_id if anchor == "before_id" else 2**62
                    msgs = await self.store.before(room, before, limit + 1)
                    more = len(msgs) > limit
                    msgs = msgs[-limit:]
                self.access().check(lease.principal, room)  # (still: READS, _still_readable)
                page = [codec.message_pb(m) for m in msgs]
                kept = _within(page, HISTORY_PAGE_BYTES, from_first=anchor == "after_id")
                res = pb.HistoryResponse(messages=kept, more=more or len(kept) < len(page),
                                         max_page=self.limits.max_page)
                answered = res.ByteSize() / 1024  # (the next call waits)
                return res
            finally:
                self._history_kib.spend(p.login, answered - reserved)
        raise AssertionError("unreachable")  # pragma: no cover - abort raised

    async def ListRooms(self, request: Any,
                        context: grpc.aio.ServicerContext) -> pb.ListRoomsResponse:
        async with self._call(context, request, "ListRooms") as lease:
            p = lease.principal
            infos = []
            states = await self._states(p)
            topics = await self.store.topics([st.room for st in states])
            still = self._still_readable(lease)
            for st in [st for st in states if still(st.room)]:
                n = st.room
                private = rooms.is_conversation(n)
                infos.append(pb.RoomInfo(
                    name=n, last_id=self.store.last_id(n),
                    members=self.members(n),
                    unread=st.unread, unread_mentions=st.mentions, last_read_id=st.last_read,
                    private=private, direct=rooms.is_dm(n),
                    member_logins=self._room_members(n) if private else (),
                    topic=self._topic_pb(topics.get(n))))
            return pb.ListRoomsResponse(rooms=infos,
                                        all_rooms_allowed=auth.ALL_ROOMS in p.rooms)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _states(self, p: auth.Principal) -> list[Any]:
        """Read position and unread counts of every room ``p`` may read (and only those)."""
        await self.ledger.written_for(p.login)
        names = (set(self.store.rooms()) | set(self.hub.rooms())
                 | set(self.store.private_rooms()))
        if auth.ALL_ROOMS not in p.rooms:
            names |= p.room_names
        return await self.store.unread(p.login, self.access().readable(p, names))

    async def Unread(self, request: Any, context: grpc.aio.ServicerContext) -> pb.UnreadResponse:
        async with self._call(context, request, "Unread") as lease:
            states = await self._states(lease.principal)
            still = self._still_readable(lease)
            states = [s for s in states if still(s.room)]
            return pb.UnreadResponse(
                rooms=[pb.RoomInfo(name=s.room, last_id=self.store.last_id(s.room),
                                   unread=s.unread, unread_mentions=s.mentions,
                                   last_read_id=s.last_read, private=rooms.is_conversation(s.room),
                                   direct=rooms.is_dm(s.room)) for s in states],
                total_unread=sum(s.unread for s in states),
                total_mentions=sum(s.mentions for s in states))
        raise AssertionError("unreachable")  # pragma: no cover

    async def MarkRead(self, request: Any,
                       context: grpc.aio.ServicerContext) -> pb.MarkReadResponse:
        async with self._call(context, request, "MarkRead") as lease:
            p = lease.principal
            room = await self._readable(p, request.room)
            _check_id("last_read_id", request.last_read_id)
            self.ledger.mark_read(p.login, room, request.last_read_id)
            await self.ledger.flush_marks()
            return pb.MarkReadResponse(last_read_id=await self.store.read_mark(p.login, room))
        raise AssertionError("unreachable")  # pragma: no cover

    async def Mentions(self, request: Any,
                       context: grpc.aio.ServicerContext) -> pb.MentionsResponse:
        async with self._call(context, request, "Mentions") as lease:
            p = lease.principal
            limit = min(request.limit or self.limits.max_page, self.limits.max_page)
            await self.ledger.written_for(p.login)
            # (the rooms before the limit: filtered after it, mentions in rooms the caller
            # may not read filled the page, and it came back empty)
            msgs = await self.store.mentions_of(p.login, include_read=request.include_read,
                                                limit=limit,
                                                rooms=self.access().readable(p, self.store.rooms()))
            still = self._still_readable(lease)
            return pb.MentionsResponse(messages=_within(
                [codec.message_pb(m) for m in msgs if still(m.room)], HISTORY_PAGE_BYTES,
                from_first=True))  # (the newest)
        raise AssertionError("unreachable")  # pragma: no cover

    async def Search(self, request: Any, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        async with self._call(context, request, "Search") as lease:
            p = lease.principal
            lim = self.limits
            size = len(request.query.encode("utf-8", "surrogatepass"))
            if size > lim.search_max_query_bytes:
                raise InvalidInput(f"the search is {size} bytes; the limit is "
                                   f"{lim.search_max_query_bytes} (search_max_query_bytes)")
            if request.offset > 10_000:
                raise InvalidInput("offset beyond 10000: narrow the search instead")
            if request.order not in pb.SearchOrder.values():  # (it was taken as ranked)
                raise InvalidInput(f"order {request.order} is not one of this server's (rank, "
                                   "newest): a newer client's? upgrade the server")
            search_words(request.query)  # a query without words is refused, whatever one reads
            if len(request.rooms) > MAX_SEARCH_ROOMS:  # (each DM name may be resolved)
                raise InvalidInput(f"a search names at most {MAX_SEARCH_ROOMS} rooms; name none "
                                   "to search every room you can read")
            if len(request.author) > auth.MAX_LOGIN:
                raise InvalidInput(f"the author is not a login (at most {auth.MAX_LOGIN} "
                                   "characters)")
            author = request.author
            if author:
                # (a typo'd author or DM answered "no messages match", and the search read
                # as done: a new user's day, 2026-11-24)
                author = rooms.spelling(author, self.ledger.people.logins_like(author)) or ""
                if not author:
                    raise InvalidInput(f"nobody with the login {request.author[:60]!r} has used "
                                       "this server (or several people have it, in different "
                                       "capitals); check the spelling")
            access = self.access()
            named = list(dict.fromkeys(request.rooms))
            for r in named:
                # A room the token does not allow is refused as everywhere else (naming the
                # rooms it does); a conversation the caller may not read is left out without
                # a word, so a search infers nothing about it.
                if not rooms.is_conversation(self._canonical(p, r)):
                    access.check(p, r)
            # Counted once what it asks is known to be a search (two typos of an author, or
            # of a room, and the corrected search was told to wait; reviews, 2026-11-25), and
            # before its DM names may ask tailscaled (``_conversation``).
            wait = self._search_buckets.take(p.login)
            if wait:
                raise LimitExceeded(f"slow down: at most {lim.searches_per_minute} searches a "
                                    f"minute (searches_per_minute); {retry_in(wait)}")
            if named:
                wanted = [await self._conversation(p, r) for r in named]
                names = [r for r in wanted if access.may_read(p, r)]
            else:
                names = access.readable(p, self.store.rooms())
            limit = min(request.limit or lim.max_search_page, lim.max_search_page)
            msgs = await self.store.search(
                request.query, names, author=author,
                since_ms=request.since_unix_ms, until_ms=request.until_unix_ms,
                newest=request.order == pb.SEARCH_ORDER_NEWEST, limit=limit + 1,
                offset=request.offset)
            # At most HISTORY_PAGE_BYTES, as a History page: with max_search_page raised, 80
            # matches of 59 KB made a 4.7 MB answer, which our client, as every stock gRPC
            # client, refused (a review, 2026-11-25). The next page starts after what was
            # kept (what is no longer readable is counted too: offsets are the store's).
            page = _within([codec.message_pb(m) for m in msgs[:limit]], HISTORY_PAGE_BYTES,
                           from_first=True)
            more = len(msgs) > len(page)
            still = self._still_readable(lease)
            return pb.SearchResponse(messages=[m for m in page if still(m.room)], more=more,
                                     next_offset=request.offset + len(page) if more else 0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def CreateRoom(self, request: Any,
                         context: grpc.aio.ServicerContext) -> pb.RoomMembersResponse:
        async with self._call(context, request, "CreateRoom") as lease:
            p = lease.principal
            auth.check_admin(p)
            if not rooms.is_private(request.room):
                raise InvalidInput("a private room's name starts with '+' (+name)")
            rooms.check_name(request.room)
            members = await self.store.set_members(
                request.room, p.login, await self._somebodys(self._logins(request.members)),
                (), create=True, within=_answer_within(context))
            log.info("private room %r created by %r", request.room, p.login)
            return pb.RoomMembersResponse(room=request.room, members=sorted(members))
        raise AssertionError("unreachable")  # pragma: no cover

    async def SetRoomMembers(self, request: Any,
                             context: grpc.aio.ServicerContext) -> pb.RoomMembersResponse:
        async with self._call(context, request, "SetRoomMembers") as lease:
            p = lease.principal
            auth.check_admin(p)
            if not rooms.is_private(request.room):
                raise InvalidInput("only private rooms (+name) have members")
            rooms.check_name(request.room)
            gone = self._members_named(request.room, self._logins(request.remove))
            added = await self._somebodys(self._logins(request.add))
            both = sorted(set(added) & set(gone))
            if both:  # (the removal won, unsaid: the admin meaning to add bob had him out)
                raise InvalidInput(f"{both[0][:60]!r} is both added and removed; nobody was "
                                   "added or removed")

            async def change() -> tuple[frozenset[str], int]:
                members = await self.store.set_members(request.room, p.login, added, gone,
                                                       within=_answer_within(context))
                # (an admin may add themselves: said in the log, as who did what)
                log.info("private room %r: %r added %r, removed %r", request.room, p.login,
                         sorted(added), sorted(gone))
                return members, self.removed_here(request.room, gone, p.login)

            # Shielded: a change stored after the caller gave up (its deadline, while the
            # database was locked) left the removed members' streams open in the room.
            task = asyncio.ensure_future(change())
            try:
                members, n = await asyncio.shield(task)
            except asyncio.CancelledError:
                # (a failure then reached nobody: "Task exception was never retrieved" and
                # a traceback were all the log said; a review, 2026-11-25)
                task.add_done_callback(partial(_failed_unseen, request.room, p.login))
                raise
            return pb.RoomMembersResponse(room=request.room, members=sorted(members),
                                          streams_closed=n)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _somebodys(self, logins: list[str]) -> list[str]:
        """``logins`` as the people who have them (``_spell``), for a private room's members
        (a typo was kept as a member, and the person meant was left out: a new user's day,
        2026-11-23). Raises InvalidInput naming the first that is nobody's, as a DM to it
        is refused; Unavailable when tailscaled cannot say."""
        if all(self.ledger.people.knows(x) for x in logins):
            return logins
        spelled, unknown = self._spell(logins, await self._peers(f"in {logins!r}"[:90]))
        if unknown:
            raise InvalidInput(f"nobody with the login {unknown[0][:60]!r} is on the tailnet "
                               "or has used this server (or several people have it, in "
                               "different capitals); check the spelling. Nobody was added")
        return spelled

    def _members_named(self, room: str, logins: list[str]) -> list[str]:
        """``logins`` as the members of private ``room`` they name, capitals forgiven as for
        the ones added. Raises InvalidInput naming the first that is nobody's there: a
        removal with a capital or a typo removed nobody, said it had, and the log agreed (an
        attacker over the lab, 2026-11-24)."""
        members = self.store.private_members(room)
        # (as the store says it, not "x is not a member"; a room whose last member was
        # removed still exists, and was said not to)
        if logins and not members and room not in self.store.private_rooms():
            raise InvalidInput(f"there is no private room {room!r}")
        out = []
        for login in logins:
            known = rooms.spelling(login, {m for m in members if m.lower() == login.lower()})
            if known is None:
                some = sorted(members)
                raise InvalidInput(f"{login[:60]!r} is not a member of {room}; nobody was "
                                   f"removed (members: {', '.join(some[:10]) or 'none'}"
                                   f"{', ...' if len(some) > 10 else ''})")
            out.append(known)
        return out

    @staticmethod
    def _logins(values: Any) -> list[str]:
        out = [str(v).strip() for v in values]
        if len(out) > MAX_LOGINS:  # (it said "'too many' is not a tailnet login")
            raise InvalidInput(f"{len(out)} logins in one request; at most {MAX_LOGINS}. "
                               "Nobody was added or removed")
        bad = [v for v in out if not rooms.is_login(v)]
        if bad:
            raise InvalidInput(f"{bad[0][:60]!r} is not a tailnet login")
        return out

    async def WhoAmI(self, request: Any, context: grpc.aio.ServicerContext) -> pb.WhoAmIResponse:
        async with self._call(context, request, "WhoAmI") as lease:
            p = lease.principal
            return pb.WhoAmIResponse(identity=self._me(p), rooms=sorted(p.room_names),
                                     admin=p.admin, token_id=p.token_id,
                                     token_expires_unix=p.token_expires,
                                     grant_applied=p.grant_applied)
        raise AssertionError("unreachable")  # pragma: no cover

    async def Kick(self, request: Any, context: grpc.aio.ServicerContext) -> pb.KickResponse:
        async with self._call(context, request, "Kick") as lease:
            p = lease.principal
            auth.check_admin(p)
            if rooms.is_conversation(request.room):
                raise InvalidInput("a kick closes streams in a token room; a private room's "
                                   "members are removed with `tsnetchat room-members SERVER "
                                   "+room --remove LOGIN`, a direct conversation's cannot be")
            auth.check_room(p, request.room)
            if not 0 < len(request.login) <= auth.MAX_LOGIN:
                raise InvalidInput("login must be a tailnet login or tag")
            n = self.kick_here(request.room, request.login, p.login)
            # (before the cluster's answer: the streams here are closed even when it fails)
            log.info("kick room=%r login=%r by=%r streams=%d", request.room, request.login,
                     p.login, n)
            if self.kick_elsewhere is not None:  # (UNAVAILABLE when not sure it got there)
                await self.kick_elsewhere(request.room, request.login, p.login,
                                          _answer_within(context))
            return pb.KickResponse(streams_closed=n)
        raise AssertionError("unreachable")  # pragma: no cover

    async def RevokeToken(self, request: Any,
                          context: grpc.aio.ServicerContext) -> pb.RevokeTokenResponse:
        async with self._call(context, request, "RevokeToken") as lease:
            p = lease.principal
            auth.check_admin(p)
            if not request.token_id or len(request.token_id) > 64:
                raise InvalidInput("token_id must be a token id from `tsnetchat token list`")
            # (counted first: in cluster mode the cluster's word of the revocation comes back
            # here too, and closed them before apply_revocations could count them: the
            # answer and the log said 0 streams; an attacker's run, 2026-11-25)
            if not await self.store.knows_token(request.token_id):
                # (said as `tsnetchat token revoke` says it; it was recorded, and answered
                # as done: an independent review, 2026-11-25)
                raise InvalidInput(f"no token with id {request.token_id!r} was issued here "
                                   "(`tsnetchat token list` shows the ids, in full); nothing "
                                   "was revoked")
            open_here = self.gate.streams_of(request.token_id)
            await self.store.revoke(request.token_id, within=_answer_within(context))
            n = self.apply_revocations([request.token_id])
            n = max(n, sum(lease.error is not None for lease in open_here))
            log.info("revoke token=%r by=%r streams=%d", request.token_id, p.login, n)
            return pb.RevokeTokenResponse(streams_closed=n)
        raise AssertionError("unreachable")  # pragma: no cover

    # server-side controls ----------------------------------------------------------

    def kick_here(self, room: str, login: str, by: str) -> int:
        """Close ``login``'s streams in ``room`` on this server; returns how many."""
        return self.hub.close_where(
            lambda s: s.room == room and s.login == login,
            # (not a removal's words: the chat said "/join asks for it again" for both, and
            # after a /remove it was refused; a daily user's day, 2026-11-25)
            CloseReason(CloseKind.KICKED, f"you were kicked out of {room!r} by {by}; you "
                        "may join it again"))

    def removed_here(self, room: str, logins: Collection[str], by: str) -> int:
        """Close the streams in private room ``room`` of members removed from it (also
        through another server of a cluster); returns how many."""
        return self.hub.close_where(
            lambda s: s.room == room and s.login in logins,
            CloseReason(CloseKind.KICKED, f"you were removed from {room!r} by {by}"))

    def apply_revocations(self, token_ids: list[str]) -> int:
        """Refuse these tokens from now on and close the streams that use them (also a Join
        still waiting for its hello). Returns the number of streams closed."""
        return self.gate.revoke(token_ids)

    async def begin_shutdown(self, reason: str = "server is restarting",
                             drain_timeout: float = 10.0) -> int:
        """Tell every stream the server is going away and close them (UNAVAILABLE).

        Sends read from now on are refused as not stored; the messages already taken are
        stored, published and acknowledged first (within ``drain_timeout``), so an open
        group commit ends in acks that reach their senders before the streams close."""
        self._going_away.set()
        self.ledger.stop_accepting()
        try:
            await asyncio.wait_for(self.ledger.drain(), drain_timeout)
        except TimeoutError:
            log.warning("shutting down with %d message(s) still waiting for storage",
                        self.store.pending())
        frame = codec.event_item(going_away=pb.GoingAway(reason=reason))
        for room in self.hub.rooms():
            self.hub.publish(room, frame)
            self.hub.flush(room)
        return self.hub.close_where(lambda s: True, CloseReason(
            CloseKind.SHUTDOWN, reason + RESUME_HINT))
