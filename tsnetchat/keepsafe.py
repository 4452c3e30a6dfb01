"""What a running `tsnetchat connect` has typed and not had stored, on disk while it runs, for
the next chat when this one ends without its exit (kill -9, the OOM killer, a crash; not
written through to the disk, so a machine that loses power may lose more). The exit writes
``unsent.txt`` and the file of open rooms (``openrooms``); before this, a chat that never
reached its exit took with it everything typed since it started (a kill -9 run,
2026-11-24).

One pair of files per running chat in ``<state dir>/running/``: ``NAME.lock``, held with
``flock`` for the chat's life (the kernel lets it go however the process ends, so a lock
that can be taken is a chat that is gone; a pid can be reused, a lock cannot), and
``NAME.json``, what the chat holds now, replaced whole when it changes (never half
written). A clean exit removes both. The next chat with the same server takes what a gone
one left (``take_orphans``): its drafts back into the inputs, its lines into unsent.txt;
it removes the gone chat's files only once that is done (``Orphans.forget``). Two chats at
once have a pair each, and never write each other's.

Not written on every keystroke: the chat asks ``KeepSafe.keep`` after each submitted line and
once a second, and a file is written only when what it would hold has changed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .openrooms import MAX_ROOMS

log = logging.getLogger(__name__)

FOLDER = "running"
# Bytes of one file, written and read at most: a paste of 700,000 CJK characters made a
# file of 4 MB (escaped as ASCII then), read back as damaged, and every line in it was lost
# (a review, 2026-11-25). UTF-8 now; a file that would be longer is not written (said).
MAX_FILE = 64 * 1024 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
STALE_NEW = 60.0  # seconds after which a lock file never named is a chat killed making it


@dataclass(frozen=True)
class Held:
    """What a chat holds and has not had stored. ``rooms``, ``shown``: the rooms open and
    the one shown (as ``openrooms.OpenRooms``). ``drafts``: (room, its title, text) typed
    and not sent. ``lines``: what was sent and not confirmed, or is waiting, as a clean exit
    lists it (``ChatApp.pending_lines``)."""

    rooms: tuple[str, ...] = ()
    shown: str | None = None
    drafts: tuple[tuple[str, str, str], ...] = ()
    lines: tuple[str, ...] = ()
    # Rooms whose draft is still what the chat brought back at its start: in unsent.txt
    # already (a chat killed three times added the same draft three times; a kill -9 run,
    # 2026-11-25).
    as_restored: tuple[str, ...] = ()


class KeepSafe:
    """This chat's pair of files. ``open`` makes and locks them; ``keep`` writes what is held
    when it changed; ``close`` lets them go (removed, unless the exit could not keep what
    they hold elsewhere). A failure to write is logged once and never raised: the chat goes
    on, and its exit still keeps what it can."""

    def __init__(self, lock_fd: int, path: Path, server: str) -> None:
        self._lock_fd = lock_fd
        self.path = path
        self.server = server  # (``openrooms.server_key``)
        self._written: Held | None = None
        self.failing = ""  # why the last write failed ("" when it did not)

    @classmethod
    def open(cls, state_dir: Path, server: str) -> KeepSafe | None:
        """The pair for a chat with ``server`` starting now, or None (logged) if the folder
        cannot be written: the chat starts anyway."""
        folder = state_dir / FOLDER
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Locked before it has the name other chats look for (``take_orphans`` would take
        # a lock file found unlocked, between its making and its lock, as a chat gone).
        making = folder / f".{name}.lock.new"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            log.warning("what is typed is kept at the chat's exit only: %s", e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # (a new file: nobody else holds it)
            os.rename(making, folder / f"{name}.lock")
        except OSError as e:
            log.warning("what is typed is kept at the chat's exit only: %s", e)
            os.close(fd)
            with contextlib.suppress(OSError):
                making.unlink()
            return None
        return cls(fd, folder / f"{name}.json", server)

    def keep(self, held: Held) -> None:
        """Write ``held`` if it is not what the file holds already (``failing`` says why it
        could not be)."""
        if held == self._written:
            return
        tmp = _tmp(self.path)
        text = json.dumps({"server": self.server, "rooms": list(held.rooms),
                           "shown": held.shown, "drafts": [list(d) for d in held.drafts],
                           "lines": list(held.lines), "as_restored": list(held.as_restored)},
                          ensure_ascii=False)
        # (a lone surrogate, half an emoji pasted, escaped: read back as it was)
        body = _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text).encode()
        try:
            if len(body) > MAX_FILE:
                raise OSError(f"what is typed is over {MAX_FILE // 2**20} MiB")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, self.path)
        except OSError as e:
            if not self.failing:  # (once: a full disk would fill the log once a second)
                log.warning("could not keep what is typed in %s: %s", self.path, e)
            self.failing = e.strerror or str(e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        if self.failing:
            log.info("what is typed is kept in %s again", self.path)
        self.failing = ""
        self._written = held

    def close(self, *, remove: bool = True) -> None:
        """Let the files go: removed if ``remove`` (the exit kept what they held), else left
        for the next chat to take, as if this one had been killed."""
        if remove:
            for p in (self.path, _tmp(self.path), self.path.with_suffix(".lock")):
                with contextlib.suppress(OSError):
                    p.unlink()
        os.close(self._lock_fd)


class Orphans:
    """What chats that ended without their exit left (``take_orphans``): ``held``, oldest
    first, and their files, locked by us until ``forget`` (what they held is safe elsewhere
    now: the files go) or ``release`` (it is not: the files stay, for the next chat)."""

    def __init__(self, found: list[tuple[float, Held, list[Path], int]]) -> None:
        found.sort(key=lambda f: f[0])
        self.held = [h for _, h, _, _ in found]
        self._files = [(paths, fd) for _, _, paths, fd in found]
        # When the newest of those chats began (its lock file was made), 0.0 with none:
        # what was on disk before it, it had taken at its start.
        self.began = max((os.fstat(fd).st_mtime for _, fd in self._files), default=0.0)

    def forget(self) -> None:
        for paths, _ in self._files:
            for p in paths:
                with contextlib.suppress(OSError):
                    p.unlink()
        self.release()

    def release(self) -> None:
        for _, fd in self._files:
            os.close(fd)
        self._files = []


def take_orphans(state_dir: Path, server: str) -> Orphans:
    """What the chats with ``server`` that ended without their exit had not had stored.
    Files of a chat still running (its lock is held) or of another server are left alone;
    a damaged file, and a gone chat's that held nothing, are logged and removed."""
    found: list[tuple[float, Held, list[Path], int]] = []
    for lock_path, lock_fd in _unheld(state_dir / FOLDER):
        data_path = lock_path.with_suffix(".json")
        paths = [data_path, _tmp(data_path), lock_path]
        held: tuple[str, Held] | None
        try:
            when = data_path.stat().st_mtime
            held = _read(data_path)
        except FileNotFoundError:
            held, when = None, 0.0  # (killed before its first write: nothing to take)
        except (OSError, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as e:
            log.warning("what a chat that ended without its exit had typed is lost: %s "
                        "is damaged (%s)", data_path, e)
            held, when = None, 0.0
        if held is not None and held[0] == server:
            found.append((when, held[1], paths, lock_fd))
            continue
        if held is None:
            for p in paths:
                with contextlib.suppress(OSError):
                    p.unlink()
        os.close(lock_fd)  # (another server's: the next chat with that server takes it)
    return Orphans(found)


def _unheld(folder: Path) -> Iterator[tuple[Path, int]]:
    """The lock files in ``folder`` that no running chat holds, each locked by us now (the
    caller closes the descriptor)."""
    try:
        listed = list(folder.iterdir())
    except OSError:
        return
    for path in listed:  # (a chat killed between making its lock file and naming it)
        with contextlib.suppress(OSError):
            if path.name.endswith(".lock.new") and (
                    time.time() - path.lstat().st_mtime > STALE_NEW):
                path.unlink()
    names = sorted(p for p in listed if p.suffix == ".lock")
    for path in names:
        try:  # (non-blocking: a FIFO by that name hung the chat's start; 2026-11-25)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # (taken by another chat starting at the same moment)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a chat running now (or not a lock of ours)
            continue
        if not path.exists():  # (taken and removed by another chat before our lock)
            os.close(fd)
            continue
        yield path, fd


def _tmp(path: Path) -> Path:
    """Where ``path`` is written before it replaces the file (left by a kill mid-write)."""
    return path.with_name(f".{path.name}.tmp")


def _read(path: Path) -> tuple[str, Held]:
    """The server a file is for, and what it holds (at most ``MAX_ROOMS`` rooms)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        data = json.loads(f.read(MAX_FILE))

    def listed(key: str) -> list[Any]:
        value = data.get(key) or []
        if not isinstance(value, list):
            raise TypeError(f"{key} is a {type(value).__name__}, not a list")
        return value

    rooms = tuple(dict.fromkeys(r for r in listed("rooms") if isinstance(r, str) and r))
    rooms = rooms[:MAX_ROOMS]
    drafts = tuple((d[0], d[1], d[2]) for d in listed("drafts")
                   if isinstance(d, list) and len(d) == 3 and all(isinstance(x, str) for x in d)
                   and d[2].strip())
    lines = tuple(line for line in listed("lines") if isinstance(line, str))
    as_restored = tuple(r for r in listed("as_restored") if isinstance(r, str))
    shown = data.get("shown")
    return str(data["server"]), Held(rooms, shown if shown in rooms else None, drafts, lines,
                                     as_restored)
