"""The rooms a `tsnetchat connect` had open when it ended, per server, so that the next one
opens them again (each morning began with the same `/join`s, by hand, in the order of the
day before), with what was typed in each and not sent (its draft). One small JSON file per
server in the client's state dir, beside its log; written when the chat ends, read when it
starts. A missing or damaged file is no rooms: a list of rooms is never worth refusing to
start over (the drafts are in ``unsent.txt`` too, see tui)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_ROOMS = 64  # more than anyone keeps open; a damaged file cannot open thousands
MAX_NAME = 1024  # characters; the server checks the name itself when the room is joined
MAX_DRAFT = 16 * 1024  # characters of one room's draft; a longer one is in unsent.txt only
MAX_DRAFTS = 64 * 1024  # characters of drafts in one file (JSON-escaped, under MAX_FILE)
MAX_FILE = 1024 * 1024  # bytes read at most
FOLDER = "open-rooms"


@dataclass(frozen=True)
class OpenRooms:
    """The rooms in the order they were listed, the one that was shown (or None), and what
    was typed in them and not sent, as (room, text) in the same order."""

    rooms: tuple[str, ...] = ()
    shown: str | None = None
    drafts: tuple[tuple[str, str], ...] = ()


def server_key(typed: str, port: int, *, address: str = "", dns_name: str = "") -> str:
    """Which server the rooms were open on: ``--address`` if given, else the server's
    MagicDNS name as discovery found it (so its short name, full name and tailnet IP are
    one server: by the name typed, `connect chat-server.example.ts.net` forgot the rooms
    of `connect chat-server`; a new user's day, 2026-11-24), else the name typed (case and
    a final dot forgiven); and the port."""
    return address or f"{(dns_name or typed).lower().rstrip('.')}:{port}"


def path_for(state_dir: Path, key: str) -> Path:
    """The file for ``key`` in ``state_dir``: the key with any character but a safe few as
    ``_``, and a hash of the whole key (two keys never share a file)."""
    readable = re.sub(r"[^A-Za-z0-9.:_-]", "_", key)[:100]
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return state_dir / FOLDER / f"{readable}-{digest}.json"


def load(state_dir: Path, key: str) -> OpenRooms:
    """What was open on ``key``'s server when the last chat with it ended."""
    path = path_for(state_dir, key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(MAX_FILE))
        listed = data["rooms"]
        if not isinstance(listed, list):
            raise TypeError(f"rooms is a {type(listed).__name__}, not a list")
        rooms = tuple(dict.fromkeys(
            r for r in listed if isinstance(r, str) and 0 < len(r) <= MAX_NAME))
        shown = data.get("shown")
        typed = data.get("drafts") or {}
        if not isinstance(typed, dict):
            raise TypeError(f"drafts is a {type(typed).__name__}, not an object")
    except FileNotFoundError:
        return OpenRooms()
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        # (RecursionError: JSON nested 200,000 deep stopped every start; 2026-11-25)
        log.warning("ignoring the rooms of the last session in %s: %s", path, e)
        return OpenRooms()
    rooms = rooms[:MAX_ROOMS]
    drafts = tuple((r, typed[r]) for r in rooms
                   if isinstance(typed.get(r), str) and 0 < len(typed[r]) <= MAX_DRAFT)
    return OpenRooms(rooms, shown if shown in rooms else None, drafts)


def written(state_dir: Path, key: str) -> float:
    """When ``key``'s file was last written (its mtime), 0.0 if it cannot be read."""
    try:
        return path_for(state_dir, key).stat().st_mtime
    except OSError:
        return 0.0


def save(state_dir: Path, key: str, open_rooms: OpenRooms, *,
         took: Mapping[str, str] | None = None) -> dict[str, str]:
    """Remember ``open_rooms`` for ``key``'s server (0600; replaced whole, never half
    written); the drafts of ``open_rooms`` written, by room. A failure is logged, not raised
    (no drafts written): the chat is ending, and what is typed here is in ``unsent.txt`` as
    well. Drafts beyond ``MAX_DRAFT`` or ``MAX_DRAFTS`` are left out.

    ``took``: the drafts in the file now are another chat's (a chat takes the file's out
    when it starts), and are kept, before ours in the same room, their rooms after ours;
    except one that is what this chat took at its start (``took``, by room: its taking out
    may have failed, on a full disk). With two chats open to one server, the second to end
    wrote over what the first had promised would be back in its input (a kill -9 run,
    2026-11-24)."""
    path = path_for(state_dir, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    theirs = {} if took is None else {room: text for room, text in load(state_dir, key).drafts
                                      if took.get(room) != text}
    rooms = tuple(dict.fromkeys((*open_rooms.rooms, *theirs)))[:MAX_ROOMS]
    ours = dict(open_rooms.drafts)
    drafts: dict[str, str] = {}
    written: dict[str, str] = {}
    used = 0
    for room in rooms:
        both = [t for t in (theirs.get(room), ours.get(room)) if t]
        # Both (the same text twice is once), else ours alone, else theirs alone: two too
        # long together lost both (a review, 2026-11-25).
        for text in ("\n".join(dict.fromkeys(both)), ours.get(room, ""), theirs.get(room, "")):
            if 0 < len(text) <= MAX_DRAFT and used + len(text) <= MAX_DRAFTS:
                drafts[room] = text
                used += len(text)
                if room in ours and ours[room] in text:
                    written[room] = ours[room]
                break
    # (ASCII: a lone surrogate typed or pasted is escaped, and read back as it was)
    body = json.dumps({"rooms": list(rooms), "shown": open_rooms.shown, "drafts": drafts})
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not remember the open rooms in %s: %s", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return {}
    return written
