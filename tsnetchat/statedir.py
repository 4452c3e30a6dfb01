"""The state dir holds everyone's history and the token records: only the server's user may
enter it, and its files are only the server's to read.

``secure_state_dir`` creates the dir 0700, or makes an existing one 0700 (loudly: a warning
in the log) when group or others could enter it, and refuses (ConfigError) when it cannot.
The history database is created 0600 by ``store.Store`` (SQLite gives its -wal and -shm files
the database file's mode). Existing files that group or others can read are made 0600,
loudly.

``StateLock``: the server holds an exclusive ``flock`` on ``tsnetchat.lock`` in the state
dir for as long as it runs, and ``tsnetchat restore`` takes it too, so neither runs under the
other. The kernel drops the lock when its process ends, also by SIGKILL: a crashed server
never leaves a stale lock behind. (flock is not reliable on NFS; keep the state dir local.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError, StateDirInUse

log = logging.getLogger("tsnetchat.statedir")


# Root's admin commands (token issue, rotate-key, restore) work in a directory the server's
# user owns, and so can change while they run: a name there may be made a symbolic link to
# any file on the machine. Root therefore opens what it touches there with O_NOFOLLOW and
# changes it through the descriptor, never by name. (By name, `sudo tsnetchat token
# rotate-key` gave /etc/shadow to the service's user, and `sudo tsnetchat token list` made
# a root file 0600, through links the service's user had put in the state dir: an attacker
# over the lab, 2026-11-24.)
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
MAX_KEY_BYTES = 4096  # a signing key file (tsnetchat writes 64 hex characters)


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (ConfigError, naming it)."""
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; the state dir holds only the "
                              "server's own files: remove it") from None
        raise


def read_small(path: Path, limit: int) -> tuple[os.stat_result, bytes]:
    """The file at ``path``'s stat and at most ``limit`` of its bytes (none unless it is a
    regular file), opened without following a link (ConfigError, as open_nofollow) or
    blocking. (By name, a FIFO hung root's `token` commands, and a link to /dev/zero or a
    sparse 8 GB key tried to fill memory: attackers over the lab, 2026-11-24.)"""
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        return st, os.read(fd, limit) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)


def read_key(path: Path) -> bytes:
    """The signing key at ``path``, checked as the server takes it (and `tsnetchat doctor`
    says): a regular file, not a link, readable by its owner alone, 32 to MAX_KEY_BYTES
    bytes. Raises ConfigError saying what is wrong and what to do; FileNotFoundError when
    there is none."""
    st, raw = read_small(path, MAX_KEY_BYTES + 1)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the token signing key {path} is not a regular file; remove it "
                          "(the next start makes a new key, and every token must be issued "
                          "again)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"the token signing key {path} is readable by others (mode {mode:04o}); anyone "
            f"who reads it can mint tokens. Fix it with `chmod 600 {path}` (and consider "
            "rotating it by deleting it, which invalidates every issued token).")
    key = raw.strip()
    if len(key) > MAX_KEY_BYTES:
        raise ConfigError(f"the token signing key {path} is over {MAX_KEY_BYTES} bytes: not one "
                          "tsnetchat wrote; remove it (and issue the tokens again)")
    if len(key) < 32:
        raise ConfigError(f"the token signing key {path} is too short (under 32 bytes); "
                          "`tsnetchat token rotate-key` writes a new one (every token is then "
                          "issued again)")
    return key


def give_to_server(fd: int, state_dir: Path) -> None:
    """The file open as ``fd``, which root made for the state dir, becomes the server's (the
    dir's owner: the unit's DynamicUser), or the server could not read it.
    (`sudo tsnetchat token rotate-key` left a key only root could read: the server kept the
    old key, and its revocation checks stopped; an operator's run, 2026-11-23.)"""
    st = state_dir.stat()
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        os.fchown(fd, st.st_uid, st.st_gid)


def with_sides(db: Path) -> tuple[Path, Path, Path]:
    """``db`` and the -wal and -shm files SQLite keeps beside it."""
    return db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def check_own_files(state_dir: Path, databases: Iterable[Path]) -> None:
    """Refuse (ConfigError) a database among ``databases``, or its -wal or -shm, that is not
    a plain file of the state dir's own: a link, another kind of file, or a file with other
    names (a hard link: root's SQLite chowned such a -wal to the service's user and wrote
    into it, whatever file it was; an attacker over the lab, 2026-11-24). Before root opens
    one by name, as SQLite does."""
    owner = os.stat(state_dir).st_uid
    for db in databases:
        for p in with_sides(db):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            why = ("is a symbolic link" if stat.S_ISLNK(st.st_mode) else
                   "is not a regular file" if not stat.S_ISREG(st.st_mode) else
                   f"has {st.st_nlink - 1} other name(s) (a hard link)" if st.st_nlink != 1
                   else "belongs to another user" if st.st_uid not in (owner, 0) else "")
            if why:
                raise ConfigError(f"{p} {why}; the state dir holds only the server's own "
                                  "files: remove it (nothing was opened)")


def secure_state_dir(state_dir: Path, files: Iterable[Path] = ()) -> None:
    """Make ``state_dir`` private; make the SQLite databases of ``files`` that exist, and
    their -wal/-shm files, 0600; refuse (ConfigError) any of them that is not a plain file
    of its own (``check_own_files``). (The signing key is not fixed but refused when open:
    see auth.load_or_create_key.)"""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # (the dir itself may be a link: systemd's DynamicUser makes /var/lib/tsnetchat one
        # to /var/lib/private/tsnetchat, in a directory only root may change)
        _private(state_dir, 0o700, "state dir", follow=True)
        check_own_files(state_dir, files)
        for p in (p for f in files for p in with_sides(f) if os.path.lexists(p)):
            _private(p, 0o600, "file")
    except ConfigError:
        raise
    except (FileExistsError, NotADirectoryError):  # ("[Errno 17] File exists": a newcomer)
        raise ConfigError(f"the state dir {state_dir} is not a directory (a file of that "
                          "name, or on its path, is in the way): give --state-dir a "
                          "directory") from None
    except OSError as e:
        raise ConfigError(f"cannot prepare the state dir {state_dir}: {e}") from None


def _private(path: Path, mode: int, what: str, *, follow: bool = False) -> None:
    fd = (os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if follow else
          open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK))
    try:
        now = stat.S_IMODE(os.fstat(fd).st_mode)
        if not now & 0o077:
            return
        try:
            os.fchmod(fd, mode)
        except OSError as e:
            raise ConfigError(
                f"the {what} {path} is open to other users (mode {now:04o}) and cannot be made "
                f"private ({e.strerror}); run `chmod {mode:o} {path}` as its owner") from None
    finally:
        os.close(fd)
    log.warning("the %s %s was open to other users (mode %04o); made it %04o", what, path, now,
                mode)


LOCK_NAME = "tsnetchat.lock"


def full_disk_hint(path: Path) -> str:
    """A hint for an error while writing ``path``: the disk is full (SQLite says only "disk
    I/O error" when it cannot make its -shm file); "" when it is not."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    if free >= 1024 * 1024:
        return ""
    return (f" (the disk holding {path.parent} has {free} bytes free: free some space, "
            "then start again)")


def read_only_hint(state_dir: Path) -> str:
    """Why SQLite cannot open a database in ``state_dir`` when its file system is read-only
    (it said only "unable to open database file": an operator's run, 2026-11-25); "" when it
    is not."""
    try:
        if not os.statvfs(state_dir).f_flag & os.ST_RDONLY:
            return ""
    except OSError:
        return ""
    return (f" ({state_dir} is on a read-only file system (`findmnt -T {state_dir}`; a disk "
            "error can do that: `dmesg`), and SQLite cannot open a WAL database there: it "
            "must write the -shm file beside it. Remount it read-write; only to read it (token "
            "list; a backup, if a server killed there left its -shm file), copy the state dir "
            "to a writable disk with `cp -a` (nothing can write it meanwhile) and give that "
            "copy as --state-dir)")


class StateLock:
    """The state dir's lock (see the module doc), held until ``release`` (or the process
    ends). ``what`` ("server", "restore") is written into the file for the next one's error
    message."""

    def __init__(self, state_dir: Path, what: str) -> None:
        path = state_dir / LOCK_NAME
        try:
            self._fd: int | None = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK)
        except OSError as e:
            # (a read-only file system said only that, with no word of what to do; an
            # operator's run, 2026-11-25)
            hint = (f" ({state_dir} is on a read-only file system (`findmnt -T {state_dir}`; "
                    "a disk error can do that: `dmesg`): remount it read-write)"
                    if e.errno == errno.EROFS else "")
            raise ConfigError(f"cannot open the lock file {path}: {e.strerror}{hint}") from None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # (a FIFO, a hard link)
            self.release()
            raise ConfigError(f"the lock file {path} is not a plain file of its own: remove it")
        # (made by root's restore on a new machine, it kept the server from starting)
        give_to_server(self._fd, state_dir)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip()
            self.release()
            raise StateDirInUse(
                f"the state dir {state_dir} is in use by another tsnetchat process "
                f"({holder or 'unknown'}); stop it first (systemctl stop tsnetchat)") from None
        os.ftruncate(self._fd, 0)
        # Only words for the next one's error: on a full disk (ENOSPC here was "unexpected
        # OSError ... a bug" at a first start; an operator's run, 2026-11-24) the lock is held
        # without them, and opening the database says what is wrong.
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, f"{what}, pid {os.getpid()}".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # (closing drops the flock)
            self._fd = None


def running_server(state_dir: Path) -> int | None:
    """The pid of the server that holds ``state_dir``'s lock now; None if no server does.
    Only looks: the kernel's table of flocks (/proc/locks) for the lock file's inode, and
    the file's "server, pid N". (Taking the lock to find out, even for a moment, could make
    a server starting just then refuse to start; the file's text alone outlives the server,
    and its pid may be reused.) Linux only; elsewhere None."""
    path = state_dir / LOCK_NAME
    try:
        st, text = read_small(path, 200)
        what, _, pid = text.decode("utf-8", "replace").partition(", pid ")
        table = Path("/proc/locks").read_text()
    except (OSError, ConfigError):
        return None
    if what.strip() != "server" or not pid.strip().isdigit():
        return None
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        f = line.split()
        if len(f) > 5 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(st.st_ino):
            return int(pid)
    return None
