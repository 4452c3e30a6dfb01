"""Where a reader of a room is, and the state of its connection. Pure logic (times and
randomness are passed in), shared by the terminal chat, ``send`` and ``tail`` through
``client.RoomSession``.

``Cursor``: the last message id shown. A (re)join resumes after it and messages at or below
it are never shown again, so after any number of reconnects every message is shown once, in
id order. That holds within one history: the cursor keeps the history's identity and
generation with its position (``check_history``), and when the server's differ (a restored
backup, a replaced database) or the server's newest id is below the position, the position
means nothing there any more: it is forgotten and the reader starts over from what the server
has, saying so, instead of hiding every message up to its old id.

``StreamState``, the state machine of one stream::

    CONNECTING --welcome--> CONNECTED --lost(retryable)--> RECONNECTING --(delay)--> CONNECTING
         |                      |                                              ^
         |                      +--lost(not retryable)--> FAILED               |
         +--lost: not retryable, or the first attempt of a fail-fast session --> FAILED
         |   (unless the way to the server failed and the grace is not over)
         +--lost(retryable) after having been connected once ------------------+

    CONNECTED --refused, the token may be replaced--> WAITING --(a new token, or
        the same one again after ``SAME_TOKEN_FIRST``, doubling up to ``SAME_TOKEN_MOST``)
        --> CONNECTING

    close() from any state --> CLOSED

RECONNECTING carries the reason and the time of the next attempt (a countdown for the status
bar); delays double from ``first`` up to ``max_backoff``, with jitter, and never undercut the
server's "retry in" hint. WAITING (``client.RoomSession``: the token came from the token
store, or the session is patient) tries the same token again now and then: a server that
ran for a while with another key refused it, and once the right one was back the chats
waited for a new token for ever (only a new `connect` helped; a new user's day,
2026-11-24).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from .clienterrors import ClientError

# How long a fail-fast stream or call that has not worked yet keeps trying when the way to
# the server fails (``ClientError.transport``; not a refusal): a tailnet blip. In the lab,
# about one new connection in a few minutes hung for 5 s or more (2026-11-22: CONNECTs
# through two laptops' HTTP proxies every 0.2 s for 400 s), and a full CI run met one as a
# chat started.
START_GRACE = 8.0
# Less of the grace left than this and a fail-fast stream gives up instead of trying once
# more (an attempt that could not even start before the grace ends).
LAST_ATTEMPT = 0.1

# Ask the server for "everything after this id" to get nothing but what comes next: it
# clamps the resume point to the room's newest id (service ``_replay``).
FROM_NOW = 2**62

# A stream waiting for a new token tries the refused one again after this, then after twice
# as long each time, at most SAME_TOKEN_MOST apart: a refusal that mends by itself (the
# server back with its own key) is over within that, and a token that stays refused (revoked)
# costs the server one refusal per stream every two minutes. (5 minutes kept a chat given
# --token waiting 39 s and more after the server was right again: a new user's day.)
SAME_TOKEN_FIRST = 10.0
SAME_TOKEN_MOST = 120.0


class HasId(Protocol):
    @property
    def id(self) -> int: ...


M = TypeVar("M", bound=HasId)


class Cursor:
    """The last message id a reader has shown (None: nothing yet, the server sends its recent
    backlog). ``from_now``: start after the room's newest message, without backlog."""

    def __init__(self, after: int | None = None, *, from_now: bool = False) -> None:
        self.last_id = after
        self.from_now = from_now and after is None
        self.history: tuple[str, int] | None = None  # (history_id, generation) of last_id
        # last_id has been a real position: a server had it, or messages were shown up to
        # it (not only a number given to start after, which may be past the end)
        self.confirmed = False

    def check_history(self, history_id: str, generation: int, server_last: int) -> str | None:
        """What the server says of its history (Welcome, ReplayDone): returns why the
        position does not hold there, having forgotten it (start over), or None. An older
        server sends no identity; the newest-id check still applies."""
        here = (history_id, generation) if history_id else None
        why = None
        if self.last_id is not None:
            if here is not None and self.history is not None and here != self.history:
                why = ("the server's history was restored from a backup" if here[0] ==
                       self.history[0] else "the server's history was replaced")
            elif self.last_id > server_last and not self.confirmed:
                why = (f"there is no message {self.last_id} to start after: the server's "
                       f"history ends at message {server_last}")
            elif self.last_id > server_last:
                why = (f"the server's history ends at message {server_last}, before the "
                       f"last one shown here ({self.last_id}): it was restored or replaced")
            else:
                self.confirmed = True
        if why is not None:
            self.last_id = None
            self.from_now = False
        if here is not None:
            self.history = here
        return why

    def resume_after(self) -> int | None:
        """What to put in a hello/subscribe request's ``after_id``."""
        if self.last_id is None and self.from_now:
            return FROM_NOW
        return self.last_id

    def accept(self, messages: Iterable[M]) -> list[M]:
        """The messages not shown yet, in order; they count as shown from now on."""
        new = []
        for m in messages:
            if self.last_id is not None and m.id <= self.last_id:
                continue
            self.last_id = m.id
            self.confirmed = True
            new.append(m)
        return new

    def replay_done(self, last_id: int) -> None:
        """The server replayed up to ``last_id``: a reader with no position yet (a "from
        now" reader, or one whose backlog was empty) resumes after it. (A reader that joined
        an empty room kept none, and after a reconnect asked for the recent backlog again:
        every message stored meanwhile but the last ``history_on_join`` was never shown; a
        kill -9 run, 2026-11-25.)"""
        if self.last_id is None:
            self.last_id = last_id
            self.confirmed = True


class Phase(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    WAITING = "waiting"  # for something only the person can bring (a new token)
    FAILED = "failed"
    CLOSED = "closed"


class StreamState:
    """The state machine above. ``fail_fast``: a failure before the first success is final
    (a `/join` refused, a command the server refuses), whatever its kind, except one on the
    way to the server (``transport``): that is tried again while the next attempt starts
    within ``grace`` seconds of the first failure."""

    def __init__(self, *, first: float = 0.5, max_backoff: float = 5.0,
                 fail_fast: bool = True, grace: float = 0.0) -> None:
        self.first, self.max_backoff, self.fail_fast = first, max_backoff, fail_fast
        self.grace = grace
        self.phase = Phase.CONNECTING
        self.error: ClientError | None = None
        self.retry_at = 0.0
        self.attempts = 0  # failed attempts since the last success
        self.ever_connected = False
        self.lost_at: float | None = None  # when the current outage (or first failure) began
        self.waits = 0  # times WAITING since the last success
        self._waited_on: set[str] = set()  # the refusals said since then

    def connecting(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CONNECTING

    def connected(self, now: float) -> float | None:
        """Returns how long the outage lasted when this ends one (not for the first success:
        nothing was lost before it)."""
        outage = None if self.lost_at is None or not self.ever_connected else now - self.lost_at
        self.phase, self.error, self.attempts, self.lost_at = Phase.CONNECTED, None, 0, None
        self.ever_connected, self.waits, self._waited_on = True, 0, set()
        return outage

    def lost(self, error: ClientError, now: float, jitter: float) -> float | None:
        """The stream failed. Returns the delay before the next attempt, or None when it is
        over (FAILED). ``jitter`` is in [0, 1)."""
        if self.phase is Phase.CLOSED:
            return None
        self.error = error
        # Once connected, the way to the server failing is never final, whatever it says
        # meanwhile: this machine's tailscaled stopped for 6 s had the chat say "cannot find
        # 'chat-server' on the tailnet" and close for good (a new user's day, 2026-11-23).
        if not error.retryable and not (error.transport and self.ever_connected):
            self.phase = Phase.FAILED
            return None
        if self.lost_at is None:
            self.lost_at = now
        backoff = min(self.max_backoff, self.first * 2.0 ** self.attempts)
        delay = max(error.retry_after, backoff * (0.5 + jitter))
        if self.fail_fast and not self.ever_connected:
            # Tried again until the grace is over, the last attempt when it ends (not given
            # up early because the next backoff would overrun it: README's "up to 8 s").
            left = self.lost_at + self.grace - now
            if not error.transport or left < LAST_ATTEMPT:
                self.phase = Phase.FAILED
                return None
            delay = min(delay, left)
        self.attempts += 1
        self.phase, self.retry_at = Phase.RECONNECTING, now + delay
        return delay

    def waiting(self, error: ClientError, now: float) -> bool:
        """Refused, but waiting for something that may mend it (a new token): the status
        says ``error``, and the connection that follows reports the outage from ``now``.
        (Left FAILED, the chat showed the room ✗ and "failed" while it said it would carry
        on: an independent review.) ``retry_at`` is when to try the same token again.
        Returns whether ``error`` is news: not a refusal this outage already waited on (said
        once, not at every try, nor at every other one where two servers of a cluster
        refuse in their own words)."""
        news = str(error) not in self._waited_on
        self.phase, self.error = Phase.WAITING, error
        self._waited_on.add(str(error))
        if self.lost_at is None:
            self.lost_at = now
        self.retry_at = now + min(SAME_TOKEN_MOST, SAME_TOKEN_FIRST * 2.0 ** self.waits)
        self.waits += 1
        return news

    def close(self) -> None:
        self.phase = Phase.CLOSED

    def countdown(self, now: float) -> float:
        waits = self.phase in (Phase.RECONNECTING, Phase.WAITING)
        return max(0.0, self.retry_at - now) if waits else 0.0

    def describe(self, now: float) -> str:
        """One line for a status bar: the error's first line (discovery's failure goes on
        with the ways it tried, and the bar showed "tried, in order:" cut off after it; a
        kill -9 run, 2026-11-24)."""
        error = str(self.error).split("\n", 1)[0]
        if self.phase is Phase.RECONNECTING:
            reason = f": {error}" if self.error else ""
            return f"reconnecting in {self.countdown(now):.0f}s{reason}"
        if self.phase is Phase.CONNECTING and self.error is not None:
            return f"reconnecting now: {error}"
        if self.phase is Phase.FAILED and self.error is not None:
            return f"failed: {error}"
        if self.phase is Phase.WAITING and self.error is not None:
            return f"waiting (this token tried again in {self.countdown(now):.0f}s): {error}"
        return str(self.phase.value)


def worst(states: Sequence[StreamState]) -> StreamState | None:
    """The stream a status bar should speak of: a failed or reconnecting one before the rest."""
    order = [Phase.WAITING, Phase.RECONNECTING, Phase.CONNECTING, Phase.FAILED, Phase.CONNECTED,
             Phase.CLOSED]
    return min(states, key=lambda s: order.index(s.phase), default=None)
