"""The state dir holds everyone's history and the token records: only the server's user may
enter it, and its files are only the server's to read.

``secure_state_dir`` creates the dir 0700, or makes an existing one 0700 (loudly: a warning
in the log) when group or others could enter it, and refuses (ConfigError) when it cannot.
The history database is created 0600 before SQLite opens it: SQLite gives its -wal and -shm
files the database file's mode. Existing files that group or others can read are made 0600,
loudly.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("tsnetchat.statedir")


def secure_state_dir(state_dir: Path, files: Iterable[Path] = ()) -> None:
    """Make ``state_dir`` private; create each SQLite database of ``files`` (empty, 0600)
    unless it exists; make existing ones and their -wal/-shm files 0600. (The signing key is
    not fixed but refused when open: see auth.load_or_create_key.)"""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private(state_dir, 0o700, "state dir")
        for f in files:
            os.close(os.open(f, os.O_WRONLY | os.O_CREAT, 0o600))
            for p in (f, f.with_name(f.name + "-wal"), f.with_name(f.name + "-shm")):
                if p.exists():
                    _private(p, 0o600, "file")
    except OSError as e:
        raise ConfigError(f"cannot prepare the state dir {state_dir}: {e}") from None


def _private(path: Path, mode: int, what: str) -> None:
    now = stat.S_IMODE(path.stat().st_mode)
    if not now & 0o077:
        return
    try:
        path.chmod(mode)
    except OSError as e:
        raise ConfigError(
            f"the {what} {path} is open to other users (mode {now:04o}) and cannot be made "
            f"private ({e.strerror}); run `chmod {mode:o} {path}` as its owner") from None
    log.warning("the %s %s was open to other users (mode %04o); made it %04o", what, path, now,
                mode)
