"""Durable history and token records in SQLite (WAL).

One process writes (the server); the CLI may read and write tokens/revocations concurrently
(WAL + busy timeout make that safe). Calls are synchronous and short; the server calls them
from its event loop, which keeps message ids and commit order identical.

Checkpoints (copying the WAL back into the database file, with an fsync) run in a thread of
their own on a second connection, every ``CHECKPOINT_EVERY`` appends. SQLite's automatic
checkpoint runs inside whichever commit crosses its threshold, on the event loop, and that
commit took milliseconds: it was the p99 of delivery at a moderate rate (bench/README.md).
The automatic checkpoint stays on as the backstop that keeps the WAL bounded: under a
continuous stream of commits a checkpoint from another connection never catches up, so the
WAL would never restart (it grew to 650 MB in a test). Then it finds most pages already
copied and costs about the fsync alone.

Group commit: ``append_later`` joins an open transaction and calls back once it ends, so a
busy server pays one commit for many messages (a commit is most of an append's cost). The
caller decides when to ``commit()``; any other call commits first, so reads never see an
uncommitted row and callbacks run in append order.

Guarantees:

* ``append`` returns, and ``append_later`` calls back without an error, only after the row
  is committed. With ``fsync=False`` (WAL,
  synchronous=NORMAL) a committed message survives a crashed or SIGKILLed process; with
  ``fsync=True`` (synchronous=FULL) it also survives power loss.
* ids are strictly increasing per room, starting at 1, never reused (also after pruning).
  The one exception is an id whose group commit rolled back: nobody saw it or its ack.
* A repeated (room, sender, client_msg_id) returns the original message with
  ``duplicate=True`` and writes nothing.

sqlite3 errors are translated to StoreError here and nowhere else.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    login TEXT NOT NULL,
    display_name TEXT NOT NULL,
    node TEXT NOT NULL,
    kind INTEGER NOT NULL,
    text TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
-- A plain index: the resend check must not scan the room. (A partial index WHERE
-- client_msg_id != '' was not chosen by the planner for a bound parameter; dropped below.)
DROP INDEX IF EXISTS messages_dedup;
CREATE INDEX IF NOT EXISTS messages_by_sender_key ON messages (room, login, client_msg_id);
CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts_ms);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    rooms TEXT NOT NULL,
    admin INTEGER NOT NULL,
    iat INTEGER NOT NULL,
    exp INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    jti TEXT NOT NULL UNIQUE,
    at INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Sender:
    login: str
    display_name: str
    node: str


@dataclass(frozen=True)
class StoredMessage:
    room: str
    id: int
    ts_ms: int
    sender: Sender
    kind: int
    text: str
    client_msg_id: str


@dataclass(frozen=True)
class TokenRecord:
    jti: str
    sub: str
    rooms: str
    admin: bool
    iat: int
    exp: int
    revoked_at: int | None


# A deferred append's callback: (message, duplicate, error or None).
Settled = Callable[["StoredMessage", bool, "StoreError | None"], None]

_COLS = "room, id, ts_ms, login, display_name, node, kind, text, client_msg_id"


def _row(r: tuple[object, ...]) -> StoredMessage:
    return StoredMessage(room=str(r[0]), id=int(r[1]), ts_ms=int(r[2]),  # type: ignore[call-overload]
                         sender=Sender(str(r[3]), str(r[4]), str(r[5])),
                         kind=int(r[6]), text=str(r[7]), client_msg_id=str(r[8]))  # type: ignore[call-overload]


class _Checkpointer(threading.Thread):
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection each time it is asked.
    PASSIVE never blocks the writer; SQLite restarts the WAL from its beginning once a
    checkpoint has caught up. (The last connection to close checkpoints whatever is left.)"""

    def __init__(self, path: Path) -> None:
        super().__init__(name="tsnetchat-checkpoint", daemon=True)
        self.path = path
        self._due = threading.Event()
        self._stopping = False
        self.runs = 0  # completed checkpoints (the tests read it)

    def request(self) -> None:
        self._due.set()

    def stop(self) -> None:
        self._stopping = True
        self._due.set()
        self.join()

    def run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            while not self._stopping:
                self._due.wait()
                self._due.clear()
                if self._stopping:
                    break
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error:
                    pass  # busy or locked: the next round retries; the WAL only grows meanwhile
        finally:
            db.close()


class Store:
    CHECKPOINT_EVERY = 100  # appends between background checkpoints (SQLite's: ~1000 pages)

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(SCHEMA)
            # rooms.last_id is written when a room is created and before pruning; between
            # the two the newest message holds the room's high-water mark. One row per append
            # fewer is one page less in every commit.
            self._last = dict(self._db.execute(
                "SELECT name, MAX(last_id, COALESCE((SELECT MAX(id) FROM messages "
                "WHERE room = rooms.name), 0)) FROM rooms").fetchall())
        except sqlite3.Error as e:
            raise StoreError(f"cannot open history database {path}: {e}") from e
        self._appends = 0
        self.checkpointer: _Checkpointer | None = None  # started by the first busy writer
        # The open group-commit transaction: _last as it was when it began (restored if it
        # rolls back), and the appends waiting for it to end.
        self._open: dict[str, int] | None = None
        self._waiting: list[tuple[StoredMessage, bool, Settled]] = []

    def close(self) -> None:
        self.commit()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        try:
            self._db.close()
        except sqlite3.Error as e:
            raise StoreError(f"closing {self.path}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"history database error: {e}") from e

    def _q(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"history database error: {e}") from e

    # messages -----------------------------------------------------------------------

    def append(self, room: str, sender: Sender, kind: int, text: str, client_msg_id: str = "",
               *, now_ms: int | None = None) -> tuple[StoredMessage, bool]:
        """Store a message, commit it, and return it with its new id (see the module doc)."""
        self.commit()
        if room in self._last:
            return self._insert(room, sender, kind, text, client_msg_id, now_ms)  # one statement
        try:
            with self._tx():
                return self._insert(room, sender, kind, text, client_msg_id, now_ms)
        except StoreError:
            self._last.pop(room, None)
            raise

    def append_later(self, room: str, sender: Sender, kind: int, text: str,
                     client_msg_id: str, then: Settled) -> None:
        """Store a message in the open transaction (beginning one). ``then(message,
        duplicate, None)`` runs when it commits, ``then(message, duplicate, error)`` if it
        rolls back. Raises StoreError (and rolls back the others) if the row cannot be
        written at all."""
        if self._open is None:
            self._q("BEGIN IMMEDIATE")
            self._open = dict(self._last)
        try:
            msg, dup = self._insert(room, sender, kind, text, client_msg_id, None)
        except StoreError as e:
            self._end(e)
            raise
        self._waiting.append((msg, dup, then))

    @property
    def waiting(self) -> int:
        """Appends waiting for ``commit()``."""
        return len(self._waiting)

    def commit(self) -> None:
        """End the open transaction, if any: commit it (or roll it back when the commit
        fails) and run the waiting callbacks in append order."""
        if self._open is None:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            self._end(StoreError(f"history database error: {e}"))
        else:
            self._end(None)

    def _end(self, error: StoreError | None) -> None:
        if error is not None:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self._db.execute("ROLLBACK")
            assert self._open is not None
            self._last = self._open
        self._open = None
        waiting, self._waiting = self._waiting, []
        for msg, dup, then in waiting:
            then(msg, dup, error)

    def _insert(self, room: str, sender: Sender, kind: int, text: str, client_msg_id: str,
                now_ms: int | None) -> tuple[StoredMessage, bool]:
        if client_msg_id:
            # INDEXED BY: without statistics the planner picks the primary key and scans the
            # whole room, which made every send O(history).
            rows = self._q(f"SELECT {_COLS} FROM messages INDEXED BY messages_by_sender_key "
                           "WHERE room=? AND login=? AND client_msg_id=?",
                           (room, sender.login, client_msg_id))
            if rows:
                return _row(rows[0]), True
        ts = int(time.time() * 1000) if now_ms is None else now_ms
        new_id = self._last.get(room, 0) + 1
        if room not in self._last:
            self._q("INSERT INTO rooms (name, last_id) VALUES (?, ?) ON CONFLICT(name) "
                    "DO UPDATE SET last_id=excluded.last_id", (room, new_id))
        self._q(f"INSERT INTO messages ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (room, new_id, ts, sender.login, sender.display_name, sender.node, kind, text,
                 client_msg_id))
        self._last[room] = new_id
        self._appends += 1
        if self._appends % self.CHECKPOINT_EVERY == 0:
            if self.checkpointer is None:
                self.checkpointer = _Checkpointer(self.path)
                self.checkpointer.start()
            self.checkpointer.request()
        return StoredMessage(room, new_id, ts, sender, kind, text, client_msg_id), False

    def last_id(self, room: str) -> int:
        self.commit()
        return int(self._last.get(room, 0))

    def rooms(self) -> dict[str, int]:
        self.commit()
        return dict(self._last)

    def after(self, room: str, after_id: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages with id > after_id, ascending."""
        self.commit()
        return [_row(r) for r in self._q(
            f"SELECT {_COLS} FROM messages WHERE room=? AND id>? ORDER BY id LIMIT ?",
            (room, after_id, limit))]

    def before(self, room: str, before_id: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` newest messages with id < before_id, returned ascending."""
        self.commit()
        rows = self._q(f"SELECT {_COLS} FROM messages WHERE room=? AND id<? ORDER BY id DESC "
                       "LIMIT ?", (room, before_id, limit))
        return [_row(r) for r in reversed(rows)]

    def latest(self, room: str, n: int) -> list[StoredMessage]:
        return self.before(room, 2**62, n) if n > 0 else []

    def prune(self, *, keep_count: int, keep_days: float, now: float | None = None) -> int:
        """Apply retention; returns the number of messages deleted. ids are not reused."""
        self.commit()
        deleted = 0
        with self._tx() as db:
            # Keep the high-water marks: pruning may delete a room's newest message.
            db.executemany("UPDATE rooms SET last_id=? WHERE name=?",
                           [(last, room) for room, last in self._last.items()])
            if keep_count > 0:
                for room, last in self._last.items():
                    deleted += db.execute("DELETE FROM messages WHERE room=? AND id<=?",
                                          (room, last - keep_count)).rowcount
            if keep_days > 0:
                cutoff = int(((time.time() if now is None else now) - keep_days * 86400) * 1000)
                deleted += db.execute("DELETE FROM messages WHERE ts_ms<?", (cutoff,)).rowcount
        return deleted

    # tokens -------------------------------------------------------------------------

    def record_token(self, row: dict[str, object]) -> None:
        self.commit()
        with self._tx() as db:
            db.execute("INSERT INTO tokens (jti, sub, rooms, admin, iat, exp) "
                       "VALUES (:jti, :sub, :rooms, :admin, :iat, :exp)", row)

    def renew_token(self, row: dict[str, object]) -> None:
        """Record a renewed token: same id, new rights and lifetime (inserted if unknown)."""
        self.commit()
        with self._tx() as db:
            db.execute("INSERT INTO tokens (jti, sub, rooms, admin, iat, exp) "
                       "VALUES (:jti, :sub, :rooms, :admin, :iat, :exp) ON CONFLICT (jti) DO "
                       "UPDATE SET rooms=excluded.rooms, admin=excluded.admin, iat=excluded.iat, "
                       "exp=excluded.exp", row)

    def list_tokens(self) -> list[TokenRecord]:
        self.commit()
        rows = self._q("SELECT t.jti, t.sub, t.rooms, t.admin, t.iat, t.exp, r.at FROM tokens t "
                       "LEFT JOIN revocations r ON r.jti = t.jti ORDER BY t.iat")
        return [TokenRecord(str(r[0]), str(r[1]), str(r[2]), bool(r[3]), int(r[4]),  # type: ignore[call-overload]
                            int(r[5]), None if r[6] is None else int(r[6]))  # type: ignore[call-overload]
                for r in rows]

    def revoke(self, jti: str) -> bool:
        """Revoke a token id (known or not). Returns False if it was already revoked."""
        self.commit()
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO revocations (jti, at) VALUES (?, ?)",
                             (jti, int(time.time())))
        return cur.rowcount > 0

    def revocations_since(self, seq: int) -> tuple[list[str], int]:
        self.commit()
        rows = self._q("SELECT seq, jti FROM revocations WHERE seq>? ORDER BY seq", (seq,))
        if not rows:
            return [], seq
        return [str(r[1]) for r in rows], int(rows[-1][0])  # type: ignore[call-overload]
