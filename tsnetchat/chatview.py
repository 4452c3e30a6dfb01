"""What the chat screen shows, without a terminal: one buffer per conversation (a room, a
private room, a direct conversation, search results) with its scrollback, unread and
mention counts, and the rule that turns a message into screen lines. ``tui`` draws these;
``clientcmds`` prints messages with the same rule.

The line rule, for every place a message is shown::

    ── Saturday 22 November 2026 ──────────     a separator where the day changes
    09:14   <Alice> a message that is too long to fit
                  ┊ wraps under its own text column   (hanging indent)
                  ┊ [09:00] <Bob> a second line        (a line break in the message)
    09:15 ▸ <Bob> my own message                       (gutter: ▸ own, ! mention,
    09:15 … <Bob> still on its way                       … pending, ✗ failed)
    09:16   <Bob> the corrected text (edited)              an EDIT applied in place
    09:16   <Bob> (deleted by Bob)                         a DELETE: a tombstone

Edits and deletions arrive as events in the room (``MESSAGE_KIND_EDIT``/``_DELETE`` with
``target_id``), after the message they change; ``Conversation.add_message`` applies them to
the line already shown instead of showing them as lines of their own, so a client that
resumes after missing them converges on what everyone else sees.

Continuation lines start with a dim ``┊`` under the text column, so a line inside a message
can never pass for a message of its own. Control characters and bidi overrides are shown as
``�``, so nobody can rewrite another person's screen through a name or a message.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prompt_toolkit.utils import get_cwidth

from . import render
from .outbox import Outgoing, State, apart
from .pb import chat_pb2 as pb

Fragment = tuple[str, str]
Line = list[Fragment]

MAX_ENTRIES = 5000  # per conversation; older ones can be fetched again from History
CONTINUATION = render.CONTINUATION
visible = render.visible  # message text fit to print (the one rule: tsnetchat.render)


def clock(ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ms / 1000))


def day_of(ms: int) -> dt.date:
    return dt.date.fromtimestamp(ms / 1000)


def day_label(day: dt.date) -> str:
    return day.strftime("%A %d %B %Y")


who = render.who  # a person as the screen names them (the one rule: tsnetchat.render)


def width_of(text: str) -> int:
    return sum(get_cwidth(c) for c in text)


# --- nick colours -------------------------------------------------------------------------

# Distinct on a dark or a light background; no red or yellow, which mean error and mention.
NICK_COLOURS = ["#5fafff", "#87d75f", "#d787d7", "#5fd7d7", "#ffaf5f", "#af87ff", "#5fd787",
                "#ff87af", "#87afd7", "#d7af87", "#00afaf", "#af5fd7", "#87d7af", "#d75f87",
                "#5f87ff", "#afd75f"]


class Palette:
    """A colour per person: chosen from their login (the same in every session), and moved
    to a free colour when someone already seen in this session has that one."""

    def __init__(self, colours: Sequence[str] = NICK_COLOURS) -> None:
        self.colours = list(colours)
        self.assigned: dict[str, str] = {}

    def colour(self, login: str) -> str:
        got = self.assigned.get(login)
        if got is not None:
            return got
        start = zlib.crc32(login.encode()) % len(self.colours)
        taken = set(self.assigned.values())
        for i in range(len(self.colours)):
            c = self.colours[(start + i) % len(self.colours)]
            if c not in taken:
                break
        else:
            c = self.colours[start]
        self.assigned[login] = c
        return c


def is_mention(m: pb.ChatMessage, me: str, pattern: re.Pattern[str] | None) -> bool:
    """Whether ``m`` mentions the person logged in as ``me``. The server says so in
    ``mentions`` (the one rule, rooms.Mentions: logins, short logins and display names it
    knows), live and read back alike; a server older than that field leaves it empty, and
    then our own names (``pattern``) decide, for the highlight only."""
    if m.sender.login == me or m.deleted_by:
        return False
    if m.mentions:
        return me in m.mentions
    return bool(pattern and pattern.search(m.text))


CHANGES = (pb.MESSAGE_KIND_EDIT, pb.MESSAGE_KIND_DELETE)


def mention_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """Matches any of ``names`` as a word of its own, in any case."""
    alts = sorted({n for n in names if n}, key=len, reverse=True)
    if not alts:
        return None
    return re.compile(r"(?<![\w@.-])(?:" + "|".join(map(re.escape, alts)) + r")(?![\w-])",
                      re.IGNORECASE)


# --- entries and conversations ------------------------------------------------------------


class Kind(enum.Enum):
    MESSAGE = "message"
    NOTICE = "notice"  # joins, leaves, "end of backlog", command output
    ERROR = "error"


@dataclass(eq=False)
class Entry:
    kind: Kind
    ts_ms: int
    text: str = ""
    message: pb.ChatMessage | None = None
    own: bool = False
    mention: bool = False
    where: str = ""  # search results: the conversation a message is in
    _cache: tuple[int, list[Line]] | None = field(default=None, repr=False)

    @property
    def id(self) -> int:
        return self.message.id if self.message is not None else 0


def kind_of(name: str) -> str:
    """"room", "private" (``+name``) or "dm" (``dm:...``), from a room's name."""
    return "dm" if name.startswith("dm:") else "private" if name.startswith("+") else "room"


def dm_title(name: str, me: str) -> str:
    """A direct conversation as the room list shows it: ``@bob`` (the others' short
    logins), from its canonical name ``dm:alice@x,bob@x``; a login at another domain than
    ``me``'s in full, as ``person_login`` reads it back (``@bob@y``: two bobs of two
    domains were both ``@bob``)."""
    others = [x for x in name[3:].split(",") if x and x != me] or [me]
    domain = "@" + me.partition("@")[2]
    return ",".join("@" + render.name(x.removesuffix(domain) if "@" in me else x)
                    for x in others)


def person_login(word: str, me: str, known: Iterable[pb.Identity]) -> str:
    """The login a person typed in a command means: a login as someone seen in this session
    (members, senders, the caller) spells it, capitals forgiven (`/msg Bob@Example.com`
    opened a second buffer beside @bob's for the one conversation: a new user's day,
    2026-11-24), or as typed; else the display name or short login of someone seen,
    case-insensitively; else ``word`` at the caller's own domain (``bob`` ->
    ``bob@example.com`` for ``alice@example.com``), which the server checks like any login."""
    if word.startswith("tag:"):
        return word
    if "@" in word:
        like = {str(i.login) for i in known if i.login.lower() == word.lower()}
        like |= {me} if me.lower() == word.lower() else set()
        return word if word in like or len(like) != 1 else like.pop()
    low = word.lower()
    for ident in known:
        if low in (ident.display_name.lower(), ident.login.split("@")[0].lower()):
            return str(ident.login)
    domain = me.partition("@")[2]
    return f"{word}@{domain}" if domain else word


def dm_name(me: str, *others: str) -> str:
    """The canonical name of a direct conversation (the server's rule, rooms.dm_room): the
    logins, the caller's included, unique and sorted, after ``dm:``."""
    return "dm:" + ",".join(sorted({me, *others}))


def dm_with(me: str, typed: Iterable[str]) -> str:
    """The canonical DM of ``me`` and the people ``typed`` (names or logins, spelled by
    ``person_login`` without anyone seen: a short name is at ``me``'s domain)."""
    return dm_name(me, *(person_login(x.strip(), me, ()) for x in typed if x.strip()))


class Conversation:
    """One buffer: a room, a private room, a DM, or search results (``kind`` "room",
    "private", "dm", "search", "system"): what was said, what is unread, where the view is.

    ``listed``: a room the server counts unread messages in (another device, or a DM that
    started elsewhere) that this client has not joined yet; switching to it joins it."""

    def __init__(self, name: str, *, kind: str = "room", title: str = "",
                 listed: bool = False) -> None:
        self.name = name
        self.kind = kind
        self._title = title
        self.listed = listed
        self.topic: pb.Topic | None = None
        self.away: set[str] = set()  # logins of members who are away
        self.last_read = 0  # the server's read position for us when we joined
        self.looked = 0.0  # time.monotonic() when unread counts last changed here
        self.entries: list[Entry] = []
        self.unread = 0  # messages that arrived while another conversation was shown
        self.mentions = 0
        self.activity = False  # something (not a message) happened while away
        self.marker_id: int | None = None  # "new since you looked" goes above this message
        self.members: list[pb.Identity] = []
        self.scroll = 0  # lines above the bottom; 0 follows new lines
        self.below = 0  # messages that arrived below the view while it was scrolled up
        self.width = 80  # as last drawn; keeps a scrolled view still when lines arrive
        self.backlog_done = False
        self.oldest_loaded: int | None = None  # for loading older history
        self.history_complete = False  # nothing older than oldest_loaded on the server
        self.away_from: set[str] = set()  # members when our connection dropped (quiet rejoins)
        self.quiet_until = 0.0

    @property
    def title(self) -> str:
        if self._title:
            return self._title
        return f"#{self.name}" if self.kind == "room" else self.name

    def _append(self, e: Entry, renderer: Renderer | None) -> None:
        self.entries.append(e)
        if len(self.entries) > MAX_ENTRIES:
            del self.entries[: len(self.entries) - MAX_ENTRIES]
        if self.scroll and renderer is not None:
            self.scroll += len(renderer.render(e, self.width))
            if e.kind is Kind.MESSAGE:
                self.below += 1

    def add_message(self, m: pb.ChatMessage, *, own: bool, mention: bool, shown: bool,
                    live: bool, renderer: Renderer | None = None) -> Entry | None:
        """A message from the stream (in id order). ``shown``: this conversation is on
        screen; ``live``: it arrived now (not from the backlog). An edit or a deletion is
        applied to the message it changes (None: no line of its own); a topic change is a
        notice and sets ``topic``. For an edit, ``mention`` is whether its new text mentions
        the reader, which the message edited takes (an edit changes whom its message
        mentions, and the server says so in no event: our own names decide, as for the
        backlog; the line kept its highlight until History was read again)."""
        if self.oldest_loaded is None:
            self.oldest_loaded = m.id
        if m.kind in CHANGES:
            e = self.apply_change(m)
            if e is not None and m.kind == pb.MESSAGE_KIND_EDIT and not e.own and (
                    e.message is not None and not e.message.deleted_by):
                e.mention = mention
            return None
        if m.kind == pb.MESSAGE_KIND_TOPIC:
            return self.topic_changed(m, renderer)
        e = Entry(Kind.MESSAGE, m.sent_unix_ms, message=m, own=own, mention=mention and not own)
        self._append(e, renderer)
        if m.deleted_by:
            return e
        if live and not shown and not own:
            self.unread += 1
            self.mentions += e.mention
            if self.marker_id is None:
                self.marker_id = m.id
        elif not live and not own and self.last_read and m.id > self.last_read and (
                self.marker_id is None):
            self.marker_id = m.id  # the first one after our read position, on any device
        return e

    def apply_change(self, change: pb.ChatMessage) -> Entry | None:
        """An EDIT or DELETE event: the shown message it targets takes the new text, or
        becomes a tombstone. Returns that entry (None when it is not loaded here: History
        has it changed already)."""
        for e in reversed(self.entries):
            if e.message is None or e.id != change.target_id:
                continue
            m = pb.ChatMessage()
            m.CopyFrom(e.message)
            if change.kind == pb.MESSAGE_KIND_DELETE:
                m.text, m.deleted_by = "", change.deleted_by or change.sender.login
                e.mention = False
            elif not m.deleted_by:
                m.text, m.edited_unix_ms = change.text, change.sent_unix_ms
                del m.mentions[:]  # (its old text's)
            e.message, e._cache = m, None
            return e
        return None

    def topic_changed(self, m: pb.ChatMessage, renderer: Renderer | None = None) -> Entry:
        self.topic = pb.Topic(text=m.text, set_by=m.sender, set_unix_ms=m.sent_unix_ms,
                              id=m.id)
        return self.notice(topic_said(m), ts_ms=m.sent_unix_ms, renderer=renderer)

    def add_result(self, m: pb.ChatMessage, *, where: str, own: bool, mention: bool) -> Entry:
        """A search result (a buffer of results: nothing in it counts as unread)."""
        e = Entry(Kind.MESSAGE, m.sent_unix_ms, message=m, own=own, mention=mention,
                  where=where)
        self._append(e, None)
        return e

    def set_counts(self, unread: int, mentions: int) -> None:
        """The server's unread and mention counts (the same on every device)."""
        self.unread, self.mentions = unread, mentions

    def add_older(self, messages: Sequence[pb.ChatMessage], *, me: str,
                  mentions: re.Pattern[str] | None, more: bool = True) -> int:
        """Messages from History, older than everything here; returns how many were new.
        ``more``: the server has older ones still."""
        first = self.oldest_loaded
        older = [m for m in messages if first is None or m.id < first]
        self.history_complete = not more or not older or older[0].id <= 1
        # (a topic change is the line it was when it happened, as the stream shows it; they
        # were left out: a new user's day, 2026-11-23. The topic shown above stays the
        # newest.)
        entries = [Entry(Kind.NOTICE, m.sent_unix_ms, text=topic_said(m))
                   if m.kind == pb.MESSAGE_KIND_TOPIC else
                   Entry(Kind.MESSAGE, m.sent_unix_ms, message=m, own=m.sender.login == me,
                         mention=is_mention(m, me, mentions))
                   for m in older if m.kind not in CHANGES]
        self.entries[:0] = entries
        if older:
            self.oldest_loaded = older[0].id
        return len(older)

    def notice(self, text: str, *, error: bool = False, ts_ms: int | None = None,
               renderer: Renderer | None = None) -> Entry:
        e = Entry(Kind.ERROR if error else Kind.NOTICE,
                  ts_ms if ts_ms is not None else int(time.time() * 1000), text=text)
        self._append(e, renderer)
        return e

    def looked_at(self) -> None:
        """It is on screen: nothing in it is unread any more (the marker line stays)."""
        self.unread = self.mentions = 0
        self.activity = False
        self.looked = time.monotonic()

    def left(self) -> None:
        """Another conversation is shown: the next unread message gets the marker."""
        self.marker_id = None
        self.looked = time.monotonic()

    def last_own(self) -> Entry | None:
        """The person's own newest message, deleted or not (for /edit and /delete, which
        never reach past it to an older one)."""
        for e in reversed(self.entries):
            if e.own and e.message is not None:
                return e
        return None


# --- rendering ------------------------------------------------------------------------------


class Renderer:
    """Turns entries into screen lines of a given width (cached per entry and width)."""

    def __init__(self, palette: Palette | None = None) -> None:
        self.palette = palette or Palette()

    def render(self, e: Entry, width: int) -> list[Line]:
        if e._cache is not None and e._cache[0] == width:
            return e._cache[1]
        lines = self._render(e, width)
        e._cache = (width, lines)
        return lines

    def _render(self, e: Entry, width: int) -> list[Line]:
        t = clock(e.ts_ms)
        if e.kind is not Kind.MESSAGE or e.message is None:
            style = "class:error" if e.kind is Kind.ERROR else "class:notice"
            mark = "!!" if e.kind is Kind.ERROR else "--"
            return layout([("class:time", t + " "), (style, f"{mark} ")], visible(e.text),
                          width, style, mark=False)
        m = e.message
        gutter = ("class:gutter.own", "▸ ") if e.own else (
            ("class:gutter.mention", "! ") if e.mention else ("", "  "))
        head: Line = [("class:time", t + " "), gutter]
        if e.where:
            head.append(("class:notice", f"{e.where} "))
        head += self.nick(m)
        if m.deleted_by:
            return layout(head, tombstone(m), width, "class:deleted", mark=False)
        text_style = "class:text.mention" if e.mention else ""
        return edited_mark(layout(head, visible(m.text), width, text_style), m, width)

    def nick(self, m: pb.ChatMessage) -> Line:
        colour = self.palette.colour(m.sender.login)
        if m.kind == pb.MESSAGE_KIND_ACTION:
            return [(f"fg:{colour} italic", f"* {who(m.sender)} ")]
        return [(f"fg:{colour} bold", f"<{who(m.sender)}>"), ("", " ")]

    def outgoing(self, out: Outgoing, me: pb.Identity, width: int) -> list[Line]:
        """A message not yet stored: pending (dim) or failed (with why and what to do)."""
        failed = out.state is State.FAILED
        mark = ("class:gutter.failed", "✗ ") if failed else ("class:pending", "… ")
        now = clock(int(time.time() * 1000))
        name = f"* {who(me)} " if out.kind == pb.MESSAGE_KIND_ACTION else f"<{who(me)}> "
        lines = layout([("class:time", now + " "), mark, ("class:pending", name)],
                       visible(out.text), width, "class:pending")
        if failed:
            lines += layout([("", " " * 6), ("class:error", "  ")],
                            f"not sent: {out.error} (/retry sends it again; Up brings it back "
                            "to edit)", width, "class:error")
        return lines

    def separator(self, label: str, width: int, style: str = "class:separator") -> Line:
        text = f"── {label} "
        return [(style, text + "─" * max(0, width - width_of(text)))]


def layout(head: Line, text: str, width: int, style: str = "", *,
           mark: bool = True) -> list[Line]:
    """``head`` then ``text`` word-wrapped to ``width``; every following line (wrapped or a
    line break of the text) hangs under the text's first column, behind a dim ┊ unless
    ``mark`` is off (for the client's own notices, which nobody else can write)."""
    head_w = sum(width_of(t) for _, t in head)
    col = head_w if head_w <= width // 2 else min(8, max(2, width // 4))  # narrow: hang less
    rows: list[Line] = []
    for n, raw in enumerate(text.split("\n")):
        # A notice's two-column line (/help's "  /join #room     join a room") goes on under
        # its second column (it went on at the first: a daily user's run, 2026-11-24).
        term = None if mark or n == 0 else _TERM.match(raw)
        hang = col + width_of(term.group()) if term is not None else col
        if hang > width // 2:
            hang = col
        pieces = wrap(raw, width - hang, first=width - head_w if n == 0 else width - col)
        for i, piece in enumerate(pieces):
            if not rows:
                rows.append([*head, (style, piece)])
            else:
                at = col if i == 0 else hang
                rows.append([("class:continuation",
                              " " * (at - 2) + (CONTINUATION if mark else "  ")),
                             (style, piece)])
    return rows


# What a notice's wrapped line hangs under: its indentation, and a first column ended by
# two spaces ("  /join #room     " of "  /join #room     join a room").
_TERM = re.compile(r" +(?:\S+(?: \S+)*? {2,})?(?=\S)")


def tombstone(m: pb.ChatMessage) -> str:
    """What a deleted message shows instead of its text (the server no longer has it)."""
    by = m.deleted_by
    return "(deleted)" if by == m.sender.login else f"(deleted by {render.name(by)})"


EDITED = "(edited)"


def edited_mark(rows: list[Line], m: pb.ChatMessage, width: int) -> list[Line]:
    """``(edited)`` after an edited message's text, dim: on its last line if it fits."""
    if not m.edited_unix_ms or not rows:
        return rows
    used = sum(width_of(t) for _, t in rows[-1])
    if used + 1 + width_of(EDITED) <= width:
        rows[-1] = [*rows[-1], ("class:edited", " " + EDITED)]
    else:
        head = sum(width_of(t) for _, t in rows[0][:-1])  # under the text column
        pad = head if head <= width // 2 else min(8, max(2, width // 4))
        rows.append([("", " " * pad), ("class:edited", EDITED)])
    return rows


def wrap(text: str, width: int, *, first: int | None = None) -> list[str]:
    """Word-wrap one line to ``width`` display columns (``first`` for the first row);
    words longer than a row are cut."""
    limit = max(1, first if first is not None else width)
    rows: list[str] = []
    row, row_w = "", 0
    for word in re.split(r"(?<= )", text):  # each word keeps its trailing space
        w = width_of(word.rstrip(" "))
        if row_w + w <= limit:
            row, row_w = row + word, row_w + width_of(word)
            continue
        if row:
            rows.append(row.rstrip(" "))
            row, row_w, limit = "", 0, max(1, width)
        while width_of(word.rstrip(" ")) > limit:  # longer than a whole row
            cut, cw = 0, 0
            for ch in word:
                if cw + get_cwidth(ch) > limit:
                    break
                cw += get_cwidth(ch)
                cut += 1
            if 0 < cut < len(word):  # (a flag cut in two showed as two letters)
                cut = apart(word, cut)
            rows.append(word[:max(1, cut)])
            word = word[max(1, cut):]
            limit = max(1, width)
        row, row_w = word, width_of(word)
    rows.append(row.rstrip(" "))
    return rows


def _blocks(conv: Conversation, renderer: Renderer, width: int
            ) -> Iterator[tuple[Entry, list[Line]]]:
    """Each entry of ``conv`` with its lines as drawn at ``width``, newest first: its day's
    separator and the unread marker placed above it."""
    entries = conv.entries
    for i in range(len(entries) - 1, -1, -1):
        e = entries[i]
        block = list(renderer.render(e, width))
        if e.message is not None and e.id == conv.marker_id:
            block.insert(0, renderer.separator("new since you last looked", width,
                                               "class:marker"))
        if i == 0 or day_of(entries[i - 1].ts_ms) != day_of(e.ts_ms):
            block.insert(0, renderer.separator(day_label(day_of(e.ts_ms)), width))
        yield e, block


def _outgoing_lines(renderer: Renderer, width: int, outgoing: Sequence[Outgoing],
                    me: pb.Identity | None) -> list[Line]:
    """What is on its way, drawn below the entries (nothing without ``me``)."""
    return [line for out in outgoing for line in renderer.outgoing(out, me, width)] if (
        me is not None) else []


def _same_place(conv: Conversation, renderer: Renderer, old: int, new: int,
                outgoing: Sequence[Outgoing], me: pb.Identity | None) -> int:
    """``conv.scroll``, rows at width ``old``, as rows at width ``new`` that keep the entry
    at the bottom of the view there (and as far into it). Kept as rows, a scrolled view
    narrowed from 100 to 60 columns moved ten messages down, and widened it moved up (a
    daily user's day, 2026-11-25)."""
    below_old = len(_outgoing_lines(renderer, old, outgoing, me))
    below_new = len(_outgoing_lines(renderer, new, outgoing, me))
    if conv.scroll < below_old:  # (in what is on its way: those rows are few)
        return min(conv.scroll, below_new)
    for (_, at_old), (_, at_new) in zip(_blocks(conv, renderer, old),
                                        _blocks(conv, renderer, new), strict=True):
        if below_old + len(at_old) > conv.scroll:
            into = (conv.scroll - below_old) / len(at_old)
            return below_new + round(into * len(at_new))
        below_old += len(at_old)
        below_new += len(at_new)
    return below_new  # (above everything loaded: visible_lines clamps it)


def visible_lines(conv: Conversation, renderer: Renderer, width: int, height: int,
                  outgoing: Sequence[Outgoing] = (), me: pb.Identity | None = None
                  ) -> tuple[list[Line], bool]:
    """The ``height`` lines of ``conv`` to draw at ``width``, scrolled ``conv.scroll`` lines
    up from the bottom (clamped to what is loaded). Day separators and the unread marker are
    placed here. Returns the lines, and whether the oldest loaded line is on screen."""
    if conv.scroll and width != conv.width:
        conv.scroll = _same_place(conv, renderer, conv.width, width, outgoing, me)
    conv.width = width
    want = height + conv.scroll
    lines = _outgoing_lines(renderer, width, outgoing, me)
    blocks: list[list[Line]] = []  # one per entry, newest first
    count = len(lines)
    drawn = _blocks(conv, renderer, width)
    while count < want and (nxt := next(drawn, None)) is not None:
        blocks.append(nxt[1])
        count += len(nxt[1])
    lines = [line for block in reversed(blocks) for line in block] + lines
    conv.scroll = max(0, min(conv.scroll, len(lines) - height))
    end = len(lines) - conv.scroll
    top = max(0, end - height)
    return lines[top:end], len(blocks) == len(conv.entries) and top == 0


def on_screen(conv: Conversation, entry: Entry, renderer: Renderer, width: int, height: int,
              outgoing: Sequence[Outgoing] = (), me: pb.Identity | None = None) -> bool:
    """Whether any line of ``entry`` is among those ``visible_lines`` draws (counted as it
    counts them, from the bottom)."""
    below = len(_outgoing_lines(renderer, width, outgoing, me))
    for e, block in _blocks(conv, renderer, width):
        if e is entry:
            return below < conv.scroll + height and below + len(block) > conv.scroll
        below += len(block)
        if below >= conv.scroll + height:
            return False
    return False


def topic_said(m: pb.ChatMessage) -> str:
    """The notice a TOPIC event is shown as."""
    return (f"{who(m.sender)} set the topic: {m.text}" if m.text else
            f"{who(m.sender)} cleared the topic")


def change_said(change: pb.ChatMessage, target: pb.ChatMessage) -> str:
    """The notice for an EDIT or DELETE of ``target`` when its line cannot be changed in
    place (`tail` prints lines; the chat changes the line already on screen)."""
    whose = "their" if change.sender.login == target.sender.login else f"{who(target.sender)}'s"
    what = f"{whose} message of {clock(target.sent_unix_ms)}"
    if change.kind == pb.MESSAGE_KIND_DELETE:
        return f"{who(change.sender)} deleted {what}"
    return f"{who(change.sender)} edited {what}: {change.text}"


def _text(rows: list[Line]) -> list[str]:
    return ["".join(t for _, t in row) for row in rows]


def plain_lines(m: pb.ChatMessage) -> list[str]:
    """A message as text lines for `history` and `tail` (the same rule, no colours)."""
    head: Line = [("", clock(m.sent_unix_ms) + " "), *Renderer(Palette(["x"])).nick(m)]
    rows = (layout(head, tombstone(m), 10_000, mark=False) if m.deleted_by else
            edited_mark(layout(head, visible(m.text), 10_000), m, 10_000))
    return _text(rows)


def room_label(room: str) -> str:
    """A room as the one-shot commands print it: ``#general``, ``+ops``, and a DM by its
    full name (``dm:alice@example.com,bob@example.com``), which `--room` takes back."""
    return room if room.startswith(("+", "dm:")) else f"#{room}"


def found_lines(m: pb.ChatMessage) -> list[str]:
    """A message found by `search` or `mentions`, which come from any room and any day:
    ``2026-11-24 09:30 #room [id] <Name> text`` (the name as `history` shows it; they showed
    the login and no time: a new user's day, 2026-11-24), its later lines hung behind ┊ like
    every message's (they were printed flush left, so a message could end in a line that
    passed for another message found: a new user's day, 2026-11-23)."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.sent_unix_ms / 1000))
    head: Line = [("", f"{when} {visible(room_label(m.room))} [{m.id}] "),
                  *Renderer(Palette(["x"])).nick(m)]
    return _text(layout(head, visible(m.text), 10_000))


def plain_notice(ts_ms: int, text: str, *, mark: bool = False) -> list[str]:
    """A notice (``-- ...``) as text lines, as the chat shows one. ``mark``: the text is
    someone's words that may hold line breaks (an edit), hung behind ┊ like a message's."""
    return _text(layout([("", clock(ts_ms) + " "), ("", "-- ")], visible(text), 10_000,
                        mark=mark))


class PlainView:
    """Messages printed as text lines in order (`history`, `tail`) under the chat's rules
    (``Conversation``): a message as its lines, a topic change as the chat's notice, an edit
    or deletion applied to the message it changes. Such a change prints nothing when the
    message is not shown here or is shown so already (History and a replay give messages as
    they now are); otherwise (a change that arrives live in `tail`, after its message was
    printed) it is one notice, the printed line being past changing."""

    def __init__(self) -> None:
        self.conv = Conversation("")
        self.days = Days()

    def lines(self, m: pb.ChatMessage) -> list[str]:
        if m.kind in CHANGES:
            target = next((e for e in reversed(self.conv.entries)
                           if e.message is not None and e.id == m.target_id), None)
            before = None if target is None or target.message is None else (
                target.message.text, target.message.deleted_by)
            changed = self.conv.apply_change(m)
            if changed is None or changed.message is None or before == (
                    changed.message.text, changed.message.deleted_by):
                return []
            out = plain_notice(m.sent_unix_ms, change_said(m, changed.message),
                               mark=m.kind == pb.MESSAGE_KIND_EDIT)
        elif m.kind == pb.MESSAGE_KIND_TOPIC:
            e = self.conv.topic_changed(m)
            out = plain_notice(e.ts_ms, e.text)
        else:
            self.conv.add_message(m, own=False, mention=False, shown=True, live=False)
            out = plain_lines(m)
        day = self.days.separator(m.sent_unix_ms)
        return [day, *out] if day is not None else out


class Days:
    """Gives a day separator line when the day changes between messages printed in order."""

    def __init__(self) -> None:
        self.last: dt.date | None = None

    def separator(self, ms: int) -> str | None:
        day = day_of(ms)
        if day == self.last:
            return None
        self.last = day
        return f"── {day_label(day)} ──"


def describe_members(members: Sequence[pb.Identity], away: Iterable[str] = ()) -> str:
    gone = set(away)
    names = sorted({who(m) + (" (away)" if m.login in gone else "") for m in members},
                   key=str.lower)
    return ", ".join(names) if names else "nobody"
