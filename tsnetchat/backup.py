"""`tsnetchat backup` and `tsnetchat restore`: the history database copied safely.

* ``backup(db, dest)`` writes a consistent copy of the live database as of one moment
  (``Store.copy_to``: SQLite's ``VACUUM INTO`` in one read transaction), while the server
  runs and writes. ``cp`` is not a backup of a WAL database: the newest commits live in the
  -wal file until a checkpoint, and a copy taken mid-write can be torn. The copy is written
  under a temporary name, checked, then renamed over ``dest``: a failed backup never leaves a
  half file where the last good one was. One backup to a name at a time (``_alone``).
* ``restore(src, db, state_dir)`` puts a backup in place of the database. It refuses while
  a server runs on the state dir (``statedir.StateLock``), checks the backup first (missing,
  empty, not SQLite, not tsnetchat, written by a newer tsnetchat, damaged: StoreError, and
  nothing is touched), raises the history's generation past the one it replaces (clients
  positioned in the old history start over instead of hiding messages), and keeps the
  database it replaces beside it (``<name>.before-restore-<time>``): nothing is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, StoreDamaged, StoreError
from .statedir import (
    LOCK_NAME,
    StateLock,
    check_own_files,
    give_to_server,
    open_nofollow,
    with_sides,
)
from .store import SCHEMA_VERSION, HistoryIdentity, Store

_MKDTEMP = re.compile(r"[a-z0-9_]{8}")  # the names tempfile.mkdtemp makes after its prefix

@dataclass(frozen=True)
class Summary:
    path: Path
    messages: int
    rooms: int
    identity: HistoryIdentity | None  # None: a database from before identities (round 1)
    replaced: Path | None = None  # restore: where the database it replaced now is

    def describe(self) -> str:
        who = (f"history {self.identity.history_id[:12]} generation {self.identity.generation}"
               if self.identity else "a history from before identities")
        return (f"{self.messages} message{'' if self.messages == 1 else 's'} in {self.rooms} "
                f"room{'' if self.rooms == 1 else 's'} ({who})")


def backup(db: Path, dest: Path) -> Summary:
    """Copy the live database ``db`` to ``dest`` (replaced if it exists). Raises StoreError;
    ConfigError when there is no history at ``db`` (``no_history``)."""
    why = no_history(db)
    if why:
        raise ConfigError(why)
    if dest.is_dir():
        example = dest / db.name
        if _in_state_dir(db, example):  # (the state dir: it named the live database)
            example = Path("/var/backups") / db.name
        raise StoreError(f"{dest} is a directory; give the backup's file name, e.g. {example}")
    if _the_servers_own(db, dest):
        # (Renamed over the live database, a backup left the server writing to a deleted
        # file: what it acknowledged afterwards was lost, and the next start failed.)
        raise StoreError(f"{dest} is one of the server's own files in {db.parent}; a backup "
                         "goes somewhere else, e.g. /var/backups/tsnetchat.db")
    if _in_state_dir(db, dest):
        # (The server's user may change names there while root's SQLite writes the copy by
        # name, and replace the backup afterwards: found by a newcomer, 2026-11-25.)
        raise StoreError(f"{dest} is in the state dir {db.parent}, which the server's user "
                         "may change: a backup goes somewhere else, e.g. "
                         "/var/backups/tsnetchat.db")
    if not dest.parent.is_dir():
        raise StoreError(f"cannot write the backup {dest}: the directory {dest.parent} does "
                         "not exist")
    _replaceable(dest)
    check_own_files(db.parent, (db,))  # (before SQLite opens them by name, as root)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with _alone(dest, tmp):
            try:
                _remove(tmp)  # (a killed backup's: the lock is ours, so no running one's)
                src = Store(db, readonly=True)
                try:
                    src.copy_to(tmp)
                except StoreDamaged:
                    raise
                except StoreError as e:
                    raise _not_written(db, dest, e) from e
                finally:
                    src.close()
                summary = inspect(tmp)
                os.replace(tmp, dest)
                _sync_dir(dest.parent)
            finally:
                # (also when stopped: a backup stopped by SIGTERM left `.NAME.partial` and
                # its journal, as big as the history, until the next backup to that name)
                _remove(tmp)
    except OSError as e:
        raise StoreError(f"cannot write the backup {dest}: {e.strerror}") from e
    return Summary(dest, summary.messages, summary.rooms, summary.identity)


def _not_written(db: Path, dest: Path, e: StoreError) -> StoreError:
    """``Store.copy_to``'s error, said of the backup ``dest`` rather than of its partial copy
    (which is gone by then), with what a full disk needs. (On a full disk it said "cannot copy
    ... to .../.b.db.partial: database or disk is full", and no hint of the space: the hint
    was worked out once the partial copy was removed; an operator's run, 2026-11-25.)"""
    cause = e.__cause__
    kept = "; the backup there before is kept" if dest.exists() else ""
    full = (isinstance(cause, sqlite3.Error)
            and getattr(cause, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL) or (
        isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT))
    if full:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(dest.parent).free
            size = sum(p.stat().st_size for p in with_sides(db)[:2] if p.exists())
            words = cause.strerror if isinstance(cause, OSError) else str(cause)
            return StoreError(
                f"cannot write the backup {dest}: {words} (the disk holding {dest.parent} has "
                f"{_mib(free)} free; a copy of the history needs up to {_mib(size)}); nothing "
                f"was written{kept}. Free space there, or give a file on another disk")
    if isinstance(cause, OSError):
        return StoreError(f"cannot write the backup {dest}: {cause.strerror or cause}; nothing "
                          f"was written{kept}")
    if isinstance(cause, sqlite3.Error):
        return StoreError(f"cannot copy the history database {db} to the backup {dest}: "
                          f"{cause}; nothing was written{kept}")
    return e


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@contextlib.contextmanager
def _alone(dest: Path, tmp: Path) -> Iterator[None]:
    """This backup is the only one writing ``tmp``, the partial copy of one to ``dest``,
    while the context lasts: an flock on ``tmp``'s lock file beside it, which the kernel
    lets go of when a backup is killed. Raises StoreError while another backup to ``dest``
    runs. (Two backups to one name, a cron line's and an operator's, each removed the
    other's partial copy as a stale one: both failed, "disk I/O error" and "No such file or
    directory", and the earlier backup was gone; an operator's run, 2026-11-25.)"""
    lock = tmp.with_name(tmp.name + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"another backup to {dest} is under way; nothing was written "
                             "(let it finish, or give this one another file name)") from None
        except BaseException:
            os.close(fd)
            raise
        # (the name still ours: a backup that ended between our open and our flock removed
        # the file we locked)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(lock, follow_symlinks=False), os.fstat(fd)):
                break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # (before the lock goes: see the loop above)
        os.close(fd)


def no_history(db: Path) -> str:
    """Why there is no history to read at ``db``, in words; "" when there is one. Raises
    ConfigError (``check_own_files``) when something else stands where it should be (a FIFO
    or a dangling link was said to be no history). `backup` and the token commands
    (``cli._existing_store``) both ask here: each said it in words of its own. Both raise
    ConfigError with it (exit 3): a state dir without a history is a wrong --state-dir or
    config, as one without a key is to `token rotate-key` (backup said it with exit 8, the
    token commands with 3: the left-over of two operators' runs, 2026-11-25)."""
    if db.is_file():
        return ""
    if os.path.lexists(db):
        check_own_files(db.parent, (db,))
    return (f"there is no tsnetchat history at {db} (is --state-dir or the config file the "
            "server's? `tsnetchat serve` makes it when it first starts)")


def _replaceable(dest: Path) -> None:
    """StoreError unless ``dest`` is absent, empty or an earlier backup: the backup is renamed
    over it, so `backup /etc/tsnetchat/config.toml` (or /dev/null, as root) replaced that."""
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        raise StoreError(f"{dest} exists and is not a regular file; nothing was written: give "
                         "a new file name, or an earlier backup to replace")
    if dest.is_file() and dest.stat().st_size > 0:
        try:
            inspect(dest)
        except StoreError as e:
            raise StoreError(f"{dest} exists and is not a tsnetchat backup, so it is not "
                             f"replaced; nothing was written ({e})") from None


def _the_servers_own(db: Path, dest: Path) -> bool:
    """Whether ``dest`` is the database, its -wal/-shm, or the key or lock beside it."""
    own = [*with_sides(db)]
    own += [db.with_name(n) for n in ("jwt.key", LOCK_NAME)]
    target = dest.resolve()
    for p in own:
        if p.resolve() == target:
            return True
        with contextlib.suppress(OSError):
            if dest.exists() and p.exists() and os.path.samefile(p, dest):  # (a hard link)
                return True
    return False


def _in_state_dir(db: Path, dest: Path) -> bool:
    """Whether ``dest`` would be written in the state dir of ``db`` (or below it)."""
    return _the_servers_own(db, dest) or dest.parent.resolve().is_relative_to(
        db.parent.resolve())


def inspect(path: Path) -> Summary:
    """What a backup file holds, after checking it is one this tsnetchat can restore.
    Raises StoreError naming what is wrong; opens the file read-only."""
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if not path.is_file():
        raise StoreError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise StoreError(f"{path} is empty (0 bytes): not a tsnetchat backup")
    try:
        with _read_only(path) as db:
            return _inspect(path, db)
    except sqlite3.Error as e:
        raise StoreError(f"cannot read {path}: {e}") from e


def _inspect(path: Path, db: sqlite3.Connection) -> Summary:
    """``inspect`` of the open ``db``; sqlite3.Error passes through."""
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                           "WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a tsnetchat backup (not an SQLite database: "
                         f"{e})") from e
    if not {"messages", "rooms", "tokens"} <= tables:
        raise StoreError(f"{path} is an SQLite database but not a tsnetchat history (it "
                         "has no messages, rooms and tokens tables)")
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} was written by a newer tsnetchat (schema version "
                         f"{version}; this one understands up to {SCHEMA_VERSION}): "
                         "upgrade tsnetchat, then restore")
    check = [r[0] for r in db.execute("PRAGMA quick_check")]
    if check != ["ok"]:
        raise StoreError(f"{path} is damaged (SQLite's quick_check: "
                         f"{'; '.join(map(str, check[:3]))})")
    identity = None
    if "meta" in tables:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        with contextlib.suppress(KeyError, ValueError):
            identity = HistoryIdentity(str(meta["history_id"]), int(meta["generation"]))
    messages, rooms = db.execute("SELECT (SELECT COUNT(*) FROM messages), "
                                 "(SELECT COUNT(*) FROM rooms)").fetchone()
    return Summary(path, int(messages), int(rooms), identity)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to ``path``, and no -wal or -shm file that it made left behind
    once it is closed: SQLite makes them to read a WAL database (a restore keeps the one it
    replaces as one) and, read-only, cannot remove them. (A restore from
    `tsnetchat.db.before-restore-*` left both beside it: an operator's run, 2026-11-25.)"""
    sides = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
    made = [p for p in sides if not os.path.lexists(p)]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()
        wal = sides[0]
        if wal in made and (not wal.exists() or wal.stat().st_size == 0):
            for p in made:  # (a WAL made here holds nothing: a read-only one writes none)
                p.unlink(missing_ok=True)


def restore(src: Path, db: Path, state_dir: Path) -> Summary:
    """Replace the database ``db`` with the backup ``src`` (see the module doc). Raises
    StoreError (StateDirInUse while a server runs)."""
    inspect(src)  # before anything is touched
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        why = "it is a file, not a directory" if state_dir.is_file() else e.strerror
        raise StoreError(f"cannot restore into the state dir {state_dir}: {why}") from e
    lock = StateLock(state_dir, "restore")
    try:
        return _restore_locked(src, db, state_dir)
    finally:
        lock.release()


def _restore_locked(src: Path, db: Path, state_dir: Path) -> Summary:
    check_own_files(state_dir, (db,))  # (before SQLite opens them by name, as root)
    # The new database is made where only we may write: in the state dir, the service's
    # user could swap its name for a link between our creating and SQLite's opening it, and
    # have root write the backup over any file (an attacker over the lab, 2026-11-24). Beside
    # the state dir when that is ours and on the same file system (/var/lib/private for the
    # shipped unit), so one rename still puts it in place.
    work = _work_dir(state_dir)
    tmp = (work or state_dir) / (db.name + ".restoring")
    _remove(tmp)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with _read_only(src) as source:
            target = sqlite3.connect(tmp)
            try:
                source.backup(target)  # also reads a -wal the backup file may have beside it
            finally:
                target.close()
        above = _generation(db)
        store = Store(tmp)  # upgrades an older backup in place
        try:
            identity = store.next_generation(above)
            messages, rooms = store.counts()
        finally:
            store.close()
        fd = open_nofollow(tmp, os.O_RDONLY)
        try:
            give_to_server(fd, state_dir)
        finally:
            os.close(fd)
        replaced = None
        if db.exists():
            replaced = _aside_name(db)
            # Moved aside first, a restore killed between its two renames left no database,
            # and the next `serve` began an empty history without a word (an operator's run,
            # 2026-11-23). Now, once the old database's WAL is in its file, the old one is
            # kept under a second name and the new one takes its place in one rename: never
            # missing. A database whose WAL cannot be written back (damaged: the reason for
            # many a restore) still goes aside with its WAL first, as before; the new one
            # must never meet the old one's WAL.
            emptied = _checkpoint(db)
            if emptied:
                os.link(db, replaced)
            else:
                os.rename(db, replaced)
            for suffix in ("-wal", "-shm"):
                side = db.with_name(db.name + suffix)
                if side.exists():
                    os.rename(side, replaced.with_name(replaced.name + suffix))
        os.rename(tmp, db)
        _sync_dir(db.parent)
    except sqlite3.Error as e:
        raise StoreError(f"cannot restore {src}: {e}") from e
    except OSError as e:
        raise StoreError(f"cannot restore {src} to {db}: {e.strerror}") from e
    finally:
        _remove(tmp)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return Summary(db, messages, rooms, identity, replaced)


def _aside_name(db: Path) -> Path:
    """A name for the database a restore replaces, beside it, that nothing holds yet (two
    restores in one second failed with "File exists": a newcomer, 2026-11-25)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        name = db.with_name(f"{db.name}.before-restore-{stamp}" + (f"-{n}" if n else ""))
        if not any(os.path.lexists(p) for p in with_sides(name)):
            return name
    raise StoreError(f"cannot restore to {db}: every name for the database it replaces "
                     f"({db.name}.before-restore-{stamp}-N) is taken")


def _work_dir(state_dir: Path) -> Path | None:
    """A new directory only this user may enter, beside ``state_dir`` and on its file
    system, when its parent is this user's; else None (work in the state dir, as a user
    restoring their own does). Those an earlier restore of this state dir left (killed, it
    never reached its clean-up: a partial copy of the history each, 87 MB in an operator's
    run, 2026-11-25) are removed first; the caller holds the state dir's lock."""
    parent = state_dir.resolve().parent
    try:
        if parent.stat().st_uid != os.geteuid() or (
                parent.stat().st_dev != state_dir.stat().st_dev):
            return None
        prefix = f".tsnetchat-restore-{state_dir.resolve().name}-"
        for old in parent.iterdir():
            # (only names mkdtemp makes: 8 of its characters after the prefix; a directory
            # an operator named so by hand is not ours to remove)
            if (old.name.startswith(prefix) and _MKDTEMP.fullmatch(old.name[len(prefix):])
                    and not old.is_symlink() and old.is_dir()
                    and old.stat().st_uid == os.geteuid()):
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError:
        return None


def _checkpoint(db: Path) -> bool:
    """Move all that ``db``'s WAL holds into the database file and empty it; whether that
    was done (a damaged database may refuse)."""
    try:
        conn = sqlite3.connect(db, timeout=1.0)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    wal = db.with_name(db.name + "-wal")
    return busy == 0 and (not wal.exists() or wal.stat().st_size == 0)


def _generation(db: Path) -> int:
    """The generation of the database a restore replaces (0 if it has none we can read)."""
    try:
        summary = inspect(db)
    except StoreError:
        return 0
    return summary.identity.generation if summary.identity else 0


def _remove(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        p.unlink(missing_ok=True)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
