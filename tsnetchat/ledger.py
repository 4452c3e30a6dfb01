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
* in cluster mode, a refusal as ``Unconfirmed``: the cluster did not confirm it in time, so
  it may still appear; sent again with the same ``client_msg_id`` it is stored once;
* ``InvalidInput`` raised at once for malformed input (the caller counts those as strikes
  against a flooding client; refusals above never count).

Knows nothing of gRPC: refusals go out through the ``refuse`` callback the servicer gives,
which turns the error into an event. Tests drive it directly (tests/test_unit_ledger.py).

Future kinds of room events (edits, deletes, topics) are drafts too: validated here, stored
through the same ``History.submit``, published from the same settle step. Direct messages
are rooms whose name and access the servicer derives; the ledger path is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

from . import codec, render
from .errors import InvalidInput, LimitExceeded, StoreError, TsnetchatError, Unconfirmed
from .hub import Hub, Subscriber
from .metrics import Metrics
from .pb import chat_pb2 as pb
from .store import Draft, Outcome, Sender, Settle, StoredMessage
from .throttle import Buckets

MAX_CLIENT_MSG_ID = 64
# More messages waiting for storage than this and new ones are refused at once: a bound on
# memory while the disk is stalled (each waits at most History's wait before it is refused).
MAX_PENDING = 50_000

def validate_text(text: str, kind: int, max_bytes: int) -> None:
    """Raise InvalidInput unless ``text`` may be a message (the rules: tsnetchat.render)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(f"message is {size} bytes; the limit is {max_bytes} bytes of UTF-8 "
                           "text. Split it up.")
    if render.is_blank(text):  # also zero-width characters only: an invisible message
        raise InvalidInput("message is empty")
    if kind not in (pb.MESSAGE_KIND_TEXT, pb.MESSAGE_KIND_ACTION):
        raise InvalidInput(f"unknown message kind {kind}")
    bad = render.UNSAFE.search(text)
    if bad is not None:
        # Terminal escapes and bidi overrides would let one user rewrite others' screens.
        raise InvalidInput(f"message contains a control character (U+{ord(bad.group()):04X}); "
                           "only printable text, newlines and tabs are allowed")


class History(Protocol):
    """Where messages become durable. ``submit`` never blocks; ``then`` runs on the event
    loop after the outcome is final, in submission order. Reads may wait on the disk, so they
    are coroutines; ``last_id`` and ``rooms`` answer from memory (what has been settled)."""

    def submit(self, draft: Draft, then: Settle) -> None: ...

    def pending(self) -> int: ...

    def last_id(self, room: str) -> int: ...

    def rooms(self) -> dict[str, int]: ...

    async def after(self, room: str, after_id: int, limit: int) -> list[StoredMessage]: ...

    async def before(self, room: str, before_id: int, limit: int) -> list[StoredMessage]: ...

    async def latest(self, room: str, n: int) -> list[StoredMessage]: ...

    async def drain(self) -> None: ...


class SendLimits(Protocol):
    @property
    def max_message_bytes(self) -> int: ...

    @property
    def rate_burst(self) -> int: ...

    @property
    def rate_per_second(self) -> float: ...


# How a refusal reaches the member: (its stream, why, client_msg_id, retry after seconds).
Refuse = Callable[[Subscriber, TsnetchatError, str, float], None]


class Ledger:
    def __init__(self, history: History, hub: Hub, *, limits: Callable[[], SendLimits],
                 refuse: Refuse, metrics: Metrics | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.history, self.hub = history, hub
        self.limits = limits  # read on every send; ``apply`` reaches the buckets
        self.refuse = refuse
        self.metrics = metrics or Metrics()
        self.max_pending = max_pending
        self.accepting = True
        first = limits()
        self._buckets = Buckets(first.rate_burst, first.rate_per_second)  # per person

    def send(self, sub: Subscriber, sender: Sender, text: str, kind: int,
             client_msg_id: str) -> None:
        """Take a member's message for ``sub.room`` (see the module doc). Raises InvalidInput
        for malformed input; every other outcome reaches ``sub`` as an event."""
        limits = self.limits()
        kind = kind or pb.MESSAGE_KIND_TEXT
        if len(client_msg_id) > MAX_CLIENT_MSG_ID:
            raise InvalidInput(f"client_msg_id longer than {MAX_CLIENT_MSG_ID} characters")
        validate_text(text, kind, limits.max_message_bytes)
        if not self.accepting:
            self._refused(sub, client_msg_id, "shutdown", StoreError(
                "the server is shutting down; this message was not stored: send it again "
                "after reconnecting"))
            return
        wait = self._buckets.take(sender.login)
        if wait:
            self._refused(sub, client_msg_id, "rate", LimitExceeded(
                f"slow down: at most {limits.rate_per_second:g} messages/s (bursts of "
                f"{limits.rate_burst}); this one was not sent, retry in {wait:.1f}s"), wait)
            return
        pending = self.history.pending()
        if pending >= self.max_pending:
            self._refused(sub, client_msg_id, "busy", StoreError(
                f"the server has {pending} messages waiting to be stored; this one was not "
                "stored: send it again shortly"), 1.0)
            return
        sub.inflight += 1
        self.history.submit(Draft(sub.room, sender, kind, text, client_msg_id),
                            partial(self._settled, sub, client_msg_id))

    def charge(self, login: str) -> None:
        """Cluster mode: a message this person sent through another server counts against
        their rate limit here too, so the limit holds across servers (as far as their
        buckets are full: a message already stored elsewhere is never refused)."""
        self._buckets.take(login)

    def apply(self, limits: SendLimits) -> None:
        """New rate limits (a reload), also for the buckets of people already seen."""
        self._buckets.configure(limits.rate_burst, limits.rate_per_second)

    def _settled(self, sub: Subscriber, client_msg_id: str, outcome: Outcome) -> None:
        """Publish a stored message and acknowledge it; or tell the sender it was not."""
        sub.inflight -= 1
        if isinstance(outcome, Unconfirmed):  # cluster mode: it may still appear
            self._refused(sub, client_msg_id, "unconfirmed", outcome, 1.0)
            return
        if isinstance(outcome, StoreError):
            self._refused(sub, client_msg_id, "storage", StoreError(
                f"{outcome}; this message was not stored: send it again"), 1.0)
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
