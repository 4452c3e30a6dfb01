"""Who may read a room, and who a message mentions. Pure logic: no gRPC, no SQLite.

Three kinds of room:

* ordinary rooms (``general``): whoever's token (narrowed by the tailnet grant) names the
  room, or ``*``;
* private rooms (``+name``): only their members (``room_members``, kept by admins with
  CreateRoom/SetRoomMembers), whatever a token says, ``*`` included;
* direct conversations (``dm:alice@example.com,bob@example.com``): only the logins in the
  name. The name is canonical (sorted, unique, the caller included, each login spelled as
  the person the server knows by it: ``spelling``); a conversation exists once its first
  message is stored, and a new one only with people the server knows. Admins cannot read
  them unless the server's ``admins_read_dms`` is true.

A non-member is told the same thing whether or not a private room or conversation exists
(``NOT_VISIBLE``), so that nothing can be inferred from the answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from . import auth
from .config import LOGIN_RE, PRIVATE_RE, ROOM_RE
from .errors import InvalidInput, PermissionDenied

DM_PREFIX = "dm:"
NOT_VISIBLE = ("no such private room or conversation, or you are not a member of it")


def is_login(name: str) -> bool:
    """Whether ``name`` can be a tailnet login or tag (a DM member, a private room's)."""
    return LOGIN_RE.fullmatch(name) is not None and len(name) <= auth.MAX_LOGIN


def is_dm(room: str) -> bool:
    return room.startswith(DM_PREFIX)


def is_private(room: str) -> bool:
    return room.startswith("+")


def is_conversation(room: str) -> bool:
    """A room whose readers are its members (a private room or a DM), not token rooms."""
    return is_dm(room) or is_private(room)


def dm_room(me: str, room: str, max_members: int) -> str:
    """The canonical name of the DM that ``room`` ("dm:bob@example.com" or the full name)
    means for ``me``: the caller is always a member (``me`` "" only for an admin reading
    other people's conversations, admins_read_dms). Raises InvalidInput."""
    logins = {x.strip() for x in room[len(DM_PREFIX):].split(",") if x.strip()}
    bad = sorted(x for x in logins if not is_login(x))
    if bad:
        raise InvalidInput(f"{bad[0][:60]!r} is not a tailnet login (dm:alice@example.com,...)")
    if me:
        logins.add(me)
    if len(logins) < 2:
        # (said of `tsnetchat dm <your own login>` with a dm: name the person never typed;
        # a new user's day, 2026-11-23)
        raise InvalidInput("a direct conversation needs somebody other than you"
                           + (f" ({me})" if me else "") + ": name them by their login")
    if len(logins) > max_members:
        raise InvalidInput(f"a direct conversation has at most {max_members} people "
                           f"(max_dm_members); this one has {len(logins)}")
    return DM_PREFIX + ",".join(sorted(logins))


def dm_members(room: str) -> frozenset[str]:
    return frozenset(room[len(DM_PREFIX):].split(","))


def spelling(login: str, like: Collection[str]) -> str | None:
    """The person ``login`` (as somebody typed it) means, given ``like``: the known logins
    equal to it case-insensitively. ``login`` itself when it is one of them (logins are
    compared exactly everywhere else, and may have capitals: GitHub logins), else the only
    one; None when nobody, or several people, have it (no guessing which)."""
    if login in like:
        return login
    return next(iter(like)) if len(like) == 1 else None


def check_name(room: str) -> None:
    """Raise InvalidInput unless ``room`` is a valid room, private room or DM name."""
    if is_dm(room):
        return  # canonicalised (and checked) by dm_room
    if is_private(room):
        if not PRIVATE_RE.fullmatch(room):
            raise InvalidInput(f"{room[:40]!r} is not a valid private room name: '+' then 1-32 "
                               "characters of a-z, 0-9, '-' and '_'")
        return
    if not ROOM_RE.fullmatch(room):
        auth.check_room_name(room)


@dataclass(frozen=True)
class Access:
    """Who may read what. ``members`` answers a private room's members (from memory)."""

    members: Callable[[str], frozenset[str]]
    admins_read_dms: bool = False

    def may_read(self, p: auth.Principal, room: str) -> bool:
        if is_dm(room):
            return p.login in dm_members(room) or (p.admin and self.admins_read_dms)
        if is_private(room):
            return p.login in self.members(room)
        return p.may_use(room)

    def check(self, p: auth.Principal, room: str) -> None:
        """Raise PermissionDenied unless ``p`` may read ``room`` (a canonical name)."""
        if self.may_read(p, room):
            return
        if is_conversation(room):
            raise PermissionDenied(NOT_VISIBLE)
        auth.check_room(p, room)

    def readable(self, p: auth.Principal, rooms: Iterable[str]) -> list[str]:
        return sorted(r for r in rooms if self.may_read(p, r))


# --- mentions ---------------------------------------------------------------------------

_WORD = r"[\w.@-]"  # a name continues with these: "alice" is not mentioned in "alice.b@x"
_FIRST_WORD = re.compile(r"\w+")


def names_of(login: str, display_name: str) -> set[str]:
    """What a person answers to: login, short login (before the @), display name."""
    names = {login.lower()}
    if "@" in login and not login.startswith("tag:"):
        names.add(login.split("@", 1)[0].lower())
    if display_name.strip():
        names.add(display_name.strip().lower())
    return {n for n in names if len(n) >= 2}


class Mentions:
    """Recognises mentions of known people in text: each name, case-insensitively, on word
    boundaries, with or without a leading '@'. Rebuilt only when somebody new is seen."""

    def __init__(self, people: Mapping[str, str] | None = None) -> None:
        self._people: dict[str, str] = {}
        self._by_name: dict[str, set[str]] = {}
        self._re: re.Pattern[str] | None = None
        # The first word of every name (None: a name without one, or not ASCII, as re's
        # case folding is wider than lower() there): an ASCII text none of whose words is
        # one of these mentions nobody, and most texts are decided so, without the pattern
        # (which cost 2.7% of the server's samples at saturation into 100 subscribers,
        # py-spy, 2026-11-22).
        self._first_words: set[str] | None = set()
        for login, display in (people or {}).items():
            self.add(login, display)

    def add(self, login: str, display_name: str) -> None:
        if self._people.get(login) == display_name:
            return
        self._people[login] = display_name
        for n in names_of(login, display_name):
            self._by_name.setdefault(n, set()).add(login)
            first = _FIRST_WORD.search(n)
            if first is None or not n.isascii() or self._first_words is None:
                self._first_words = None
            else:
                self._first_words.add(first.group())
        self._re = None

    def knows(self, login: str) -> bool:
        return login in self._people

    def logins_like(self, login: str) -> set[str]:
        """The logins known here equal to ``login`` case-insensitively (a new set)."""
        key = login.lower()
        return {x for x in self._by_name.get(key, ()) if x.lower() == key}

    def find(self, text: str) -> tuple[str, ...]:
        """The logins ``text`` mentions, sorted."""
        if not self._by_name:
            return ()
        if (self._first_words is not None and text.isascii()
                and self._first_words.isdisjoint(_FIRST_WORD.findall(text.lower()))):
            return ()
        if self._re is None:
            alts = "|".join(re.escape(n) for n in sorted(self._by_name, key=len, reverse=True))
            # A trailing full stop ends a sentence; "alice.b" is another name.
            self._re = re.compile(rf"(?<!{_WORD})@?({alts})(?![\w@-]|\.\w)", re.IGNORECASE)
        found: set[str] = set()
        for m in self._re.finditer(text):
            found |= self._by_name.get(m.group(1).lower(), set())
        return tuple(sorted(found))
