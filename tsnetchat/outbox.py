"""What a person has submitted and the server has not yet taken: the outbox, and the pacing
that keeps sending under the server's rate limit. Pure logic (no gRPC, no clock of its
own: times are passed in); ``client.RoomSession`` drives it.

Guarantees:

* A submitted message is in the outbox, QUEUED or SENDING (shown as pending), until the
  server acknowledges it (``acked``: it leaves) or refuses it for good (``refused``: FAILED,
  its text kept, shown as failed, until ``retry`` or ``discard``). Nothing is dropped.
* Order: one message is in flight per room at a time (``head`` returns nothing while one is
  SENDING), so a refusal that means "wait and send again" can never let a later message
  overtake an earlier one.
* A message keeps its ``client_msg_id`` across resends. It is the server's idempotency
  key: a resend after a reconnect is acknowledged with the original id, never stored twice.
"""

from __future__ import annotations

import enum
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

# The server's defaults (README "Configuration": rate_burst, rate_per_second), used until a
# Welcome advertises the real limit.
DEFAULT_BURST = 20
DEFAULT_RATE = 5.0


class State(enum.Enum):
    QUEUED = "queued"  # waiting for its turn (or for the pacer)
    SENDING = "sending"  # written to the stream; no answer yet
    FAILED = "failed"  # refused for good; the text is kept for editing or /retry


@dataclass(eq=False)
class Outgoing:
    text: str
    kind: int
    client_msg_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: State = State.QUEUED
    error: str = ""  # why it failed, for people
    not_before: float = 0.0  # a "wait and send again" refusal holds it until then
    attempts: int = 0  # how many times it was written to a stream (under this key)
    # Written, and not answered since with a refusal that says it was not stored: it may
    # have been (the link broke under it, or a cluster's "it may still appear").
    unsure: bool = False
    # A refusal said "it may still appear" of a write under this key: a later "not stored"
    # is of that write alone, and the first may still be stored (under the same key, so
    # never twice). (The later refusal cleared ``unsure``, and the chat said "not stored"
    # of a message that may exist; a reliability run, 2026-11-25.)
    may_appear: bool = False

    @property
    def pending(self) -> bool:
        return self.state is not State.FAILED


class Outbox:
    """One room's (or DM's) messages on their way out, in the order they were submitted."""

    def __init__(self) -> None:
        self._items: list[Outgoing] = []
        self._newest: Outgoing | None = None

    def __iter__(self) -> Iterator[Outgoing]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending(self) -> list[Outgoing]:
        return [o for o in self._items if o.pending]

    @property
    def failed(self) -> list[Outgoing]:
        return [o for o in self._items if o.state is State.FAILED]

    def find(self, client_msg_id: str) -> Outgoing | None:
        return next((o for o in self._items if o.client_msg_id == client_msg_id), None)

    def add(self, text: str, kind: int) -> Outgoing:
        out = Outgoing(text, kind)
        self._items.append(out)
        self._newest = out
        return out

    @property
    def newest(self) -> Outgoing | None:
        """The message added last, while it is still here (not stored yet, or refused)."""
        return self._newest if self._newest in self._items else None

    def head(self) -> Outgoing | None:
        """The next message to write, or None while one is in flight or none is queued."""
        for o in self._items:
            if o.state is State.SENDING:
                return None
            if o.state is State.QUEUED:
                return o
        return None

    def sending(self, out: Outgoing) -> None:
        out.state = State.SENDING
        out.attempts += 1
        out.unsure = True

    def acked(self, client_msg_id: str) -> Outgoing | None:
        """The server stored it (or had stored it before a resend): it leaves the outbox."""
        out = self.find(client_msg_id)
        if out is not None:
            self._items.remove(out)
        return out

    def refused(self, client_msg_id: str, *, for_good: bool, reason: str = "",
                not_before: float = 0.0, unsure: bool = False) -> Outgoing | None:
        """The server said no: for good (FAILED, text kept), or "not yet" (QUEUED again at its
        place, not before ``not_before``); ``unsure``: a "not yet" that says it may have
        been stored all the same."""
        out = self.find(client_msg_id)
        if out is None:
            return None
        out.may_appear = out.may_appear or unsure
        out.unsure = out.may_appear and not for_good
        if for_good:
            out.state, out.error = State.FAILED, reason
        else:
            out.state, out.not_before = State.QUEUED, not_before
        return out

    def disconnected(self) -> None:
        """The stream ended: whatever was in flight is sent again, first, with its key."""
        for o in self._items:
            if o.state is State.SENDING:
                o.state = State.QUEUED

    def retry(self) -> list[Outgoing]:
        """Every failed message again, after those still pending, in their order."""
        again = self.failed
        for o in again:
            self._items.remove(o)
            o.state, o.error, o.not_before, o.attempts = State.QUEUED, "", 0.0, 0
            o.unsure = o.may_appear = False
            o.client_msg_id = uuid.uuid4().hex  # (a new message: nothing sent under it yet)
            self._items.append(o)
        return again

    def discard(self, out: Outgoing) -> None:
        """A person gave up on a failed message (e.g. took its text back to edit it)."""
        if out in self._items and out.state is State.FAILED:
            self._items.remove(out)


class Pacer:
    """A mirror of the server's per-person token bucket, shared by every room of one client.

    It runs a little below the server's bucket (one token less, 90% of the rate), because the
    server counts from when a message arrives and a message can arrive sooner after the one
    before than it was sent (network jitter). A refusal that carries "retry in X" holds every
    send until then. (2026-11-22, over the lab against the default limit of bursts of 20 and
    5/s: 50 lines typed at once were all stored, in order, and none was refused.)
    """

    RATE_MARGIN = 0.9

    def __init__(self, burst: int = DEFAULT_BURST, rate: float = DEFAULT_RATE) -> None:
        self._stamp: float | None = None
        self._hold_until = 0.0
        self.burst, self.rate = self._below(burst, rate)
        self._tokens = self.burst

    def _below(self, burst: int, rate: float) -> tuple[float, float]:
        return max(1.0, float(burst) - 1), max(0.01, rate * self.RATE_MARGIN)

    def configure(self, burst: int, rate: float) -> None:
        """The server's advertised limit (from a Welcome); what is already spent stays spent."""
        self.burst, self.rate = self._below(burst, rate)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self, now: float) -> float:
        """Seconds until a message may be sent (0: now)."""
        self._refill(now)
        if now < self._hold_until:
            return self._hold_until - now
        # (A hair under one counts as one: waiting for a rounding error could never end.)
        return 0.0 if self._tokens >= 1 - 1e-9 else (1 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1

    def refused(self, now: float, retry_after: float) -> None:
        """The server refused a message for its rate: we were ahead of its bucket."""
        self._refill(now)
        self._tokens = min(self._tokens, 0.0)
        self._hold_until = max(self._hold_until, now + max(retry_after, 1 / self.rate))


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# No server takes a longer message (its max_message_bytes is capped there: gRPC frames are
# at most 64 KiB); a server's own limit, 4096 bytes by default, comes with its Welcome.
MAX_ANY_SERVER = 60_000
# The most `send --split` takes: 64 messages at the default limit (a log excerpt, not a file).
MAX_SPLIT = 262_144


def with_newlines(text: str) -> str:
    """``text`` with Unicode's line and paragraph separators (U+2028, U+2029), which some
    copied text has, and Windows' and old Macs' line ends (CR LF, CR: `send -` of a CRLF
    file was refused for U+000D, a new user's day, 2026-11-24), which the server refuses
    (render.UNSAFE), as the newlines they mean."""
    return (text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
            .replace("\u2029", "\n"))


def most_sent(split: bool) -> int:
    """The most bytes `send` takes: one message for any server, or text for `--split`."""
    return MAX_SPLIT if split else MAX_ANY_SERVER


def sendable(text: str, *, split: bool = False) -> str | None:
    """Why ``text`` can never be sent (checked before dialling), or None: as one message on
    any server, or as parts (``split``, ``most_sent``). The server's own rules (its size
    limit, control characters) are its to say."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeError:  # lone surrogates: bytes that were not UTF-8 (surrogateescape)
        return "it is not UTF-8 text"
    most = most_sent(split)
    if size <= most:
        return None
    if not split:
        return (f"it is more than {most} bytes, the most any tsnetchat server takes (4096 by "
                "default): split it up (--split)")
    return f"it is more than {most} bytes, the most `send --split` sends"


def split_text(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` into messages of at most ``max_bytes`` UTF-8 bytes: between lines where
    possible, else between words, else between characters. Only whitespace at a cut and
    empty parts are left out."""
    if max_bytes < 4:
        raise ValueError("max_bytes must fit one character")
    parts: list[str] = []
    current = ""
    for line in text.split("\n"):
        candidate = f"{current}\n{line}" if current else line
        if utf8_len(candidate) <= max_bytes:
            current = candidate
            continue
        if current:
            parts.append(current)
        current = ""
        for piece in _split_long(line, max_bytes):
            if current:
                parts.append(current)
            current = piece
    if current:
        parts.append(current)
    return [p for p in parts if p.strip()]


def _split_long(line: str, max_bytes: int) -> list[str]:
    if utf8_len(line) <= max_bytes:
        return [line]
    out: list[str] = []
    rest = line
    while utf8_len(rest) > max_bytes:
        cut = _fit(rest, max_bytes)
        space = rest.rfind(" ", 0, cut)
        if space > 0:
            cut = space + 1  # keep the space at the end of the first piece
        out.append(rest[:cut].rstrip(" ") or rest[:cut])
        rest = rest[cut:]
    out.append(rest)
    return out


def _fit(text: str, max_bytes: int) -> int:
    """How many characters of ``text`` fit in ``max_bytes`` UTF-8 bytes, never cutting a
    character from what it modifies (an accent from its letter, a skin tone or a joined
    emoji from the one before, half a flag, a decomposed Korean syllable) unless that one
    character is all there is. (Not every rule of Unicode's grapheme clusters: a Thai
    SARA AM or a prepended mark may still be cut from its neighbour.)"""
    size = 0
    for i, ch in enumerate(text):
        size += utf8_len(ch)
        if size > max_bytes:
            return apart(text, i)
    return len(text)


def apart(text: str, i: int) -> int:
    """Where to cut ``text`` at ``i`` or before it without parting a character from what it
    modifies (as ``_fit``): ``i`` itself (at least 1) when all before it is one such
    character. (Also where a row of the chat's screen ends: ``chatview.wrap``.)"""
    cut = i
    while cut > 1 and _joins_previous(text, cut):
        cut -= 1
    return cut if cut > 1 or not _joins_previous(text, cut) else max(1, i)


ZWJ = "\u200d"
ZWNJ = "\u200c"
_REGIONAL = range(0x1F1E6, 0x1F200)  # two of these are one flag


def _joins_previous(text: str, i: int) -> bool:
    """Whether ``text[i]`` belongs to the character before it on screen."""
    ch, code = text[i], ord(text[i])
    if ch == ZWJ or text[i - 1] == ZWJ or unicodedata.category(ch) in ("Mn", "Mc", "Me"):
        return True
    if 0xFE00 <= code <= 0xFE0F or 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F:
        return True  # variation selectors, skin tones, the tags of a subdivision flag
    if ch == ZWNJ or 0x1160 <= code <= 0x11FF:
        return True  # a non-joiner; a decomposed Korean syllable's vowel and final
    if code in _REGIONAL:
        run = 0
        while i - run - 1 >= 0 and ord(text[i - run - 1]) in _REGIONAL:
            run += 1
        return run % 2 == 1
    return False
