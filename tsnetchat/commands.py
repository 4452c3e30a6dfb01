"""The terminal chat's commands: what a typed line means, usage for a misused command, and
tab completion. Pure (no terminal, no network); ``tui`` carries them out.

Commands are case-insensitive (``/HELP``), rooms may be written ``#room``, and a line that
starts with ``//`` is a message that starts with ``/``. A new command is one more row in
``COMMANDS`` and one more handler in ``tui.ChatApp``.
"""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .chatview import dm_with
from .config import LOGIN_RE, PRIVATE_RE, ROOM_RE

MAX_HISTORY_PAGE = 200


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # as shown in usage: "ROOM", "[N]", "TEXT"
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def usage(self) -> str:
        return f"/{self.name} {self.args}".rstrip()


COMMANDS = [
    Command("join", "ROOM", "join a room (#room, +room if you are a member, or @person for "
            "a DM, @bob,carol for a group DM) and switch to it", ("j",)),
    Command("leave", "[ROOM]", "leave this room (or ROOM, @person for a DM); closes a DM or "
            "search buffer",
            ("part", "close")),
    Command("msg", "NICK[,NICK...] [TEXT]", "a direct message: opens the conversation with "
            "NICK (a name or login; several, split by commas, for a group) and sends TEXT",
            ("query", "dm")),
    Command("who", "", "who is in this room", ("names",)),
    Command("me", "TEXT", "an action: * you TEXT"),
    Command("topic", "[TEXT]", "show this room's topic, or set it"),
    Command("edit", "TEXT", "replace the text of your last message here"),
    Command("delete", "", "delete your last message here (its text is gone for everyone)",
            ("del",)),
    Command("search", "WORDS", "search every room and DM you may read (word* a prefix); "
            "results in a buffer of their own"),
    Command("away", "[MESSAGE]", "tell your rooms you are away (and why)"),
    Command("back", "", "no longer away"),
    Command("history", "[N]", f"load N (default 50, at most {MAX_HISTORY_PAGE}) older messages"),
    Command("rooms", "", "the rooms you may use, and who is in them", ("list",)),
    Command("create", "+ROOM NICK...", "(admins) create a private room for these people"),
    Command("invite", "NICK...", "(admins) add people to this private room"),
    Command("remove", "NICK...", "(admins) remove people from this private room"),
    Command("kick", "NICK", "(admins) close NICK's streams in this room; they may join again "
            "(to keep them out, revoke their token or narrow their grant)"),
    Command("retry", "", "send this room's failed messages again"),
    Command("help", "[COMMAND]", "the commands, or one command", ("h", "?")),
    Command("quit", "", "leave the chat (also Ctrl-D, Ctrl-C)", ("exit", "q")),
]
_BY_NAME = {n: c for c in COMMANDS for n in (c.name, *c.aliases)}


@dataclass(frozen=True)
class Parsed:
    """A command with its checked arguments: ``room`` for join/leave/create, ``number`` for
    history, ``text`` for me/help/msg/topic/edit/search/away, ``nicks`` for
    msg/create/invite/remove/kick (as typed: names or logins). ``after_comma``: for
    `/msg bob, carol hi`, "carol": a group typed with a space after the comma if that is
    somebody (the chat knows who), else the text's first word (`/msg bob, hi there`)."""

    command: Command
    room: str = ""
    number: int = 0
    text: str = ""
    nicks: tuple[str, ...] = ()
    after_comma: str = ""


@dataclass(frozen=True)
class Message:
    """A line to send as it is."""

    text: str


@dataclass(frozen=True)
class Problem:
    """A line that is neither: said to the person, the line kept for editing."""

    text: str


def room_name(arg: str) -> str | None:
    """``#Room``, ``room`` or ``+private`` as a room name, or None when it cannot be one."""
    return _a_room(arg.strip().lstrip("#").lower())


def _a_room(name: str) -> str | None:
    """``name`` if it is a room's or a private room's name as it stands, else None."""
    return name if ROOM_RE.fullmatch(name) or PRIVATE_RE.fullmatch(name) else None


def room_option(value: str) -> str:
    """The one-shot commands' ``--room`` as the chat's /join takes it: ``#General`` is
    ``general``, ``@bob`` the DM ``dm:bob`` (a short name, at the caller's domain:
    clientcmds.dm_logins). Nothing is stripped: the server refuses ``general\n`` as it is.
    (`send --room '#general'` was refused as no room name while `connect --room '#ops'`
    took it: a new user's day, 2026-11-24.)"""
    if value.startswith("@"):
        return "dm:" + value[1:]
    return _a_room(value.removeprefix("#").lower()) or value


_AGO = re.compile(r"(\d{1,9})\s*(m|min|h|d|w)", re.IGNORECASE)
_AGO_SECONDS = {"m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 604_800}
WHEN_FORMS = ("a date or time (2026-11-24, 2026-11-24T09:30, your time zone unless it "
              "says +01:00 or Z), a time ago (90m, 2h, 3d, 1w) or milliseconds since the "
              "epoch")


def when_ms(text: str, now: float) -> int:
    """``search --since/--until`` in milliseconds since the epoch: a date or time (ISO
    8601; local time unless it names its zone), a time ago (``2h``), or milliseconds as
    they were the only form (a newcomer, 2026-11-24: `--since 2026-11-24` was "Input should
    be a valid integer"). ValueError names the forms."""
    t = text.strip()
    if t.isascii() and t.isdigit() and len(t) != 8:  # (8 digits: a date, 20261124)
        ms = int(t)
    elif (ago := _AGO.fullmatch(t)) is not None:
        ms = int((now - int(ago[1]) * _AGO_SECONDS[ago[2].lower()]) * 1000)
    else:
        try:
            moment = datetime.datetime.fromisoformat(t.replace(" ", "T", 1) if " " in t else t)
            if moment.tzinfo is None:
                moment = moment.astimezone()  # (a naive time is this machine's local time)
            ms = int(moment.timestamp() * 1000)
        except (ValueError, OverflowError, OSError):  # (OverflowError near year 9999 in
            # some zones, ValueError for year 1: a review, 2026-11-24)
            raise ValueError(f"{text!r} is not a time: give {WHEN_FORMS}") from None
    if ms <= 0:  # (0 is "not given": the search had no bound at all)
        raise ValueError(f"{text!r} is not after 1970: give {WHEN_FORMS}")
    return ms


def room_asked(typed: str, me: str) -> str:
    """The room ``connect --room`` names, as the chat names rooms: ``#Ops`` is ``ops``, and
    a DM (``@bob``, ``dm:bob``, ``dm:bob@example.com``) is its one canonical name, with the
    caller (a DM given otherwise opened a second buffer for the same conversation: a new
    user's day, 2026-11-24)."""
    word = typed.strip()
    if word.startswith("@") or word.startswith("dm:"):
        return dm_with(me, word.removeprefix("dm:").lstrip("@").split(","))
    return room_name(word) or word


NICK_RE = re.compile(r"@?(?:" + LOGIN_RE.pattern + r"|[^\s@,:]{1,64})")


def nick(word: str) -> str | None:
    """A person as typed in a command (``bob``, ``@Bob``, ``bob@example.com``), without the
    ``@`` and a trailing ``:`` or ``,`` that completion adds; None if it cannot be one."""
    word = word.rstrip(":,")
    return word.lstrip("@") if word and NICK_RE.fullmatch(word) else None


def nicks(word: str) -> tuple[str, ...]:
    """The people of a DM as typed in one word (``bob``, ``@bob,carol``: one or a group);
    empty if any part cannot be a person. (Group DMs could not be opened from the chat: a
    new user's day, 2026-11-24.)"""
    parts = [nick(p) for p in word.rstrip(":,").split(",")]
    return () if None in parts else tuple(dict.fromkeys(p for p in parts if p))


def parse(line: str) -> Parsed | Message | Problem:
    if not line.startswith("/"):
        # A command typed after a space is still the command (` /join #ops` went to the room
        # as a message: a new user's day, 2026-11-24), also pasted with its line's end
        # (`  /msg bob ...` and a newline went to the whole room: another, the same day);
        # other text after spaces is text, and so is a pasted block of lines.
        bare = line.strip(" \t\n")
        if "\n" not in bare and bare.startswith("/") and (
                bare[1:].split(" ", 1)[0].lower() in _BY_NAME):
            return parse(bare)
        return Message(line)
    if line.startswith("//"):
        return Message(line[1:])
    word, _, rest = line[1:].partition(" ")
    arg = rest.strip()
    cmd = _BY_NAME.get(word.lower())
    first = word.split("\n", 1)[0]
    if cmd is None and "\n" in word and first.lower() in _BY_NAME:
        # (a pasted block whose first line is a command: "/quit\nbye" was said to be
        # "unknown command /quit\nbye; did you mean /quit?"; a review, 2026-11-25)
        return Problem(f"/{first} is a command of one line: send it alone (the lines "
                       "after it stay here to edit)")
    if cmd is None:
        names = difflib.get_close_matches(word.lower(), list(_BY_NAME), n=2, cutoff=0.6)
        close = list(dict.fromkeys(_BY_NAME[n].usage for n in names))
        hint = f"; did you mean {', '.join(close)}?" if close else "; /help lists them"
        return Problem(f"unknown command /{word}{hint} (// at the start sends a /)")
    # (as /help shows it: in parentheses, a help with its own said "(delete your last
    # message here (its text is gone for everyone))"; a daily user, 2026-11-25)
    usage = Problem(f"usage: {cmd.usage}  {cmd.help}")
    if cmd.name == "join" and arg.startswith(("@", "dm:")):
        # a DM, as `connect --room @bob` opens one: what /msg bob does (it was a usage error:
        # a new user's day, 2026-11-24)
        group = nicks(arg.removeprefix("dm:"))
        if group:
            return Parsed(_BY_NAME["msg"], nicks=group)
    if cmd.name == "leave" and arg.startswith(("@", "dm:")):
        # (only from inside a DM could one close it: a new user's day, 2026-11-24)
        group = nicks(arg.removeprefix("dm:"))
        if group:
            return Parsed(cmd, nicks=group)
    if cmd.name in ("join", "leave") and arg.startswith(("@", "dm:")):
        return Problem(f"usage: /{cmd.name} @bob, or @bob,carol for a group (people split "
                       "by commas, no spaces)")
    if cmd.name == "join" or (cmd.name == "leave" and arg):
        room = room_name(arg)
        if room is None:
            return Problem(f"usage: {cmd.usage}  (a room name: a-z, 0-9, - and _, up to 32, "
                           f"e.g. #general, or +private)")
        return Parsed(cmd, room=room)
    if cmd.name in ("me", "edit"):
        return Parsed(cmd, text=rest.strip("\n")) if arg else usage
    if cmd.name in ("topic", "away"):
        if "\n" in arg:
            return Problem(f"usage: {cmd.usage}  (one line)")
        return Parsed(cmd, text=arg)
    if cmd.name == "search":
        return Parsed(cmd, text=" ".join(arg.split())) if arg else usage
    if cmd.name == "kick":
        person = nick(arg)
        return Parsed(cmd, nicks=(person,)) if person else usage
    if cmd.name == "msg":
        who, _, text = rest.strip(" ").partition(" ")
        group = nicks(who)
        if not group:
            return Problem(f"usage: {cmd.usage}  (a name or a login, e.g. /msg bob hi, or "
                           "several for a group: /msg bob,carol hi)")
        text = text.strip(" \n")
        after = text.split(None, 1)[0].rstrip(",:") if who.endswith(",") and text else ""
        return Parsed(cmd, nicks=group, text=text, after_comma=after)
    if cmd.name == "create":
        first, _, others = arg.partition(" ")
        room = room_name(first)
        people = [nick(w) for w in others.split()]
        if room is None or not room.startswith("+") or not people or None in people:
            return Problem(f"usage: {cmd.usage}  (e.g. /create +ops alice bob)")
        return Parsed(cmd, room=room, nicks=tuple(p for p in people if p))
    if cmd.name in ("invite", "remove"):
        people = [nick(w) for w in arg.split()]
        if not people or None in people:
            return usage
        return Parsed(cmd, nicks=tuple(p for p in people if p))
    if cmd.name == "history":
        if not arg:
            return Parsed(cmd, number=50)
        if not arg.isdigit() or not 1 <= int(arg) <= MAX_HISTORY_PAGE:
            return Problem(f"usage: {cmd.usage}  (N is a number from 1 to {MAX_HISTORY_PAGE})")
        return Parsed(cmd, number=int(arg))
    if cmd.name == "help":
        return Parsed(cmd, text=arg.lstrip("/").lower())
    if arg and cmd.name != "quit":  # /quit may carry a goodbye, as on IRC
        return usage
    return Parsed(cmd)


USAGE_COLUMN = 20  # /help's first column


def help_text(topic: str = "") -> str:
    if topic:
        cmd = _BY_NAME.get(topic)
        if cmd is None:
            return f"no command /{topic}; /help lists them"
        also = f" (also /{', /'.join(cmd.aliases)})" if cmd.aliases else ""
        return f"{cmd.usage}  {cmd.help}{also}"
    # Two spaces after the usage, and a long usage's description on a line of its own:
    # chatview.layout hangs a wrapped description under the descriptions' column.
    rows = [f"  {c.usage:<{USAGE_COLUMN}}  {c.help}" if len(c.usage) <= USAGE_COLUMN else
            f"  {c.usage}\n  {'':<{USAGE_COLUMN}}  {c.help}" for c in COMMANDS]
    keys = ("keys: Enter sends, Alt-Enter or Ctrl-J a new line, Ctrl-U clears what is before "
            "the cursor (Ctrl-Y puts it back), Up/Down your earlier lines, "
            "Tab completes, PgUp/PgDn scroll (Ctrl-End back to the bottom), Alt-1..9 or "
            "Ctrl-N/Ctrl-P switch rooms, Ctrl-Z suspends")
    return "\n".join(["commands (any case; #room or room):", *rows, keys])


def complete(before: str, *, rooms: Iterable[str], nicks: Iterable[str]
             ) -> list[tuple[str, int]]:
    """Completions for the text before the cursor: (replacement, start position relative to
    the cursor, negative), for commands, rooms and nicks."""
    word = before.rsplit(" ", 1)[-1].rsplit("\n", 1)[-1]
    cmd = before[1:].split(" ", 1)[0].lower() if before.startswith("/") else ""
    group = _GROUP.fullmatch(before) if (
        cmd in _DM_COMMANDS or _BY_NAME.get(cmd) in _ROOM_COMMANDS) else None
    if group is not None and (cmd in _DM_COMMANDS or group["dm"]):
        # The next person of a group (`/msg bob,ca`, `/join @bob,ca`), written without the
        # spaces Enter would refuse (`/msg bob, mal` completed to `/msg bob, mallory`, and
        # `/join @bob,mal` to nothing: a new user's day, 2026-11-24).
        done, part = group["done"], group["part"]
        named = [n.strip() for n in done.split(",")[:-1]]
        kept = "".join(f"{n}," for n in named)
        start = -len(done) - len(part) if kept != done else -len(part)
        lead = kept if kept != done else ""
        taken = {n.lower() for n in named}  # (not one already named)
        return [(lead + n, start) for n in _unique(nicks) if n.lower().startswith(
            part.lower()) and n.lower() not in taken] if part or done else []
    start = -len(word)
    if before.startswith("/") and " " not in before:
        names = sorted({n for c in COMMANDS for n in (c.name, *c.aliases) if len(n) > 1})
        return [(f"/{n} ", start) for n in names if n.startswith(word[1:].lower())]
    if word.startswith("#") or (_BY_NAME.get(cmd) in _ROOM_COMMANDS and before.count(" ") == 1):
        want = word.lstrip("#").lower()
        return [(r if r.startswith("+") else f"#{r}", start) for r in sorted(set(rooms))
                if r.startswith(want) and not r.startswith("dm:")]
    if word.startswith("@") and len(word) > 1:  # (`hey @Bo` completed to nothing: a
        want = word[1:].lower()                   # daily user's run, 2026-11-24)
        return [(f"@{n}", start) for n in _unique(nicks) if n.lower().startswith(want)]
    if not word:
        return []
    at_start = before == word
    return [(f"{n}: " if at_start else n, start) for n in _unique(nicks)
            if n.lower().startswith(word.lower())]


def wants_people(before: str) -> bool:
    """Whether the text before the cursor names people beyond the room's members: a DM's or
    a private room's (`/msg`, `/join @`, `/leave @`, `/create`, `/invite`, `/remove`)."""
    cmd = _BY_NAME.get(before[1:].split(" ", 1)[0].lower()) if before.startswith("/") else None
    if cmd is None or " " not in before:
        return False
    if cmd.name in ("msg", "invite", "remove", "create"):
        return True
    return cmd.name in ("join", "leave") and before.split(" ", 1)[1].startswith(("@", "dm:"))


_ROOM_COMMANDS = {_BY_NAME["join"], _BY_NAME["leave"], _BY_NAME["create"]}
# A command's people being typed: `/msg bob, ca` (done "bob, ", part "ca"); `/join @bob,ca`.
_GROUP = re.compile(r"/\S+ (?P<dm>@|dm:)?(?P<done>(?:[^\s,]+ *, *)*)(?P<part>[^\s,]*)")
_DM_COMMANDS = {"msg", *_BY_NAME["msg"].aliases}


def _unique(names: Iterable[str]) -> Sequence[str]:
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n, None)
    return sorted(seen, key=str.lower)


class InputHistory:
    """The lines a person submitted, for Up/Down: Up from the draft goes to the newest, Down
    past the newest gives the draft back. (Ours rather than prompt_toolkit's, whose history
    reloads in a background task after each submit and can miss an Up typed right after.)"""

    def __init__(self, limit: int = 1000) -> None:
        self.lines: list[str] = []
        self.limit = limit
        self.pos: int | None = None  # None: editing the draft
        self.draft = ""

    def add(self, text: str) -> None:
        if text.strip() and (not self.lines or self.lines[-1] != text):
            self.lines.append(text)
            del self.lines[:-self.limit]
        self.pos = None

    def older(self, current: str) -> str | None:
        if not self.lines:
            return None  # (nothing to go through: still the draft)
        if self.pos is None:
            self.draft, self.pos = current, len(self.lines)
        if self.pos == 0:
            return None
        self.pos -= 1
        return self.lines[self.pos]

    def recalled(self) -> str | None:
        """The submitted line Up showed last, while one is shown (None: editing the draft)."""
        return self.lines[self.pos] if self.pos is not None and self.pos < len(self.lines) else None

    def leave(self) -> str:
        """Stop going through the lines: the draft they were entered from ("" if none)."""
        draft, self.pos, self.draft = (self.draft if self.pos is not None else ""), None, ""
        return draft

    def newer(self) -> str | None:
        if self.pos is None:
            return None
        self.pos += 1
        if self.pos >= len(self.lines):
            self.pos = None
            return self.draft
        return self.lines[self.pos]
