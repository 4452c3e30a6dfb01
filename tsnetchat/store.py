"""Durable history and token records in SQLite (WAL).

Two layers:

* ``Store``: one connection, synchronous. The CLI uses it (tokens), tests use it, and the
  server uses it only from threads of its own, never from the event loop.
* ``SqliteHistory``: the server's history (``ledger.History``). A writer thread owns one
  ``Store`` and commits messages in groups: whatever was submitted while the previous group
  was being written goes into the next transaction, so a busy server pays one commit for
  many messages and a quiet one commits each message at once. When the event loop is
  saturated (``linger``) a message waits up to a couple of milliseconds for company before
  the writer is woken: an idle writer would otherwise commit every two or three messages
  apart. Results come back to the event loop in one callback per group, in submission order
  (but for refusals of messages still queued past their deadline: see Guarantees).
  Reads run on reader threads, each with its own connection: a WAL reader is never blocked by
  a writer, ours or another process's. So nothing here makes the event loop wait on the
  disk (bench/README.md).

Guarantees:

* A message is reported stored (``Written``) only after its transaction committed. With
  ``fsync=False`` (WAL, synchronous=NORMAL) it survives a crashed or SIGKILLed process; with
  ``fsync=True`` (synchronous=FULL) also power loss.
* ids are strictly increasing per room, starting at 1, never reused (also after pruning).
  The one exception is an id whose group rolled back: nobody saw it or its ack.
* A repeated (room, sender login, client_msg_id) returns the original message with
  ``duplicate=True`` and writes nothing.
* When the database stays locked by another process (or the disk does not answer) for
  ``wait`` seconds, every message waiting for it is refused with a StoreError saying it was
  not stored; the next ones are tried afresh. A message still queued at its deadline is
  refused so from the loop (``_overdue``) while the writer is held inside a write (a hung
  disk), before the messages in that write are settled. Those in the write are answered
  ``Unconfirmed`` (it may still appear; the same client_msg_id again is stored once)
  IN_WRITE_GRACE after their deadline, and settled a second time, as Written or not, when
  the write returns: not stored is not said of a message the disk may yet commit.

Schema versions (``PRAGMA user_version``) and forward migrations are below; a database
written by a newer tsnetchat is refused rather than guessed at. sqlite3 errors are
translated to StoreError here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import unicodedata
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .errors import (
    InvalidInput,
    PermissionDenied,
    StoreDamaged,
    StoreError,
    TsnetchatError,
    Unconfirmed,
)
from .loop import name_thread
from .statedir import full_disk_hint, read_only_hint
from .throttle import LogLimiter

log = logging.getLogger("tsnetchat.store")

T = TypeVar("T")

# Version 1 (round 2). Messages are a rowid table in arrival order: appends always go to the
# end of the b-tree, so its pages are full. Round 1's WITHOUT ROWID table kept rows of more
# than ~1,000 bytes in an overflow page each (4,783 bytes on disk for an average 2,455-byte
# text, measured), and 4 KB pages hold one 2,100-byte row (1.99x). 16 KB pages hold 900-4,096
# byte texts within 1.36x (tests/test_unit_store.py measures it). Rooms and senders are
# stored once and referred to by number.
SCHEMA_VERSION = 4
PAGE_SIZE = 16384
# After a checkpoint has caught up, SQLite truncates the WAL to this size (without it the file
# keeps the size of its largest burst forever; tests/test_unit_store.py measures it). Well
# above what one checkpoint cycle writes: 100 single-message commits (CHECKPOINT_EVERY) put
# 4.7 MB in the WAL (16 KB pages, about three per commit; measured 2026-11-22), and a limit
# of 4 MB truncated and regrew the file every cycle: p99 at 1,000 msg/s into 9 subscribers
# 4.6 ms against 2.9 ms without it (bench/compare.py, alternated, 5 rounds).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# How search splits text into words: the index's, and the ranker's for small rooms (search).
TOKENIZE = "unicode61 remove_diacritics 2"
SCHEMA = """
CREATE TABLE rooms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- The high-water mark, written when the room is created and before pruning; in between
    -- the newest message holds it (one row fewer to write per commit).
    last_id INTEGER NOT NULL
);
CREATE TABLE senders (
    id INTEGER PRIMARY KEY,
    login TEXT NOT NULL,
    display_name TEXT NOT NULL,
    node TEXT NOT NULL,
    UNIQUE (login, display_name, node)
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    room INTEGER NOT NULL,
    id INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    text TEXT NOT NULL,
    client_msg_id TEXT NOT NULL
);
CREATE UNIQUE INDEX messages_by_room ON messages (room, id);
-- The resend check. Queries repeat the WHERE term literally so the planner may use it.
CREATE INDEX messages_resend ON messages (room, client_msg_id) WHERE client_msg_id != '';
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


def _script(db: sqlite3.Connection, sql: str) -> None:
    """Run several statements inside the caller's transaction (``executescript`` would commit
    it first)."""
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            db.execute(buf)
            buf = ""


def _from_round_1(db: sqlite3.Connection) -> None:
    """Version 0 -> 1: round 1's tables (messages keyed by room name WITHOUT ROWID, sender
    columns in every row) into the version 1 layout. ids, timestamps, resend keys, the rooms'
    high-water marks, tokens and revocations are kept."""
    _script(db, """
        ALTER TABLE messages RENAME TO messages_r1;
        ALTER TABLE rooms RENAME TO rooms_r1;
        DROP INDEX IF EXISTS messages_by_sender_key;
        DROP INDEX IF EXISTS messages_ts;
        DROP INDEX IF EXISTS messages_dedup;
    """)
    _script(db, SCHEMA)
    _script(db, """
        INSERT INTO rooms (name, last_id)
            SELECT name, MAX(last_id) FROM (
                SELECT name, last_id FROM rooms_r1
                UNION ALL SELECT room, MAX(id) FROM messages_r1 GROUP BY room)
            GROUP BY name ORDER BY name;
        INSERT INTO senders (login, display_name, node)
            SELECT DISTINCT login, display_name, node FROM messages_r1;
        INSERT INTO messages (room, id, ts_ms, sender, kind, text, client_msg_id)
            SELECT r.id, m.id, m.ts_ms, s.id, m.kind, m.text, m.client_msg_id
            FROM messages_r1 m JOIN rooms r ON r.name = m.room
            JOIN senders s ON s.login = m.login AND s.display_name = m.display_name
                AND s.node = m.node
            ORDER BY m.ts_ms, r.id, m.id;
        DROP TABLE messages_r1;
        DROP TABLE rooms_r1;
    """)


# Version 2 (issue 15): what a team uses every day. Edits, deletions and topics are rows of
# ``messages`` too (kinds 3-5, ``target`` naming the message they change), so they replay on
# resume in id order like everything else; an edit also rewrites its target's text, and a
# deletion blanks the target and its edits (``deleted_by`` is the tombstone). The full-text
# index is external-content FTS5 over ``messages.text``, kept in step by triggers (inserts,
# edits, deletions and retention alike); only text and /me rows are indexed.
SCHEMA_V2 = """
ALTER TABLE messages ADD COLUMN target INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN deleted_by TEXT;
ALTER TABLE messages ADD COLUMN edited_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_target ON messages (room, target) WHERE target != 0;
CREATE TABLE mentions (
    login TEXT NOT NULL,
    room INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (login, room, id)
) WITHOUT ROWID;
CREATE INDEX mentions_by_message ON mentions (room, id);
CREATE TABLE read_marks (
    login TEXT NOT NULL,
    room TEXT NOT NULL,
    last_read INTEGER NOT NULL,
    PRIMARY KEY (login, room)
) WITHOUT ROWID;
CREATE TABLE topics (
    room TEXT PRIMARY KEY,
    id INTEGER NOT NULL,
    text TEXT NOT NULL,
    login TEXT NOT NULL,
    display_name TEXT NOT NULL,
    node TEXT NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE TABLE private_rooms (
    name TEXT PRIMARY KEY,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE room_members (
    room TEXT NOT NULL,
    login TEXT NOT NULL,
    added_by TEXT NOT NULL,
    PRIMARY KEY (room, login)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE messages_fts USING fts5 (
    text, content='messages', content_rowid='seq', tokenize='""" + TOKENIZE + """');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages WHEN new.kind IN (1, 2) BEGIN
    INSERT INTO messages_fts (rowid, text) VALUES (new.seq, new.text);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages WHEN old.kind IN (1, 2) BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.seq, old.text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages
        WHEN old.kind IN (1, 2) BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.seq, old.text);
    INSERT INTO messages_fts (rowid, text) VALUES (new.seq, new.text);
END;
"""


def _team_features(db: sqlite3.Connection) -> None:
    """Version 1 -> 2: the tables above; messages already stored are indexed for search."""
    _script(db, SCHEMA_V2)
    db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")


def _add_identity(db: sqlite3.Connection) -> None:
    """Version 2 -> 3: the history's identity (a random id, made once, kept by backups) and
    its generation (raised by every restore). A client that resumes in a different identity
    or generation starts over instead of trusting its message ids (``HistoryIdentity``)."""
    _script(db, """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
    """)
    db.execute("INSERT INTO meta (key, value) VALUES ('history_id', ?), ('generation', '1')",
               (uuid.uuid4().hex,))


# Version 3 -> 4: messages are indexed for search by the writer in batches
# (``Store.index_pending``), not by a trigger inside each send's transaction. Measured
# 2026-11-22 (make bench fan-out rows, alternated with the code before issue 15): with the
# insert trigger, 1,000 msg/s into 9 subscribers had p99 11.5 ms against 3.0, and saturation
# into 100 subscribers fell from 853,000 to 606,000 deliveries/s: every small commit wrote a
# new index segment and merged. Edits, deletions and retention still reach the index by
# trigger, for rows it already holds (``fts_indexed`` is the newest seq indexed); a row
# indexed later is indexed with its text as it is then.
_FTS_INDEXED = "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed')"
SCHEMA_V4 = f"""
DROP TRIGGER IF EXISTS messages_fts_insert;
DROP TRIGGER IF EXISTS messages_fts_delete;
DROP TRIGGER IF EXISTS messages_fts_update;
INSERT INTO meta (key, value) VALUES ('fts_indexed', (SELECT COALESCE(MAX(seq), 0) FROM messages));
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
        WHEN old.kind IN (1, 2) AND old.seq <= {_FTS_INDEXED} BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.seq, old.text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages
        WHEN old.kind IN (1, 2) AND old.seq <= {_FTS_INDEXED} BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.seq, old.text);
    INSERT INTO messages_fts (rowid, text) VALUES (new.seq, new.text);
END;
"""


def _index_in_batches(db: sqlite3.Connection) -> None:
    _script(db, SCHEMA_V4)


# Each step takes the database from the version before it to its own, inside one transaction.
# A fresh database gets SCHEMA (version 1) and then every later step.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _from_round_1,
                                                               2: _team_features,
                                                               3: _add_identity,
                                                               4: _index_in_batches}

# Message kinds (tsnetchat.v1.MessageKind): kept in step with the proto.
TEXT, ACTION, EDIT, DELETE, TOPIC = 1, 2, 3, 4, 5


class HistoryIdentity(NamedTuple):
    """Which history a message id belongs to. ``history_id`` is made with the database and
    kept by backups; ``generation`` is raised by every restore. Ids from another identity or
    generation may name other messages (a restored copy reuses the ids issued after it)."""

    history_id: str
    generation: int


@dataclass(frozen=True)
class Sender:
    login: str
    display_name: str
    node: str


@dataclass(frozen=True)
class Draft:
    """A message as a member sent it, not yet stored (no id, no timestamp)."""

    room: str
    sender: Sender
    kind: int
    text: str
    client_msg_id: str = ""
    target: int = 0  # EDIT and DELETE: the message they change
    mentions: tuple[str, ...] = ()  # logins the text mentions (ledger: rooms.Mentions)
    # EDIT and DELETE are decided in the same transaction that writes them: the author
    # within ``edit_window_ms`` of sending (0: any time), or for DELETE an admin.
    admin: bool = False
    edit_window_ms: int = 0


@dataclass(frozen=True)
class StoredMessage:
    room: str
    id: int
    ts_ms: int
    sender: Sender
    kind: int
    text: str
    client_msg_id: str
    target: int = 0
    mentions: tuple[str, ...] = ()
    deleted_by: str = ""  # a tombstone: deleted by this login, text gone
    edited_ms: int = 0


@dataclass(frozen=True)
class Imported:
    """A message numbered elsewhere, as ``Store.import_messages`` applies it (cluster mode:
    one of the stream). ``seq`` is its position there (0: unknown). An EDIT or DELETE is
    decided with ``admin`` and ``edit_window_ms`` as Draft says, at its own ``ts_ms``, so
    every copy decides it alike. A DELETE's ``erased`` are the rows it blanks (its target
    and the target's edits), text left out: a copy that never had them (their text was
    erased from the source before it got there) gets them as tombstones; ``erase`` their
    positions in the source, still to be erased there once the DELETE is applied
    (``to_erase``)."""

    message: StoredMessage
    seq: int = 0
    admin: bool = False
    edit_window_ms: int = 0
    erased: tuple[StoredMessage, ...] = ()
    erase: tuple[int, ...] = ()
    # An EDIT says whom its new text mentions, and they replace its target's (the event
    # itself, as read back, mentions no one); one from a server older than that
    # (2026-11-24) says nothing: None, and the target keeps the mentions it had (a copy
    # rebuilt from the stream lost them).
    edit_mentions: tuple[str, ...] | None = ()


@dataclass(frozen=True)
class Topic:
    room: str
    id: int
    text: str
    set_by: Sender
    ts_ms: int


@dataclass(frozen=True)
class RoomState:
    """One person's view of a room: read position and what is unread after it."""

    room: str
    last_read: int
    unread: int
    mentions: int


class Refused(NamedTuple):
    """A draft the history decided not to write (an edit of somebody else's message, ...):
    nothing was stored; ``error`` says why (InvalidInput or PermissionDenied)."""

    error: TsnetchatError


class Written(NamedTuple):
    """A draft once committed: the stored message, and whether it was a resend of one
    stored before (then nothing new was written)."""

    message: StoredMessage
    duplicate: bool


def resent(d: Draft, found: StoredMessage) -> Written | Refused:
    """What ``d`` is, whose client_msg_id names ``found`` (its sender's, in its room): a
    resend of it (the same kind and target), answered with it as stored; or another message
    under an id already used, refused. (An edit sent under the id of the message it edits
    was answered as that message, and never applied; a mutation test, 2026-11-25.)"""
    if found.kind == d.kind and found.target == d.target:
        return Written(found, True)
    return Refused(InvalidInput(
        f"client_msg_id {d.client_msg_id!r} already names another of your messages here (id "
        f"{found.id}); give each message an id of its own"))


@dataclass(frozen=True)
class TokenRecord:
    jti: str
    sub: str
    rooms: str
    admin: bool
    iat: int
    exp: int
    revoked_at: int | None


# Every query that returns messages selects these columns (read by ``_row``), the mentions
# too, so a message read back carries the same ``mentions`` it was delivered with live.
_COLUMNS = ("SELECT r.name, m.id, m.ts_ms, s.login, s.display_name, s.node, m.kind, m.text, "
            "m.client_msg_id, m.target, m.deleted_by, m.edited_ms, "
            "(SELECT group_concat(mx.login, char(10)) FROM mentions mx "
            "WHERE mx.room = m.room AND mx.id = m.id) ")
_FROM = "FROM messages m JOIN rooms r ON r.id = m.room JOIN senders s ON s.id = m.sender "
_SELECT = _COLUMNS + _FROM


def _row(r: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(room=r[0], id=r[1], ts_ms=r[2], sender=Sender(r[3], r[4], r[5]),
                         kind=r[6], text=r[7], client_msg_id=r[8], target=r[9],
                         deleted_by=r[10] or "", edited_ms=r[11],
                         mentions=tuple(sorted(r[12].split("\n"))) if r[12] else ())


# Ranked search orders only the newest this many matches by bm25 (Store.search). Measured
# 2026-11-22 on 1,000,000 messages (bench/search.py): bm25 over every match of a word in 10%
# of messages took 157-188 ms; over the newest 1,000, 5 ms (14 ms when the caller reads one
# room of 20, as the window is filled from further back); 5,000 gave 12 ms and 58 ms.
RANK_WINDOW = 1000
# Rooms this small (their ids added up) are searched in an index of their own messages
# (``_search_apart``) instead of reading every match of the query's words in every room: a
# common word over 1,000,000 messages cost 65 ms (newest) and 112 ms (ranked) for a caller
# who reads only a room of 10 messages (bench/search.py, 2026-11-22; bench/README.md has
# the crossover this is set from).
SEARCH_BY_ROOM = 5_000
# Unread counts stop at this many per room (a client shows "10000+").
UNREAD_CAP = 10_000
# Python's \w is not a combining mark, and Thai, Lao, Burmese and Khmer write vowels and
# tones with them: "กินข้าว" was looked for as "ก", "นข" and "าว" anywhere in a message
# (found where the pieces stood in other words), a Khmer word as 6 pieces. Their marks (and
# kana's voicing marks) are letters of a word here.
_MARKS = "".join(c for lo, hi in ((0x0e00, 0x0eff), (0x1000, 0x109f), (0x1780, 0x17ff),
                                  (0x3099, 0x309a)) for c in map(chr, range(lo, hi + 1))
                 if unicodedata.category(c).startswith("M"))
_WORDS = re.compile(rf"[\w{_MARKS}]+\*?")
# Letters of languages written without spaces between words (Chinese, Japanese, Thai, Lao,
# Khmer, Myanmar) and of Korean, whose words carry their particles ("서울에서"). FTS5's
# unicode61 tokenizer takes a whole run of such letters as one token, a sentence as often
# as not, so a word inside it was never found: "東京" found nothing in "東京タワーに行く"
# (carried over in the closing notes since the eleventh session). A search word with such a
# letter is looked for anywhere in a message's text instead (``SearchWords.inside``).
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3040-\u30ff\u3130-\u318f"
    "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff"
    "\uff66-\uffdc\U00020000-\U0003134f]")
# At most this many such words in one search: each is one more reading of every message
# searched (``instr``), and 62 one-letter words, each found only at the end of 20,000
# messages of 4 KiB one person had written, took 4 s a search where one took 77 ms (an
# attacker's run, 2026-11-25; 30 searches a minute kept both store readers busy).
MAX_INSIDE_WORDS = 4


class SearchWords(NamedTuple):
    """A user's search words: every one must occur. ``fts`` is the FTS5 query for those the
    index finds (a trailing * makes a prefix; FTS5's own syntax, NEAR, column filters,
    quotes, is not passed through), "" when there are none; ``inside`` are the words with a
    letter of a language written without spaces (``_UNSPACED``), looked for anywhere in the
    text (SQLite's ``lower``, which folds ASCII only, on both sides)."""
    fts: str
    inside: tuple[str, ...]


def search_words(text: str) -> SearchWords:
    words = _WORDS.findall(text)
    if not words:
        raise InvalidInput("the search has no words to look for")
    indexed = [w for w in words if not _UNSPACED.search(w)]
    inside = tuple(dict.fromkeys(w.rstrip("*") for w in words if w not in indexed))
    if len(inside) > MAX_INSIDE_WORDS:
        raise InvalidInput(f"a search has at most {MAX_INSIDE_WORDS} words in Chinese, "
                           "Japanese, Thai, Lao, Khmer, Burmese or Korean (each is read in "
                           "the whole text of every message searched); this one has "
                           f"{len(inside)}")
    return SearchWords(" ".join(f'"{w[:-1]}" *' if w.endswith("*") else f'"{w}"'
                                for w in indexed), inside)


def _damaged(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_CORRUPT,
                                                         sqlite3.SQLITE_NOTADB)


def damaged(path: Path, e: object) -> StoreDamaged:
    """A damaged database, for people: a server refused every send on one with "send it
    again", which cannot help, and said it only as a warning (an operator's run,
    2026-11-24)."""
    return StoreDamaged(f"the history database {path} is damaged ({e}): the server's operator "
                        "must stop it and restore the last backup (`tsnetchat doctor` checks "
                        "it; README, Troubleshooting)")


def quick_check(path: Path, within: float, stop: threading.Event | None = None
                ) -> tuple[int, list[str]] | None:
    """SQLite's quick_check of the database at ``path`` (it writes nothing) and its schema
    version: ``["ok"]`` when sound, what it found otherwise (also when SQLite says it is
    malformed or not a database). None when it could not say: not finished within
    ``within`` seconds (a large history's check holds a snapshot that lets the WAL grow) or
    before ``stop``, locked, or another error (a disk I/O error is not damage to restore
    from). ``mode=rw``, not ``ro``: a read-only connection leaves the -wal and -shm files of
    a stopped server's database behind."""
    deadline = time.monotonic() + within
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
        try:
            db.set_progress_handler(lambda: time.monotonic() > deadline or (
                stop is not None and stop.is_set()), 10_000)
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            return version, [str(r[0]) for r in db.execute("PRAGMA quick_check")]
        finally:
            db.close()
    except sqlite3.Error as e:
        return (0, [str(e)]) if _damaged(e) else None


def _locked(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and (
        "locked" in str(e) or "busy" in str(e))


def _new_schema(db: sqlite3.Connection) -> None:
    _script(db, SCHEMA)
    for target in range(2, SCHEMA_VERSION + 1):
        MIGRATIONS[target](db)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _create(path: Path) -> None:
    """Make a new database at ``path``, mode 0600, all at once: it is written under another
    name and linked into place with its tables in it, so a database file that exists always
    has them (and an empty one is never ours: ``_refuse_empty``). SQLite gives the -wal and
    -shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    for stale in (tmp, tmp.with_name(tmp.name + "-journal")):
        stale.unlink(missing_ok=True)  # left by a crash while creating
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            db.execute("BEGIN IMMEDIATE")
            _new_schema(db)
            db.execute("COMMIT")
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
        try:
            os.link(tmp, path)  # never over a database another process made meanwhile
        except FileExistsError:
            pass  # that one is used
        except OSError:  # a file system without hard links
            if not path.exists():
                os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names (device, inode); None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_reading(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection that only reads the database at ``path``. Reading a WAL database takes
    its -wal and -shm files, made by the first reader when no connection has them; on a
    full disk they cannot be, and `tsnetchat backup` of a stopped server's history to
    another disk said "disk I/O error" (a reliability run, 2026-11-25). With no -shm file,
    or one shorter than SQLite's first 32 KB (such a failure leaves 3 bytes), nobody has
    the database open, and it is read as it is (SQLite's ``immutable``)."""
    shm = path.with_name(path.name + "-shm")
    try:
        alone = path.exists() and (not shm.exists() or shm.stat().st_size < 32768)
    except OSError:
        alone = False
    # (mode=rw: never made here. A reader thread started after the database was deleted
    # under the server made an empty one in its place, and read "no such table"; a run of
    # the suite, 2026-11-25)
    db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=rw", uri=True,
                         isolation_level=None, check_same_thread=False, timeout=timeout)
    try:
        db.execute("PRAGMA query_only=ON")
        db.execute("PRAGMA user_version").fetchone()
        return db
    except sqlite3.Error as e:
        db.close()
        code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
        if not alone or code not in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
                                     sqlite3.SQLITE_CANTOPEN):
            raise
    db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?immutable=1", uri=True,
                         isolation_level=None, check_same_thread=False, timeout=timeout)
    db.execute("PRAGMA query_only=ON")
    return db


def _free_bytes(folder: Path) -> int:
    """Bytes free for this process on ``folder``'s file system (a great many if unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 2**62
    return st.f_bavail * st.f_frsize


def _refuse_empty(path: Path) -> None:
    """An existing database file of 0 bytes (and no WAL holding its pages) is not a new
    history: a database file is never empty (``_create``), so it was truncated or replaced.
    Starting on it would silently present an empty history and forget every token record."""
    try:
        empty = path.stat().st_size == 0
        wal = path.with_name(path.name + "-wal")
        empty = empty and (not wal.exists() or wal.stat().st_size == 0)
    except FileNotFoundError:
        return
    if empty:
        raise StoreError(
            f"the history database {path} is empty (0 bytes): it was truncated or replaced "
            "(a full disk while copying it, an interrupted restore?), so its messages and "
            "token records are not there, and tsnetchat will not start over on it silently. "
            "Restore a backup with `tsnetchat restore BACKUP`, or delete the file to start "
            "with an empty history")


class _Checkpointer(threading.Thread):
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection each time it is asked.
    PASSIVE never blocks the writer; SQLite restarts the WAL from its beginning once a
    checkpoint has caught up. (The last connection to close checkpoints whatever is left.)
    Asked with ``truncate`` (a write failed for a full disk), TRUNCATE instead: it waits
    for the writer, and once the WAL is all in the database it cuts the file to nothing,
    which gives its space back to the database.

    SQLite's automatic checkpoint stays on as the backstop that keeps the WAL bounded: under a
    continuous stream of commits a checkpoint from another connection never catches up, so
    the WAL would never restart (it grew to 650 MB in a test). It then finds most pages
    already copied, and runs inside the writer thread's commit, not on the event loop."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="tsnetchat-checkpoint", daemon=True)
        self.path = path
        self._due = threading.Event()
        self._stopping = False
        self._truncate = False
        self._lock = threading.Lock()  # (a TRUNCATE asked for as a round began was lost)
        self._rounds = threading.Condition(self._lock)
        self._asked = 0  # requests so far, and how many of them a finished round has met
        self._met = 0
        self.runs = 0  # completed checkpoints (the tests read it)
        self.truncated = 0  # of which TRUNCATE

    def request(self, *, truncate: bool = False) -> None:
        with self._lock:
            self._truncate = self._truncate or truncate
            self._asked += 1
        self._due.set()

    def settled(self, timeout: float) -> bool:
        """Wait until a round has run (or failed) since each request made so far: True;
        False after ``timeout`` seconds. For tests, which otherwise depend on how soon the
        scheduler runs this thread (under load it ran no round in 4,000 appends)."""
        with self._rounds:
            return self._rounds.wait_for(lambda: self._met >= self._asked, timeout)

    def stop(self) -> None:
        self._stopping = True
        self._due.set()
        self.join()
        with self._rounds:  # (nothing runs from now on: nobody waits for it)
            self._met = self._asked
            self._rounds.notify_all()

    def run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            while not self._stopping:
                self._due.wait()
                self._due.clear()
                if self._stopping:
                    break
                with self._lock:
                    truncate, self._truncate = self._truncate, False
                    asked = self._asked
                try:
                    db.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})"
                               ).fetchall()
                    self.runs += 1
                    self.truncated += truncate
                except sqlite3.Error:
                    pass  # busy or locked: the next round retries; the WAL only grows meanwhile
                with self._rounds:
                    self._met = asked
                    self._rounds.notify_all()
        finally:
            db.close()


# Tokens on record that are neither revoked nor expired (``?``: now), for Store.live_tokens
# and for doctor, which reads the database without Store (it must neither create, upgrade
# nor refuse one).
LIVE_TOKENS = ("SELECT COUNT(*) FROM tokens t LEFT JOIN revocations r ON r.jti = t.jti "
               "WHERE r.jti IS NULL AND t.exp > ?")


class Store:
    """One SQLite connection. Not for the event loop: every call may wait on the disk or on
    another process's lock (up to ``timeout`` seconds)."""

    CHECKPOINT_EVERY = 100  # appends between background checkpoints (SQLite's: ~1000 pages)
    # Below LOW_FREE bytes free on the database's disk, a checkpoint every TIGHT_EVERY
    # appends (the free space is looked at that often). A message committed alone puts
    # about 48 KB in the WAL (three 16 KB pages), so 100 of them took 4.8 MB: with 3 MB
    # free, the disk was full before the next checkpoint, and no write (nor checkpoint,
    # which needs room to grow the database) ever succeeded again, also once some space was
    # freed (a reliability run, 2026-11-25: 49 of 300 messages stored).
    TIGHT_EVERY = 10
    LOW_FREE = 64 * 1024 * 1024

    def __init__(self, path: Path, *, fsync: bool = False, timeout: float = 5.0,
                 readonly: bool = False, upgrade: bool = True) -> None:
        """``upgrade=False``: refuse (StoreError) a database of an older schema instead of
        upgrading it, for a command run beside a server that may be the older version."""
        self.path = path
        self._upgrade = upgrade
        self._timeout_ms = int(timeout * 1000)
        self._readonly = readonly
        try:
            # Ranks the matches found in small rooms (``search``): an index of those alone.
            self._ranker = sqlite3.connect(":memory:", isolation_level=None,
                                           check_same_thread=False)
            self._ranker.execute(f"CREATE VIRTUAL TABLE ranked USING fts5 (text, "
                                 f"tokenize='{TOKENIZE}')")
            # (held in memory until the query, never written out in segments)
            self._ranker.execute("INSERT INTO ranked (ranked, rank) VALUES ('hashsize', ?)",
                                 (64 * 1024 * 1024,))
            if readonly:
                self._db = _open_reading(path, timeout)
                self._check_version(int(self._db.execute("PRAGMA user_version").fetchone()[0]))
            else:
                _refuse_empty(path)
                if not path.exists():
                    _create(path)
                self._file = _file_id(path)  # (the file opened: see ``_check_file``)
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                           timeout=timeout)
                self._open_for_writing(fsync)
        except sqlite3.Error as e:
            if _damaged(e):
                raise damaged(path, e) from e
            raise StoreError(f"cannot open history database {path}: {e}"
                             f"{full_disk_hint(path)}{read_only_hint(path.parent)}") from e
        except OSError as e:
            raise StoreError(f"cannot create history database {path}: {e.strerror}"
                             f"{full_disk_hint(path)}") from e
        self._appends = 0
        self.purge_due = False  # a deletion committed: run ``purge`` (the writer thread)
        self.unindexed = False  # messages written since the last ``index_pending``
        self._index_log = LogLimiter(burst=3, rate=0.1)
        self.checkpointer: _Checkpointer | None = None  # started by the first busy writer
        # The writer's view: room name -> (room number, last id); sender -> number.
        self._rooms: dict[str, tuple[int, int]] = {}
        self._senders: dict[Sender, int] = {}
        if not readonly:
            self._load_marks()

    # schema ---------------------------------------------------------------------------

    @staticmethod
    def _check_version(version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(f"the history database has schema version {version}, newer than "
                             f"this tsnetchat understands ({SCHEMA_VERSION}); upgrade tsnetchat")

    def _open_for_writing(self, fsync: bool) -> None:
        db = self._db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        self._check_version(version)
        fresh = not db.execute("SELECT 1 FROM sqlite_master").fetchone()
        if fresh:  # (a file made by round 1 before its first table was written)
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # A deleted message's text is overwritten, not only unlinked (a pasted secret must
        # really disappear); see ``purge``.
        db.execute("PRAGMA secure_delete=ON")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if fresh:
            with self._tx():
                _new_schema(db)
            return
        if version == SCHEMA_VERSION:
            return
        if not self._upgrade:
            # (the new version's `token list` upgraded the database under the old server
            # during an upgrade: it then failed every revocation check, and sends and reads;
            # an operator's run, 2026-11-24)
            raise StoreError(
                f"the history database {self.path} has schema version {version}, older than "
                f"this tsnetchat's ({SCHEMA_VERSION}), and a server runs on it: the server "
                "was not restarted since tsnetchat was upgraded. Restart it (systemctl restart "
                "tsnetchat), which upgrades the database, then run this again; nothing was "
                "changed")
        with self._tx():
            version = int(db.execute("PRAGMA user_version").fetchone()[0])  # another upgrader?
            for target in range(version + 1, SCHEMA_VERSION + 1):
                log.warning("upgrading the history database %s to schema version %d",
                            self.path, target)
                MIGRATIONS[target](db)
                db.execute(f"PRAGMA user_version={target}")
        if version < 1:  # round 1's layout left pages worth dropping; later steps do not
            self._compact()

    def _compact(self) -> None:
        """After an upgrade: rewrite the file with the current page size, dropping the old
        layout's pages. Best effort (it needs the database to itself and free space for a
        copy); the upgraded data is committed either way."""
        try:
            self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._db.execute("VACUUM")
        except sqlite3.Error as e:
            log.warning("could not compact %s after the upgrade (%s); it keeps working, only "
                        "larger than it needs to be", self.path, e)
        finally:
            self._db.execute("PRAGMA journal_mode=WAL")

    def _load_marks(self) -> None:
        try:
            for rid, name, last in self._db.execute(
                    "SELECT id, name, MAX(last_id, COALESCE((SELECT MAX(id) FROM messages "
                    "WHERE room = rooms.id), 0)) FROM rooms"):
                self._rooms[name] = (rid, last)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read history database {self.path}: {e}") from e

    # plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        try:
            self._ranker.close()
            self._db.close()
        except sqlite3.Error as e:
            raise StoreError(f"closing {self.path}: {e}") from e

    def _check_file(self) -> None:
        """Raise StoreError when ``path`` no longer names the file this connection has open
        (deleted, or another moved over it). SQLite goes on writing to the file it opened,
        which nobody reads again: a server whose database was deleted under it acknowledged
        145 messages more, and started again on nothing (a reliability run, 2026-11-25)."""
        if self._readonly or _file_id(self.path) == self._file:
            return
        raise StoreError(
            f"the history database {self.path} was deleted or replaced while the server had "
            "it open, and what it writes now would be lost with the file it opened: nothing "
            "more is written. The server's operator must stop it, put the database back (or "
            "`tsnetchat restore BACKUP`) and start it again")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._check_file()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed: a transaction left open would be committed
                # by the next write, with the rows its callers were told were lost.
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _q(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _error(self, e: sqlite3.Error) -> StoreError:
        """``e`` for people; a lock held too long says by what, and that nothing changed (a
        bare "database is locked" left `token issue` unclear on both: an operator's run,
        2026-11-24). Every SQLite error of this connection passes here, so a full disk
        also asks for the WAL to be cut back here (``_checkpoint``)."""
        if _damaged(e):
            return damaged(self.path, e)
        if (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_FULL and (
                not self._readonly):
            # (the space the WAL holds comes back once it is all in the database; nothing
            # asked for a checkpoint while every write failed: see TIGHT_EVERY)
            self._checkpoint(truncate=True)
        if _locked(e):
            return StoreError(
                f"history database error: {e}: another process has held {self.path}'s write "
                f"lock for over {self._timeout_ms / 1000:g} s (`fuser -v {self.path}` names it; "
                "a `sqlite3` shell in a transaction is the usual one); nothing was changed")
        return StoreError(f"history database error: {e}")

    # messages -------------------------------------------------------------------------

    def append(self, room: str, sender: Sender, kind: int, text: str, client_msg_id: str = "",
               *, now_ms: int | None = None) -> tuple[StoredMessage, bool]:
        """Store one message in a transaction of its own (see ``write``)."""
        (w,) = self.write([Draft(room, sender, kind, text, client_msg_id)], now_ms=now_ms)
        assert isinstance(w, Written)  # plain messages are never refused
        return w.message, w.duplicate

    def write(self, drafts: Sequence[Draft], *,
              now_ms: int | None = None) -> list[Written | Refused]:
        """Store messages in one transaction and return them in order, with their ids. All
        or nothing: on any error nothing is stored and StoreError is raised."""
        before = dict(self._rooms)
        try:
            with self._tx():
                out = [self._insert(d, now_ms) for d in drafts]
        except BaseException:
            self._rooms = before
            self._senders.clear()  # a rolled-back sender row may be cached
            raise
        self._count(len(out))
        return out

    def set_timeout(self, seconds: float) -> None:
        """How long the next statements wait for another connection's lock (to within 10%
        below: a statement per commit saved; the caller checks its own deadline)."""
        ms = max(1, int(seconds * 1000))
        if ms < self._timeout_ms * 0.9 or ms > self._timeout_ms:
            self._db.execute(f"PRAGMA busy_timeout={ms}")
            self._timeout_ms = ms

    def begin(self, timeout: float) -> None:
        """Open a write transaction for ``write_open``, waiting up to ``timeout`` seconds for
        another connection's write lock. Raises sqlite3.OperationalError when still locked
        (the writer thread decides what a timeout means) and StoreError for anything else."""
        self._check_file()
        self.set_timeout(timeout)
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            if _locked(e):
                raise
            raise self._error(e) from e

    def write_one(self, draft: Draft, timeout: float) -> Written | Refused | None:
        """Store one message into a room and from a sender already known, as one statement
        (SQLite's own transaction): a commit alone costs the writer three statements more.
        None if it is not that simple (use ``begin`` and ``write_open``). Raises
        sqlite3.OperationalError while locked and StoreError for anything else."""
        room = self._rooms.get(draft.room)
        if (room is None or draft.sender not in self._senders or draft.mentions
                or draft.kind not in (TEXT, ACTION)):
            # (a mention, a topic, an edit or a deletion takes more statements: each was a
            # transaction of its own, and a later one failing left the message stored while
            # its sender was told it was not, and the resend was never shown)
            return None
        self._check_file()
        self.set_timeout(timeout)
        try:
            w = self._insert(draft, None)
        except sqlite3.Error as e:
            self._rooms[draft.room] = room
            if _locked(e):
                raise
            raise self._error(e) from e
        self._count(1)
        return w

    def write_open(self, drafts: Sequence[Draft]) -> list[Written | Refused]:
        """``write`` inside a transaction opened by ``begin``: commits, or rolls back and
        raises StoreError."""
        before = dict(self._rooms)
        try:
            out = [self._insert(d, None) for d in drafts]
            self._db.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self._db.execute("ROLLBACK")
            self._rooms = before
            self._senders.clear()
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from e
            raise
        self._count(len(out))
        return out

    def _count(self, n: int) -> None:
        before, self._appends = self._appends, self._appends + n
        if before // self.TIGHT_EVERY == self._appends // self.TIGHT_EVERY:
            return
        if (before // self.CHECKPOINT_EVERY != self._appends // self.CHECKPOINT_EVERY
                or _free_bytes(self.path.parent) < self.LOW_FREE):
            self._checkpoint()

    def _checkpoint(self, *, truncate: bool = False) -> None:
        if self.checkpointer is None:
            self.checkpointer = _Checkpointer(self.path)
            self.checkpointer.start()
        self.checkpointer.request(truncate=truncate)

    def _sender_id(self, s: Sender) -> int:
        sid = self._senders.get(s)
        if sid is None:
            db = self._db
            row = db.execute("SELECT id FROM senders WHERE login=? AND display_name=? AND node=?",
                             (s.login, s.display_name, s.node)).fetchone()
            sid = row[0] if row else db.execute(
                "INSERT INTO senders (login, display_name, node) VALUES (?,?,?)",
                (s.login, s.display_name, s.node)).lastrowid
            assert sid is not None
            self._senders[s] = sid
        return sid

    def _insert(self, d: Draft, now_ms: int | None) -> Written | Refused:
        db = self._db
        room = self._rooms.get(d.room)
        if room is not None and d.client_msg_id:
            row = db.execute(
                _SELECT + "WHERE m.room=? AND m.client_msg_id=? AND m.client_msg_id != '' "
                "AND s.login=?", (room[0], d.client_msg_id, d.sender.login)).fetchone()
            if row:
                return resent(d, _row(row))
        ts = int(time.time() * 1000) if now_ms is None else now_ms
        if d.kind in (EDIT, DELETE):
            refused = self._change(d, room, ts)
            if refused is not None:
                return refused
        if room is None:
            rid = db.execute("INSERT INTO rooms (name, last_id) VALUES (?, 1)",
                             (d.room,)).lastrowid
            assert rid is not None
            room = (rid, 0)
        new_id = room[1] + 1
        if d.target:
            db.execute("INSERT INTO messages (room, id, ts_ms, sender, kind, text, "
                       "client_msg_id, target, deleted_by) VALUES (?,?,?,?,?,?,?,?,?)",
                       (room[0], new_id, ts, self._sender_id(d.sender), d.kind, d.text,
                        d.client_msg_id, d.target,
                        d.sender.login if d.kind == DELETE else None))
        else:
            db.execute("INSERT INTO messages (room, id, ts_ms, sender, kind, text, client_msg_id) "
                       "VALUES (?,?,?,?,?,?,?)", (room[0], new_id, ts, self._sender_id(d.sender),
                                                  d.kind, d.text, d.client_msg_id))
        if d.mentions and d.kind != EDIT:  # (an edit's are its target's: _change)
            db.executemany("INSERT OR IGNORE INTO mentions (login, room, id) VALUES (?,?,?)",
                           [(login, room[0], new_id) for login in d.mentions])
        if d.kind == TOPIC:
            db.execute("INSERT OR REPLACE INTO topics (room, id, text, login, display_name, node, "
                       "ts_ms) VALUES (?,?,?,?,?,?,?)", (d.room, new_id, d.text, d.sender.login,
                                                         d.sender.display_name, d.sender.node, ts))
        self._rooms[d.room] = (room[0], new_id)
        return Written(StoredMessage(d.room, new_id, ts, d.sender, d.kind, d.text,
                                     d.client_msg_id, d.target,
                                     d.mentions if d.kind != EDIT else (),  # (its target's)
                                     d.sender.login if d.kind == DELETE else ""), False)

    def _change(self, d: Draft, room: tuple[int, int] | None, ts: int, *,
                edit_mentions: bool = True) -> Refused | None:
        """Decide and apply an edit or deletion of ``d.target`` (see Draft); the event row
        itself is written by the caller. An edit gives its target ``d.mentions`` unless
        ``edit_mentions`` is False (Imported.edit_mentions)."""
        decided = self._decide(d, None if room is None else room[0], ts)
        if isinstance(decided, Refused):
            return decided
        assert room is not None
        db, seq = self._db, decided
        if d.kind == EDIT:
            db.execute("UPDATE messages SET text=?, edited_ms=? WHERE seq=?", (d.text, ts, seq))
            if edit_mentions:  # the message mentions whom its new text names, no one else
                db.execute("DELETE FROM mentions WHERE room=? AND id=?", (room[0], d.target))
                db.executemany("INSERT OR IGNORE INTO mentions (login, room, id) "
                               "VALUES (?,?,?)", [(login, room[0], d.target)
                                                  for login in d.mentions])
            return None
        db.execute("UPDATE messages SET text='', deleted_by=? WHERE seq=?", (d.sender.login, seq))
        db.execute("UPDATE messages SET text='' WHERE room=? AND target=? AND target != 0 "
                   "AND kind=?", (room[0], d.target, EDIT))
        db.execute("DELETE FROM mentions WHERE room=? AND id=?", (room[0], d.target))
        self.purge_due = True
        return None

    def _decide(self, d: Draft, rid: int | None, ts: int) -> Refused | int:
        """Whether the edit or deletion ``d`` at ``ts`` may be made (see Draft): Refused,
        or the row (seq) of its target."""
        db = self._db
        row = None if rid is None else db.execute(
            "SELECT m.seq, m.ts_ms, s.login, m.deleted_by, m.kind FROM messages m "
            "JOIN senders s ON s.id = m.sender WHERE m.room=? AND m.id=?",
            (rid, d.target)).fetchone()
        if row is None or row[4] not in (TEXT, ACTION):
            return Refused(InvalidInput(f"there is no message {d.target} in {d.room!r} to "
                                        f"{'edit' if d.kind == EDIT else 'delete'}"))
        seq, sent_ms, author, deleted_by, _kind = row
        if deleted_by:
            return Refused(InvalidInput(f"message {d.target} was already deleted"))
        own = author == d.sender.login
        if d.kind == EDIT and not own:
            return Refused(PermissionDenied("only its author can edit a message"))
        if not (d.kind == DELETE and d.admin):
            if not own:
                return Refused(PermissionDenied(
                    "only its author (or an admin) can delete a message"))
            if d.edit_window_ms and ts - sent_ms > d.edit_window_ms:
                return Refused(PermissionDenied(
                    f"message {d.target} is older than {_span(d.edit_window_ms // 1000)}, "
                    "the server's edit window (edit_window_seconds): it can no longer be "
                    "changed by its author"))
        return int(seq)

    def index_pending(self) -> int:
        """Index for search every message written since the last call (the writer thread:
        in a pause of writing, at least every INDEX_WITHIN, and before a search). Returns
        how many rows were indexed; a failure (a full disk) is logged and tried again."""
        self.unindexed = False
        try:
            with self._tx() as db:
                done = int(db.execute(_FTS_INDEXED[1:-1]).fetchone()[0])
                top = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0])
                if top <= done:
                    return 0
                n = db.execute("INSERT INTO messages_fts (rowid, text) SELECT seq, text FROM "
                               "messages WHERE seq > ? AND seq <= ? AND kind IN (1, 2)",
                               (done, top)).rowcount
                db.execute("UPDATE meta SET value=? WHERE key='fts_indexed'", (str(top),))
                return int(n)
        except StoreError as e:
            self.unindexed = True
            # (tried after every group of commits: about 85 lines a minute for as long as the
            # disk stayed full, where refused sends say one in 10 s; an operator's run,
            # 2026-11-23)
            self._index_log.log(log, logging.WARNING,
                                "could not index new messages for search yet: %s", e)
            return 0

    def purge(self) -> None:
        """After a deletion has committed: rewrite the search index without the deleted
        words, and copy the WAL into the database and truncate it, so the text is in neither
        file (secure_delete zeroes what is freed). Best effort: a reader holding an old
        snapshot keeps the WAL until it is done (the next purge finishes the job).
        Costs a merge of the whole index (measured in bench/README.md), so the writer
        thread runs it in a pause of writing, or PURGE_WITHIN after the deletion."""
        self.purge_due = False
        try:
            self._db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('optimize')")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as e:
            log.warning("could not purge deleted text from %s yet: %s", self.path, e)

    def people(self) -> dict[str, str]:
        """login -> display name of everybody who has sent a message (the latest name), or
        holds a token (no name known yet)."""
        out = {str(r[0]): "" for r in self._q("SELECT DISTINCT sub FROM tokens")}
        out.update((str(r[0]), str(r[1])) for r in
                   self._q("SELECT login, display_name FROM senders ORDER BY id"))
        return out

    # cluster mode (tsnetchat.cluster): this database is one server's copy of the stream --

    def import_messages(self, items: Sequence[Imported], source: str, seq: int
                        ) -> dict[int, Refused]:
        """Store messages numbered elsewhere (their ids are kept), and remember that
        ``source`` has been applied through ``seq``, in one transaction. A message at or
        below its room's newest id is skipped (already here). Edits and deletions are
        decided and applied as ``write`` does (``_change``: the same tombstones, search
        index and purge); one refused here is not stored, and is returned by its place in
        ``items``.
        Each text's position in the source is kept (``stream_seqs``: what a deletion
        erases there, ``decide_change``), and an applied deletion's ``erase`` positions are
        kept until the source confirms them erased (``to_erase``, ``erased``): a server
        killed between applying a deletion and erasing its text erases it when it starts
        again, not never."""
        before = dict(self._rooms)
        refused: dict[int, Refused] = {}
        try:
            with self._tx() as db:
                db.execute("CREATE TABLE IF NOT EXISTS applied (source TEXT PRIMARY KEY, "
                           "seq INTEGER NOT NULL)")
                db.execute("CREATE TABLE IF NOT EXISTS stream_seqs (room INTEGER NOT NULL, "
                           "id INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (room, id)) "
                           "WITHOUT ROWID")
                db.execute("CREATE TABLE IF NOT EXISTS to_erase (seq INTEGER PRIMARY KEY)")
                for i, it in enumerate(items):
                    m = it.message
                    room = self._rooms.get(m.room)
                    if room is None:
                        rid = db.execute("INSERT INTO rooms (name, last_id) VALUES (?, ?)",
                                         (m.room, m.id)).lastrowid
                        assert rid is not None
                        room = (rid, 0)
                        self._rooms[m.room] = room
                    if m.id <= room[1]:
                        continue
                    if m.kind in (EDIT, DELETE):
                        self._restore(room[0], it.erased)
                        why = self._change(Draft(m.room, m.sender, m.kind, m.text,
                                                 m.client_msg_id, m.target,
                                                 it.edit_mentions or (), it.admin,
                                                 it.edit_window_ms), room, m.ts_ms,
                                           edit_mentions=it.edit_mentions is not None)
                        if why is not None:
                            refused[i] = why
                            continue
                        db.executemany("INSERT OR IGNORE INTO to_erase (seq) VALUES (?)",
                                       [(s,) for s in it.erase])
                    db.execute("INSERT INTO messages (room, id, ts_ms, sender, kind, text, "
                               "client_msg_id, target, deleted_by) VALUES (?,?,?,?,?,?,?,?,?)",
                               (room[0], m.id, m.ts_ms, self._sender_id(m.sender), m.kind,
                                m.text, m.client_msg_id, m.target, m.deleted_by or None))
                    # A row more per text: imports of 64-message batches ran at a median
                    # 71,000 msg/s against 83,000 without (2026-11-22, 8 alternated runs,
                    # noisy machine), far above what a stream takes (fact table,
                    # docs/nats-cluster.md); in ``messages`` it would need a migration.
                    if it.seq and m.kind in (TEXT, ACTION, EDIT):
                        db.execute("INSERT OR REPLACE INTO stream_seqs (room, id, seq) "
                                   "VALUES (?,?,?)", (room[0], m.id, it.seq))
                    if m.mentions:  # (cluster mode: recognised by the sender's server)
                        db.executemany("INSERT OR IGNORE INTO mentions (login, room, id) "
                                       "VALUES (?,?,?)",
                                       [(login, room[0], m.id) for login in m.mentions])
                    if m.kind == TOPIC:
                        db.execute("INSERT OR REPLACE INTO topics (room, id, text, login, "
                                   "display_name, node, ts_ms) VALUES (?,?,?,?,?,?,?)",
                                   (m.room, m.id, m.text, m.sender.login,
                                    m.sender.display_name, m.sender.node, m.ts_ms))
                    self._rooms[m.room] = (room[0], m.id)
                db.execute("INSERT INTO applied (source, seq) VALUES (?, ?) ON CONFLICT (source) "
                           "DO UPDATE SET seq=excluded.seq", (source, seq))
        except BaseException:
            self._rooms = before
            self._senders.clear()
            raise
        self._count(len(items))
        return refused

    def _restore(self, rid: int, rows: Sequence[StoredMessage]) -> None:
        """Put back the rows a deletion blanks where this copy lacks them, without text
        (``Imported.erased``)."""
        for r in rows:
            self._db.execute(
                "INSERT OR IGNORE INTO messages (room, id, ts_ms, sender, kind, text, "
                "client_msg_id, target, edited_ms) VALUES (?,?,?,?,?,'',?,?,?)",
                (rid, r.id, r.ts_ms, self._sender_id(r.sender), r.kind, r.client_msg_id,
                 r.target, r.edited_ms))

    def decide_change(self, d: Draft, ts: int) -> Refused | list[tuple[int, StoredMessage]]:
        """Cluster mode, before an edit or deletion is appended: what ``write`` would decide
        for ``d`` at ``ts`` here and now; if allowed, for a DELETE the rows it blanks (its
        target, the target's edits) with their positions in the source (0: unknown)."""
        rows = self._q("SELECT id FROM rooms WHERE name=?", (d.room,))
        rid = int(rows[0][0]) if rows else None
        decided = self._decide(d, rid, ts)
        if isinstance(decided, Refused) or d.kind != DELETE:
            return [] if isinstance(decided, int) else decided
        blanked = [_row(r) for r in self._q(
            _SELECT + "WHERE m.room=? AND (m.id=? OR (m.target=? AND m.kind=?)) ORDER BY m.id",
            (rid, d.target, d.target, EDIT))]
        seqs: dict[int, int] = {}
        try:
            seqs = dict(self._db.execute(
                "SELECT id, seq FROM stream_seqs WHERE room=? AND id IN "
                f"({','.join('?' * len(blanked))})", (rid, *[m.id for m in blanked])
            ).fetchall())
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise self._error(e) from e
        except sqlite3.Error as e:
            raise self._error(e) from e
        return [(seqs.get(m.id, 0), m) for m in blanked]

    def to_erase(self) -> list[int]:
        """Positions in the source that applied deletions still have to erase there."""
        try:
            return [int(r[0]) for r in
                    self._db.execute("SELECT seq FROM to_erase ORDER BY seq").fetchall()]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise self._error(e) from e

    def erased(self, seq: int) -> None:
        """The source confirmed ``seq`` erased (or gone already): no longer ``to_erase``."""
        with self._tx() as db:
            db.execute("DELETE FROM to_erase WHERE seq=?", (seq,))

    def forget_stream_seqs(self) -> None:
        """Drop the positions of messages retention has removed here."""
        try:
            with self._tx() as db:
                db.execute("DELETE FROM stream_seqs WHERE id < COALESCE((SELECT MIN(m.id) "
                           "FROM messages m WHERE m.room = stream_seqs.room), 1 << 62)")
        except StoreError as e:
            if "no such table" not in str(e):
                raise

    def applied(self, source: str) -> int:
        """How far ``source`` has been applied here (``import_messages``); 0 if never."""
        try:
            row = self._db.execute("SELECT seq FROM applied WHERE source=?", (source,)).fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return 0
            raise self._error(e) from e
        return int(row[0]) if row else 0

    def find_resends(self, room: str, keys: Sequence[tuple[str, str]]
                     ) -> dict[tuple[str, str], StoredMessage]:
        """The stored messages among (sender login, client_msg_id) ``keys`` of ``room``."""
        out: dict[tuple[str, str], StoredMessage] = {}
        for login, cmid in keys:
            rows = self._q(_SELECT + "WHERE r.name=? AND m.client_msg_id=? AND "
                           "m.client_msg_id != '' AND s.login=?", (room, cmid, login))
            if rows:
                out[(login, cmid)] = _row(rows[0])
        return out

    def last_ids(self) -> dict[str, int]:
        """Every room's newest id (the writer's view: what it committed)."""
        return {name: last for name, (_rid, last) in self._rooms.items()}

    def last_id(self, room: str) -> int:
        return self._rooms.get(room, (0, 0))[1]

    def after(self, room: str, after_id: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages with id > after_id, ascending."""
        return [_row(r) for r in self._q(
            _SELECT + "WHERE r.name=? AND m.id>? ORDER BY m.id LIMIT ?", (room, after_id, limit))]

    def before(self, room: str, before_id: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` newest messages with id < before_id, returned ascending."""
        rows = self._q(_SELECT + "WHERE r.name=? AND m.id<? ORDER BY m.id DESC LIMIT ?",
                       (room, before_id, limit))
        return [_row(r) for r in reversed(rows)]

    def latest(self, room: str, n: int) -> list[StoredMessage]:
        return self.before(room, 2**62, n) if n > 0 else []

    def prune(self, *, keep_count: int, keep_days: float, now: float | None = None,
              max_rows: int = 0) -> int:
        """Apply retention; returns the number of messages deleted (at most ``max_rows`` when
        it is set: call again until it returns less). ids are not reused. Nothing to delete
        writes nothing: on a full disk a start-up must not fail on a transaction it did not
        need (issue 18)."""
        cutoff = int(((time.time() if now is None else now) - keep_days * 86400) * 1000)
        plan: list[tuple[int, int]] = []  # (room number, delete ids up to)
        try:
            for rid, last in self._rooms.values():
                upto = last - keep_count if keep_count > 0 else 0
                if keep_days > 0:
                    # ids follow time within a room, so everything before the first message
                    # newer than the cutoff is older: no index on time needed.
                    row = self._db.execute("SELECT id FROM messages WHERE room=? AND ts_ms>=? "
                                           "ORDER BY id LIMIT 1", (rid, cutoff)).fetchone()
                    upto = max(upto, (row[0] - 1) if row else last)
                if upto > 0 and self._db.execute(
                        "SELECT 1 FROM messages WHERE room=? AND id<=? LIMIT 1",
                        (rid, upto)).fetchone():
                    plan.append((rid, upto))
        except sqlite3.Error as e:
            raise self._error(e) from e
        if not plan:
            return 0
        deleted = 0
        with self._tx() as db:
            # Keep the high-water marks: pruning may delete a room's newest message.
            db.executemany("UPDATE rooms SET last_id=? WHERE id=?",
                           [(last, rid) for rid, last in self._rooms.values()])
            for rid, upto in plan:
                if max_rows:
                    row = db.execute("SELECT id FROM messages WHERE room=? AND id<=? ORDER BY id "
                                     "LIMIT 1 OFFSET ?", (rid, upto, max_rows - deleted - 1)
                                     ).fetchone()
                    if row is not None:
                        upto = row[0]
                deleted += db.execute("DELETE FROM messages WHERE room=? AND id<=?",
                                      (rid, upto)).rowcount
                db.execute("DELETE FROM mentions WHERE room=? AND id<=?", (rid, upto))
                if max_rows and deleted >= max_rows:
                    break
        return deleted

    # a team's day (schema version 2) -------------------------------------------------

    def topic(self, room: str) -> Topic | None:
        return self.topics((room,)).get(room)

    def topics(self, rooms: Collection[str]) -> dict[str, Topic]:
        """The topics of those of ``rooms`` that have one, in one read: ListRooms took
        about 90 us a room reading them one at a time (270 ms for 3,000 rooms, 2026-11-23)."""
        if not rooms:
            return {}
        rows = self._q("SELECT room, id, text, login, display_name, node, ts_ms FROM topics "
                       "WHERE room IN (SELECT value FROM json_each(?))",
                       (json.dumps(sorted(set(rooms))),))
        return {r[0]: Topic(r[0], r[1], r[2], Sender(r[3], r[4], r[5]), r[6]) for r in rows}

    def private_rooms(self) -> dict[str, frozenset[str]]:
        """Every private room and its members."""
        out: dict[str, set[str]] = {name: set() for (name,) in
                                    self._q("SELECT name FROM private_rooms")}
        for room, login in self._q("SELECT room, login FROM room_members"):
            out.setdefault(room, set()).add(login)
        return {k: frozenset(v) for k, v in out.items()}

    def set_members(self, room: str, by: str, add: Sequence[str], remove: Sequence[str],
                    *, create: bool = False) -> frozenset[str]:
        """Create a private room or change its members; returns the members now. Raises
        InvalidInput when creating one that exists, or changing one that does not."""
        with self._tx() as db:
            exists = db.execute("SELECT 1 FROM private_rooms WHERE name=?", (room,)).fetchone()
            if create and exists:
                raise InvalidInput(f"private room {room!r} already exists")
            if not create and not exists:
                raise InvalidInput(f"there is no private room {room!r}")
            if create:
                db.execute("INSERT INTO private_rooms (name, created_by, created_ms) "
                           "VALUES (?,?,?)", (room, by, int(time.time() * 1000)))
            db.executemany("INSERT OR IGNORE INTO room_members (room, login, added_by) "
                           "VALUES (?,?,?)", [(room, x, by) for x in add])
            db.executemany("DELETE FROM room_members WHERE room=? AND login=?",
                           [(room, x) for x in remove])
            rows = db.execute("SELECT login FROM room_members WHERE room=?", (room,)).fetchall()
        return frozenset(r[0] for r in rows)

    def mark_read(self, marks: Sequence[tuple[str, str, int]]) -> None:
        """(login, room, id): read positions, which only move forward."""
        with self._tx() as db:
            db.executemany("INSERT INTO read_marks (login, room, last_read) VALUES (?,?,?) "
                           "ON CONFLICT (login, room) DO UPDATE SET "
                           "last_read=MAX(last_read, excluded.last_read)", marks)

    def read_mark(self, login: str, room: str) -> int:
        rows = self._q("SELECT last_read FROM read_marks WHERE login=? AND room=?",
                       (login, room))
        return int(rows[0][0]) if rows else 0

    def unread(self, login: str, rooms: Sequence[str]) -> list[RoomState]:
        """Read position, unread messages (text and /me, not deleted, not one's own; at most
        UNREAD_CAP) and unread mentions of ``login`` in each room."""
        marks = dict(self._q("SELECT room, last_read FROM read_marks WHERE login=?", (login,)))
        ids = dict(self._q("SELECT name, id FROM rooms"))
        mine = [r[0] for r in self._q("SELECT id FROM senders WHERE login=?", (login,))]
        own = f"AND sender NOT IN ({','.join('?' * len(mine))})" if mine else ""
        out = []
        for room in rooms:
            last = int(marks.get(room, 0))
            rid = ids.get(room)
            if rid is None:
                out.append(RoomState(room, last, 0, 0))
                continue
            n = self._q(f"SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE room=? AND id>? "
                        f"AND kind IN (1, 2) AND deleted_by IS NULL {own} LIMIT {UNREAD_CAP})",
                        (rid, last, *mine))[0][0]
            m = self._q("SELECT COUNT(*) FROM mentions WHERE login=? AND room=? AND id>?",
                        (login, rid, last))[0][0]
            out.append(RoomState(room, last, int(n), int(m)))
        return out

    def mentions_of(self, login: str, *, include_read: bool, limit: int,
                    rooms: Sequence[str] | None = None) -> list[StoredMessage]:
        """Messages that mention ``login``, newest first, in ``rooms`` (None: every room;
        the caller decides which it may read). The rooms are applied before the limit, as
        search's are: mentions where a person may not read took the page's places, and
        left it empty."""
        if rooms is not None and not rooms:
            return []
        where = "" if rooms is None else f"AND r.name IN ({','.join('?' * len(rooms))}) "
        rows = self._q(
            _SELECT + "JOIN mentions x ON x.room = m.room AND x.id = m.id "
            "LEFT JOIN read_marks k ON k.login = x.login AND k.room = r.name "
            "WHERE x.login=? AND m.deleted_by IS NULL AND (? OR x.id > COALESCE(k.last_read, 0)) "
            + where + "ORDER BY m.ts_ms DESC, m.seq DESC LIMIT ?",
            (login, include_read, *(rooms or ()), limit))
        return [_row(r) for r in rows]

    def search(self, query: str, rooms: Sequence[str], *, author: str = "", since_ms: int = 0,
               until_ms: int = 0, newest: bool = False, limit: int = 20,
               offset: int = 0) -> list[StoredMessage]:
        """Messages in ``rooms`` (the caller decides which it may read) matching every word
        of ``query`` (``search_words``) and the filters, newest first, or ranked: the newest
        RANK_WINDOW of those matches ordered by bm25, best first (ties newest first), so
        ranked pages end after RANK_WINDOW results. The rooms and filters are applied before
        the window is cut, so what a caller may not read never takes a place in it. Deleted
        messages never match: their text is no longer in the index, nor in the row. A query
        whose words are all looked for inside the text (``SearchWords.inside``) has nothing
        to rank by: its matches come newest first, every one of them."""
        if not rooms:
            return []
        words = search_words(query)
        if not self._readonly:  # SqliteHistory's readers: its writer indexed before this
            self.index_pending()
        marks = ",".join("?" * len(rooms))
        filters: list[str] = []
        values: list[object] = []
        for w in words.inside:  # (CJK and the like have no case: folded only with ASCII in)
            filters.append("instr(lower(m.text), lower(?)) > 0" if re.search("[A-Za-z]", w)
                           else "instr(m.text, ?) > 0")
            values.append(w)
        if author:
            filters.append("s.login=?")
            values.append(author)
        if since_ms:
            filters.append("m.ts_ms>=?")
            values.append(since_ms)
        if until_ms:
            filters.append("m.ts_ms<?")
            values.append(until_ms)
        where = [f"r.name IN ({marks})", *filters]
        args: list[object] = [*rooms, *values]
        size = self._q(  # (at most this many rows: ids are dense; two index lookups a room)
            "SELECT COALESCE(SUM((SELECT MAX(id) FROM messages WHERE room = r.id) "
            f"- (SELECT MIN(id) FROM messages WHERE room = r.id) + 1), 0) FROM rooms r "
            f"WHERE name IN ({marks})", tuple(rooms))[0][0]
        if size <= SEARCH_BY_ROOM:
            return self._search_apart(" AND ".join(where), args, words.fts, newest, limit,
                                      offset)
        if not words.fts:
            return self._search_inside(rooms, size, filters, values, limit, offset)
        matches = ("FROM messages_fts f JOIN messages m ON m.seq = f.rowid "
                   "JOIN rooms r ON r.id = m.room JOIN senders s ON s.id = m.sender "
                   "WHERE messages_fts MATCH ? AND " + " AND ".join(where))
        if newest:
            rows = self._q(_COLUMNS + matches + " ORDER BY f.rowid DESC LIMIT ? OFFSET ?",
                           (words.fts, *args, limit, offset))
        else:
            rows = self._q(
                f"WITH w AS (SELECT f.rowid AS seq, bm25(messages_fts) AS score {matches} "
                f"ORDER BY f.rowid DESC LIMIT {RANK_WINDOW}) "
                + _COLUMNS + "FROM w JOIN messages m ON m.seq = w.seq "
                "JOIN rooms r ON r.id = m.room JOIN senders s ON s.id = m.sender "
                "ORDER BY w.score, w.seq DESC LIMIT ? OFFSET ?",
                (words.fts, *args, limit, offset))
        return [_row(r) for r in rows]

    def _search_inside(self, rooms: Sequence[str], size: int, filters: list[str],
                       values: list[object], limit: int, offset: int) -> list[StoredMessage]:
        """``search`` for words the index cannot find (``SearchWords.inside``) alone, newest
        first: every message of the rooms (``size`` at most) is read. Measured 2026-11-25
        on 1,000,000 messages in 20 rooms (bench/search.py, "CJK word", a word found
        nowhere; a CI run beside it): read through the rooms' index, 23 ms for one room of
        50,000, 1.35 s for all 20 (their rows are spread over the file); the whole table
        read in its order, testing each row's room by its id before any join, 180 ms
        whatever the rooms, and 0.1 ms for a page of recent matches. So the table is read
        in its order when the rooms hold a quarter of it or more."""
        marks = ",".join("?" * len(rooms))
        total = self._q("SELECT COALESCE((SELECT MAX(seq) FROM messages) "  # (two lookups)
                        "- (SELECT MIN(seq) FROM messages) + 1, 0)")[0][0]
        if 4 * size >= total:  # (CROSS JOIN keeps this order; "+" keeps the index unused)
            tables = "messages m CROSS JOIN rooms r ON r.id = m.room"
            in_rooms = f"+m.room IN (SELECT id FROM rooms WHERE name IN ({marks}))"
        else:
            tables = "rooms r CROSS JOIN messages m ON m.room = r.id"
            in_rooms = f"r.name IN ({marks})"
        rows = self._q(_COLUMNS + f"FROM {tables} CROSS JOIN senders s ON s.id = m.sender "
                       f"WHERE m.kind IN (1, 2) AND {' AND '.join([in_rooms, *filters])} "
                       "ORDER BY m.seq DESC LIMIT ? OFFSET ?", (*rooms, *values, limit, offset))
        return [_row(r) for r in rows]

    def _search_apart(self, where: str, args: Sequence[object], fts: str, newest: bool,
                      limit: int, offset: int) -> list[StoredMessage]:
        """``search`` in rooms of at most SEARCH_BY_ROOM messages: their messages are indexed
        on their own (the same tokenizer, in memory) and searched there, rather than reading
        every match of the words in every room. (Looking each message up in the big index
        instead cost 70-170 us a message, and ranked 3-6 ms a message, as bm25 recomputes
        its word statistics for each; bench/search.py, 2026-11-22.) Ranked, the words are
        weighed against the caller's rooms, not against every room."""
        texts = self._q("SELECT m.seq, m.text FROM rooms r CROSS JOIN messages m ON "
                        "m.room = r.id JOIN senders s ON s.id = m.sender WHERE m.kind IN "
                        f"(1, 2) AND {where}", args)
        if not texts:
            return []
        if not fts:  # (nothing for the index: every text here matched, newest first)
            order = sorted((r[0] for r in texts), reverse=True)[offset:offset + limit]
        else:
            order = self._rank_apart(texts, fts, newest, limit, offset)
        if not order:
            return []
        rows = {r[-1]: r[:-1] for r in self._q(
            _COLUMNS + ", m.seq " + _FROM + f"WHERE m.seq IN ({','.join('?' * len(order))})",
            order)}
        return [_row(rows[seq]) for seq in order if seq in rows]

    def _rank_apart(self, texts: list[tuple[Any, ...]], fts: str, newest: bool, limit: int,
                    offset: int) -> list[int]:
        """The seqs of ``texts`` (seq, text) matching ``fts`` in an index of their own, one
        page of them newest first or ranked."""
        window = ("SELECT rowid AS seq, bm25(ranked) AS score FROM ranked WHERE ranked MATCH ? "
                  "ORDER BY rowid DESC")
        rk = self._ranker
        try:
            rk.execute("BEGIN")  # (rolled back: the index is empty again at no cost)
            rk.executemany("INSERT INTO ranked (rowid, text) VALUES (?, ?)", texts)
            order = [r[0] for r in rk.execute(
                f"{window} LIMIT ? OFFSET ?" if newest else
                f"WITH w AS ({window} LIMIT {RANK_WINDOW}) "
                "SELECT seq FROM w ORDER BY score, seq DESC LIMIT ? OFFSET ?",
                (fts, limit, offset))]
        except sqlite3.Error as e:
            raise self._error(e) from e
        finally:
            with contextlib.suppress(sqlite3.Error):
                rk.execute("ROLLBACK")
        return order

    # identity -------------------------------------------------------------------------

    def identity(self) -> HistoryIdentity:
        """This history's identity and generation (see ``HistoryIdentity``)."""
        rows = dict(self._q("SELECT key, value FROM meta WHERE key IN "
                            "('history_id', 'generation')"))
        try:
            return HistoryIdentity(str(rows["history_id"]), int(rows["generation"]))
        except (KeyError, ValueError) as e:
            raise StoreError(f"the history database {self.path} has no valid identity "
                             f"({e!r} in its meta table)") from None

    def next_generation(self, above: int = 0) -> HistoryIdentity:
        """Raise the generation past both its own and ``above`` (a restore does this, so
        clients positioned in any earlier generation start over)."""
        with self._tx() as db:
            gen = int(db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            db.execute("UPDATE meta SET value=? WHERE key='generation'",
                       (str(max(gen, above) + 1),))
        return self.identity()

    def counts(self) -> tuple[int, int]:
        """(messages, rooms) stored."""
        (row,) = self._q("SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM rooms)")
        return int(row[0]), int(row[1])

    def copy_to(self, dest: Path) -> None:
        """A consistent copy of the database as of one moment into ``dest`` (which must not
        exist), with ``VACUUM INTO``: one read transaction, so a server writing meanwhile
        is neither blocked nor half-copied (WAL), and the copy is compact, one file, 0600."""
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            # query_only refuses VACUUM INTO, which writes only ``dest``.
            only = int(self._db.execute("PRAGMA query_only").fetchone()[0])
            self._db.execute("PRAGMA query_only=OFF")
            try:
                self._db.execute("VACUUM INTO ?", (str(dest),))
            finally:
                self._db.execute(f"PRAGMA query_only={only}")
            with open(dest, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException as e:
            dest.unlink(missing_ok=True)
            if isinstance(e, sqlite3.Error):
                # A damaged history is said as such: "cannot copy ... to <the backup>: unable
                # to open database" blamed the backup's place (a newcomer, 2026-11-24).
                if _damaged(e):
                    raise damaged(self.path, e) from e
                found = None if full_disk_hint(dest) else quick_check(self.path, within=5)
                if found is not None and found[1] != ["ok"]:
                    raise damaged(self.path, "; ".join(found[1][:3])) from e
                raise StoreError(f"cannot copy the history database {self.path} to {dest}: "
                                 f"{e}{full_disk_hint(dest)}") from e
            if isinstance(e, OSError):
                raise StoreError(f"cannot write {dest}: {e.strerror}{full_disk_hint(dest)}") from e
            raise

    # tokens -------------------------------------------------------------------------

    def record_token(self, row: dict[str, object]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tokens (jti, sub, rooms, admin, iat, exp) "
                       "VALUES (:jti, :sub, :rooms, :admin, :iat, :exp)", row)

    def renew_token(self, row: dict[str, object]) -> None:
        """Record a renewed token: same id, new rights and lifetime (inserted if unknown)."""
        with self._tx() as db:
            db.execute("INSERT INTO tokens (jti, sub, rooms, admin, iat, exp) "
                       "VALUES (:jti, :sub, :rooms, :admin, :iat, :exp) ON CONFLICT (jti) DO "
                       "UPDATE SET rooms=excluded.rooms, admin=excluded.admin, iat=excluded.iat, "
                       "exp=excluded.exp", row)

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._q("SELECT t.jti, t.sub, t.rooms, t.admin, t.iat, t.exp, r.at FROM tokens t "
                       "LEFT JOIN revocations r ON r.jti = t.jti ORDER BY t.iat")
        return [TokenRecord(str(r[0]), str(r[1]), str(r[2]), bool(r[3]), int(r[4]), int(r[5]),
                            None if r[6] is None else int(r[6])) for r in rows]

    def live_tokens(self) -> int:
        """How many tokens on record are neither revoked nor expired (the server's warning
        on a new key)."""
        return int(self._q(LIVE_TOKENS, (int(time.time()),))[0][0])

    def knows_token(self, jti: str) -> bool:
        """Whether a token with this id was issued (or renewed) here."""
        return bool(self._q("SELECT 1 FROM tokens WHERE jti=?", (jti,)))

    def revoke(self, jti: str) -> bool:
        """Revoke a token id (known or not). Returns False if it was already revoked."""
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO revocations (jti, at) VALUES (?, ?)",
                             (jti, int(time.time())))
        return cur.rowcount > 0

    def revocations_since(self, seq: int) -> tuple[list[str], int]:
        rows = self._q("SELECT seq, jti FROM revocations WHERE seq>? ORDER BY seq", (seq,))
        if not rows:
            return [], seq
        return [str(r[1]) for r in rows], int(rows[-1][0])


# --- the server's history: SQLite off the event loop ----------------------------------------

# A message's outcome: stored (or found stored before), or why it was not.
Outcome = Written | StoreError | Refused
Settle = Callable[[Outcome], None]
# What the loop is told of a message: its settle, the outcome, and whether it is the second
# answer of one answered Unconfirmed while a hung disk held its write (``_overdue``).
_Result = tuple[Settle, Outcome, bool]


@dataclass(eq=False)
class _Pending:
    draft: Draft
    then: Settle
    deadline: float
    # Who answers it (under SqliteHistory._claims): the writer thread once it writes it, or
    # the loop, which refuses one still queued after its deadline (``_overdue``).
    claimed: bool = False
    # The loop answered it Unconfirmed while the writer held it in a write (``_overdue``):
    # the writer's outcome is then its second answer.
    answered: bool = False


@dataclass(eq=False)
class _Job:
    run: Callable[[Store], Any]
    future: Future[Any]
    deadline: float


# A deletion's purge (``Store.purge``) rewrites the whole search index: 0.62-0.64 s on
# 1,000,000 messages (bench/README.md), during which nothing else is written. SQLite 3.40's
# FTS5 has no 'secure-delete' (3.42+), and its incremental 'merge' with a negative page count,
# interleaved with inserts, left the index "malformed" (2026-11-22). So the purge waits for
# a pause in writing (PURGE_IDLE without anything to write), one purge covering every
# deletion so far; under writing that never pauses it runs PURGE_WITHIN after the first
# deletion anyway: a deleted text is gone from the file within about that long.
PURGE_IDLE = 0.5
PURGE_WITHIN = 10.0
# New messages are indexed for search in a pause of writing (PURGE_IDLE), or this long after
# the first of them under writing that never pauses, and always before a search.
INDEX_WITHIN = 1.0

MAX_GROUP = 1024  # messages in one transaction at most (see SqliteHistory's max_group)
# How often at most the queue is walked for messages waiting past their deadline
# (SqliteHistory._overdue): a refusal comes up to this much after it.
OVERDUE_STEP = 0.25
# A message the writer holds in a write is answered Unconfirmed this long after its deadline
# (``_overdue``). The writer's own wait for another process's lock ends at the deadline (and
# its "not stored" is the better answer); SQLite's busy handler sleeps at most to the
# timeout it was given, so a writer still inside past this is held by the disk.
IN_WRITE_GRACE = 1.0
PRUNE_STEP = 5000  # rows deleted per transaction, so sends wait at most one step for a prune


def _key(d: Draft) -> tuple[str, str, str]:
    """What makes a resend the same message (``Store._insert``)."""
    return d.room, d.sender.login, d.client_msg_id


def _unexpected(e: Exception) -> StoreError:
    """What the writer thread makes of an error that is not the database's (a bug): logged
    with its traceback; the messages it hit are refused, and the writer goes on."""
    log.error("the history's writer thread: unexpected error", exc_info=e)
    return StoreError(f"this message was not stored: an error in the server ({e!r}); send "
                      "it again, and tell the server's operator if it happens again")


class SqliteHistory:
    """The server's history on threads of its own (see the module doc). Implements
    ``ledger.History``. Create it with ``await SqliteHistory.open(...)`` on the loop that
    will use it; ``submit`` and ``last_id``/``rooms`` are for that loop only."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, *, wait: float,
                 readers: int = 2, max_group: int = MAX_GROUP) -> None:
        self.path = store.path
        self.wait = wait
        # A group is published at once: every subscriber of the room is that far behind for a
        # moment, so it must stay well below the queue limit that cuts slow readers off.
        self.max_group = max_group
        # Seconds a submitted message may wait for others before the writer is woken; the
        # server makes it depend on the loop's load (0: wake at once).
        self.linger: Callable[[], float] = lambda: 0.0
        self._release: asyncio.TimerHandle | None = None
        self._store = store  # the writer thread's
        self.identity = store.identity()  # (a restore needs the server stopped: fixed here)
        self._loop = loop
        self._visible = store.last_ids()  # what the loop has been told is stored
        self._private = store.private_rooms()  # private room -> members (loop's copy)
        self._people = store.people()
        self._queue: deque[_Pending | _Job] = deque()
        self._claims = threading.Lock()  # (_Pending.claimed)
        self._overdue_due: asyncio.TimerHandle | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._unsettled = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._post_lock = threading.Lock()
        self._posted: list[_Result] = []
        # The messages the writer is writing now (under _claims): a hung disk holds them.
        self._writing: list[_Pending] = []
        # Commits of messages, and the messages they held (the writer's; read as metrics):
        # how much group commit gathers (an operator could not see it).
        self.commits = 0
        self.committed = 0
        # Messages refused as overdue that the writer has not taken from the queue yet
        # (under _claims): while there are any, it is held (a hung disk).
        self._stalled = 0
        self._post_due = False
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="tsnetchat-read")
        self._local = threading.local()
        self._reader_dbs: list[Store] = []
        self._reader_lock = threading.Lock()
        self._thread_ids: set[int] = set()
        self._writer = threading.Thread(target=self._run, name="tsnetchat-write", daemon=True)
        self._writer.start()

    @classmethod
    async def open(cls, path: Path, *, fsync: bool = False, wait: float = 5.0,
                   readers: int = 2, max_group: int = MAX_GROUP) -> SqliteHistory:
        """Open (creating or upgrading) the database on a helper thread; raises StoreError."""
        store = await asyncio.to_thread(Store, path, fsync=fsync, timeout=wait)
        return cls(store, asyncio.get_running_loop(), wait=wait, readers=readers,
                   max_group=max_group)

    # writing (from the loop) -----------------------------------------------------------

    def submit(self, draft: Draft, then: Settle) -> None:
        """Queue a message for storing; ``then`` runs on the loop with its outcome, after the
        commit, in submission order (a refusal for waiting past ``wait`` may come before an
        earlier message's outcome: ``_overdue``). Never blocks. While the writer has not come
        back for messages refused as overdue (a hung disk holds it), refused at once."""
        self._unsettled += 1
        self._settled.clear()
        if self._stalled:
            # (each was queued, and kept until the writer came back: the queue grew by every
            # send for as long as the disk hung, and its length was the ledger's count of
            # messages "waiting to be stored", every one of them answered already)
            with self._claims:
                held = any(_key(p.draft) == _key(draft) for p in self._writing)
            why: Outcome = self._unsure() if held and draft.client_msg_id else StoreError(
                "the history database is not taking messages: a write has not returned for "
                f"over {self.wait:g}s (the disk is stalled)")
            self._loop.call_soon(self._settle, [(then, why, False)])
            return
        self._queue.append(_Pending(draft, then, time.monotonic() + self.wait))
        if self._overdue_due is None:
            self._overdue_due = self._loop.call_later(self.wait, self._overdue)
        if self._release is not None and len(self._queue) < self.max_group:
            return  # a wake-up is already due
        linger = self.linger()
        if linger <= 0 or len(self._queue) >= self.max_group:
            self._wake_writer()
        else:
            self._release = self._loop.call_later(linger, self._wake_writer)

    def _overdue(self) -> None:
        """Refuse, as not stored, the messages still queued after their deadline. The writer
        refuses them itself when another process holds the lock; this is for a writer held
        inside a write by a hung disk (not full, not locked: the write blocks), behind which
        every send waited for as long as the disk did (a reliability run, 2026-11-25: none
        of them answered in 30 s frozen, with store_wait 1 s). Those it is writing (and a
        resend of one of them, which the write may yet store) are answered Unconfirmed,
        IN_WRITE_GRACE later: they waited as long."""
        self._overdue_due = None
        now = time.monotonic()
        late: list[_Result] = []
        waiting = [p for p in list(self._queue) if isinstance(p, _Pending)]
        with self._claims:
            held = {_key(p.draft) for p in self._writing if p.draft.client_msg_id}
            writing = [p for p in self._writing if not p.answered]
            for p in writing:
                if p.deadline + IN_WRITE_GRACE <= now:
                    p.answered = True
                    late.append((p.then, self._unsure(), False))
            for p in waiting:
                if not p.claimed and p.deadline <= now:
                    p.claimed = True
                    self._stalled += 1
                    late.append((p.then, self._unsure() if _key(p.draft) in held else StoreError(
                        f"the history database did not take this message within {self.wait:g}s "
                        "(an earlier write has not returned: the disk is stalled, or another "
                        "process holds the database's write lock)"), False))
        left = [p.deadline for p in waiting if not p.claimed]
        left += [p.deadline + IN_WRITE_GRACE for p in writing if not p.answered]
        if left:  # (each walk is of the whole queue: not once per message arriving)
            self._overdue_due = self._loop.call_later(max(OVERDUE_STEP, min(left) - now),
                                                      self._overdue)
        if late:
            self._settle(late)

    def _unsure(self) -> Unconfirmed:
        return Unconfirmed(f"the history database did not finish writing this message within "
                           f"{self.wait:g}s (the disk is stalled); it may still appear. Sending "
                           "it again with the same client_msg_id is safe: it is never stored "
                           "twice")

    def _wake_writer(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        self._wake.set()

    def pending(self) -> int:
        """Messages submitted and not yet settled. (The queue holds no more: those refused
        as overdue stay in it until the writer takes them, and meanwhile ``submit`` queues
        nothing.)"""
        return self._unsettled

    def last_id(self, room: str) -> int:
        """The room's newest stored id that has been settled on the loop."""
        return self._visible.get(room, 0)

    def rooms(self) -> dict[str, int]:
        return dict(self._visible)

    async def caught_up(self, room: str, after: int, within: float | None = None) -> bool:
        """Always: this is the only history (cluster mode's copies may be behind,
        ``ClusterHistory.caught_up``)."""
        return True

    async def drain(self) -> None:
        """Return once every message submitted so far is settled."""
        if not self._settled.is_set():
            self._wake_writer()
        await self._settled.wait()

    def _settle(self, results: list[_Result]) -> None:
        for _then, outcome, _again in results:
            if isinstance(outcome, Written):
                m = outcome.message
                if m.id > self._visible.get(m.room, 0):
                    self._visible[m.room] = m.id
        self._unsettled -= sum(not again for _then, _outcome, again in results)
        if not self._unsettled:
            self._settled.set()
        for then, outcome, _again in results:
            then(outcome)

    async def _job(self, run: Callable[[Store], T]) -> T:
        """Run ``run(store)`` on the writer thread, in order with the messages; StoreError
        once the history is closing (its writer may be gone: a job queued then waited for
        ever; a review, 2026-11-25)."""
        if self._stopping:
            raise StoreError("the history is closed: the server is stopping")
        fut: Future[T] = Future()
        self._queue.append(_Job(run, fut, time.monotonic() + self.wait))
        self._wake.set()
        waiting = asyncio.wrap_future(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), self.wait)
        except TimeoutError:
            # Not begun within ``wait``: behind a write a hung disk holds (a job begun waits
            # for another process's lock itself, up to its deadline). Those waited as long
            # as the disk did: MarkRead, a room's members, a revocation. Once begun, its
            # outcome.
            if fut.cancel():  # (the writer drops a cancelled job)
                raise StoreError(f"the history database did not take this within "
                                 f"{self.wait:g}s (an earlier write has not returned: the "
                                 "disk is stalled, or another process holds the database's "
                                 "write lock)") from None
            return await waiting
        except asyncio.CancelledError:
            waiting.cancel()  # (the caller stopped waiting: its job is dropped, as before)
            raise

    # the writer thread ------------------------------------------------------------------

    def thread_ids(self) -> set[int]:
        """Native ids of the writer and reader threads started so far: they are on every
        message's path (see tsnetchat.loop.yield_helper_threads)."""
        with self._reader_lock:
            return set(self._thread_ids)

    def _run(self) -> None:
        name_thread("tsnetchat-write")
        with self._reader_lock:
            self._thread_ids.add(threading.get_native_id())
        q = self._queue
        deleted_at = 0.0  # when the oldest deletion not yet purged committed
        written_at = 0.0  # when the oldest message not yet indexed for search was written
        store = self._store
        while True:
            due = store.purge_due or store.unindexed
            idle = not self._wake.wait(PURGE_IDLE if due else None)
            self._wake.clear()
            while q:
                if isinstance(q[0], _Job):
                    self._run_job(q.popleft())  # type: ignore[arg-type]
                else:
                    self._write_group()
                store.unindexed = True  # (jobs too: cluster mode imports messages in jobs)
            try:
                if store.unindexed:
                    written_at = written_at or time.monotonic()
                    if idle or self._stopping or time.monotonic() - written_at >= INDEX_WITHIN:
                        written_at = 0.0
                        store.index_pending()
                if self._store.purge_due:
                    deleted_at = deleted_at or time.monotonic()
                    if idle or self._stopping or time.monotonic() - deleted_at >= PURGE_WITHIN:
                        deleted_at = 0.0
                        self._store.purge()
            except Exception:  # a bug: logged, and the writer goes on storing messages
                log.exception("the history's writer thread: indexing or purging failed")
            # (a job queued while this round indexed or purged, before the close began, is
            # run first: it was left in the queue, and its caller waited for ever)
            if self._stopping and not q:
                return

    def _claim(self, p: _Pending) -> bool:
        """Whether the writer answers ``p`` (False: the loop refused it already). Called once
        for each message the writer takes from the queue."""
        with self._claims:
            if p.claimed:
                self._stalled -= 1
                return False
            p.claimed = True
            return True

    def _write_group(self) -> None:
        q = self._queue
        first = q[0]
        assert isinstance(first, _Pending)
        if not self._claim(first):
            q.popleft()
            return
        with self._claims:
            self._writing = [first]
        while True:
            try:
                if len(q) == 1:
                    w = self._store.write_one(first.draft, first.deadline - time.monotonic())
                    if w is not None:
                        self.commits, self.committed = self.commits + 1, self.committed + 1
                        q.popleft()
                        self._post([(first, w)])
                        return
                self._store.begin(max(0.0, first.deadline - time.monotonic()))
                break
            except sqlite3.Error as e:
                if first.deadline > time.monotonic():
                    time.sleep(0.001)  # (never a busy loop, whatever SQLite returned)
                    continue  # a lock timeout set for a later deadline: wait on
                # Still locked: everything waiting now is refused.
                self._refuse_waiting(StoreError(
                    f"the history database did not take this message within {self.wait:g}s "
                    f"({e}: another process holds its write lock, or the disk is stalled)"),
                    first)
                return
            except Exception as e:  # StoreError, or a bug: never the writer thread's end
                err = e if isinstance(e, StoreError) else _unexpected(e)
                if len(q) == 1 and q[0] is first:
                    q.popleft()
                    self._post([(first, err)])
                else:
                    self._refuse_waiting(err, first)
                return
        group: list[_Pending] = [q.popleft()]  # type: ignore[list-item]  # (first)
        while q and len(group) < self.max_group and isinstance(q[0], _Pending):
            p: _Pending = q.popleft()  # type: ignore[assignment]
            if self._claim(p):
                group.append(p)
        with self._claims:
            self._writing = group
        results: list[tuple[_Pending, Outcome]]
        try:
            written = self._store.write_open([p.draft for p in group])
            self.commits, self.committed = self.commits + 1, self.committed + len(group)
            results = list(zip(group, written, strict=True))
        except Exception as e:
            err = e if isinstance(e, StoreError) else _unexpected(e)
            results = [(p, err) for p in group]
        self._post(results)

    def _refuse_waiting(self, error: StoreError, first: _Pending) -> None:
        """Refuse ``first`` (the writer's) and the messages queued behind it that the loop
        has not refused already."""
        results: list[tuple[_Pending, Outcome]] = []
        while self._queue and isinstance(self._queue[0], _Pending):
            p: _Pending = self._queue.popleft()  # type: ignore[assignment]
            if p is first or self._claim(p):
                results.append((p, error))
        self._post(results)

    def _run_job(self, job: _Job) -> None:
        # A caller that stopped waiting (its task cancelled: a client hung up, the server
        # stopping) cancelled the future; its job is dropped, as an executor drops cancelled
        # work. Setting a result on it raised InvalidStateError here and ended this thread
        # (a full CI run, 2026-11-23, on a server closing while a job was queued).
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            self._store.set_timeout(job.deadline - time.monotonic())
            job.future.set_result(job.run(self._store))
        except BaseException as e:
            job.future.set_exception(e)

    def _post(self, results: list[tuple[_Pending, Outcome]]) -> None:
        """Hand the outcomes of the messages the writer took to the loop, which is no longer
        to answer them in its place (``_writing``): one wake-up while the loop has not taken
        the last ones (each wake-up is a write to its self-pipe and a read on the loop)."""
        with self._claims:
            self._writing = []
            answers = [(p.then, outcome, p.answered) for p, outcome in results]
            self._drop_refused()
        with self._post_lock:
            self._posted.extend(answers)
            if self._post_due:
                return
            self._post_due = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(self._take_posted)

    def _drop_refused(self) -> None:
        """Take from the head of the queue the messages the loop refused as overdue while
        the writer was held (and jobs their callers gave up on), before the loop hears that
        the write returned: until the writer came back to them, a send was refused as "not
        taking messages", and a sender told of the first ack after a thaw resent straight
        into that (a hung-disk run under load, 2026-11-25: 1 in 10). Under ``_claims``; the
        writer's own messages are off the queue by then."""
        q = self._queue
        while q:
            head = q[0]
            if isinstance(head, _Pending) and head.claimed:
                self._stalled -= 1
            elif not (isinstance(head, _Job) and head.future.cancelled()):
                return
            q.popleft()

    def _take_posted(self) -> None:
        with self._post_lock:
            results, self._posted = self._posted, []
            self._post_due = False
        self._settle(results)

    async def job(self, run: Callable[[Store], T]) -> T:
        """Run ``run(store)`` on the writer thread, in order with the messages (cluster mode
        writes what it applies from the stream this way)."""
        return await self._job(run)

    async def read(self, fn: Callable[[Store], T]) -> T:
        """Run ``fn(store)`` on a reader thread."""
        return await self._read(fn)

    # reading (reader threads) -----------------------------------------------------------

    def _reader(self) -> Store:
        db: Store | None = getattr(self._local, "db", None)
        if db is None:
            name_thread("tsnetchat-read")
            db = self._local.db = Store(self.path, readonly=True, timeout=self.wait)
            with self._reader_lock:
                self._reader_dbs.append(db)
                self._thread_ids.add(threading.get_native_id())
        return db

    async def _read(self, fn: Callable[[Store], T]) -> T:
        return await asyncio.wrap_future(self._readers.submit(lambda: fn(self._reader())))

    async def after(self, room: str, after_id: int, limit: int) -> list[StoredMessage]:
        return await self._read(lambda s: s.after(room, after_id, limit))

    async def before(self, room: str, before_id: int, limit: int) -> list[StoredMessage]:
        return await self._read(lambda s: s.before(room, before_id, limit))

    async def latest(self, room: str, n: int) -> list[StoredMessage]:
        return await self._read(lambda s: s.latest(room, n))

    async def revocations_since(self, seq: int) -> tuple[list[str], int]:
        return await self._read(lambda s: s.revocations_since(seq))

    async def list_tokens(self) -> list[TokenRecord]:
        return await self._read(lambda s: s.list_tokens())

    async def knows_token(self, jti: str) -> bool:
        return await self._read(lambda s: s.knows_token(jti))

    async def topic(self, room: str) -> Topic | None:
        return await self._read(lambda s: s.topic(room))

    async def topics(self, rooms: Collection[str]) -> dict[str, Topic]:
        return await self._read(lambda s: s.topics(rooms))

    async def read_mark(self, login: str, room: str) -> int:
        return await self._read(lambda s: s.read_mark(login, room))

    async def unread(self, login: str, rooms: Sequence[str]) -> list[RoomState]:
        return await self._read(lambda s: s.unread(login, rooms))

    async def mentions_of(self, login: str, *, include_read: bool, limit: int,
                          rooms: Sequence[str] | None = None) -> list[StoredMessage]:
        return await self._read(lambda s: s.mentions_of(login, include_read=include_read,
                                                        limit=limit, rooms=rooms))

    async def search(self, query: str, rooms: Sequence[str], *, author: str = "",
                     since_ms: int = 0, until_ms: int = 0, newest: bool = False,
                     limit: int = 20, offset: int = 0) -> list[StoredMessage]:
        try:
            await self._job(lambda s: s.index_pending() if s.unindexed else 0)  # up to now
        except StoreError as e:
            # What is indexed is searched, without the newest: a search waiting for the
            # writer was refused for as long as a hung disk held it (everything else that
            # reads was answered at once; a reliability run, 2026-11-25).
            log.info("searching without the newest messages: %s", e)
        return await self._read(lambda s: s.search(
            query, rooms, author=author, since_ms=since_ms, until_ms=until_ms, newest=newest,
            limit=limit, offset=offset))

    def people(self) -> dict[str, str]:
        return dict(self._people)

    def private_members(self, room: str) -> frozenset[str]:
        """A private room's members (from memory); empty when there is no such room."""
        return self._private.get(room, frozenset())

    def private_rooms(self) -> dict[str, frozenset[str]]:
        return dict(self._private)

    # other writes (on the writer thread, between groups) --------------------------------

    async def mark_read(self, marks: Sequence[tuple[str, str, int]]) -> None:
        await self._job(lambda s: s.mark_read(marks))

    async def set_members(self, room: str, by: str, add: Sequence[str], remove: Sequence[str],
                          *, create: bool = False, within: float | None = None
                          ) -> frozenset[str]:
        # (``within`` is not needed here: a job waits at most ``wait``, the store_wait.)
        def change(s: Store) -> frozenset[str]:
            members = s.set_members(room, by, add, remove, create=create)
            # The loop's copy follows the commit whether or not the caller still waits (set
            # after the await, a caller cancelled while the lock was held kept a removed
            # member in the room until a restart). Queued before the caller's result.
            self._loop.call_soon_threadsafe(self._private.__setitem__, room, members)
            return members

        return await self._job(change)

    async def revoke(self, jti: str, *, within: float | None = None) -> bool:
        return await self._job(lambda s: s.revoke(jti))

    async def record_token(self, row: dict[str, object]) -> None:
        await self._job(lambda s: s.record_token(row))

    async def renew_token(self, row: dict[str, object]) -> None:
        await self._job(lambda s: s.renew_token(row))

    async def prune(self, *, keep_count: int, keep_days: float,
                    now: float | None = None) -> int:
        """Apply retention in steps of PRUNE_STEP rows, so messages never wait long for it."""
        total = 0
        while True:
            n = await self._job(lambda s: s.prune(keep_count=keep_count, keep_days=keep_days,
                                                  now=now, max_rows=PRUNE_STEP))
            total += n
            if n < PRUNE_STEP:
                return total

    async def close(self) -> None:
        """Settle what was submitted, stop the threads, close the connections."""
        await self.drain()
        if self._overdue_due is not None:
            self._overdue_due.cancel()
            self._overdue_due = None
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._close_threads)

    def _close_threads(self) -> None:
        # Off the loop: joining waits for a read in progress, and the last connection to
        # close checkpoints the WAL.
        self._writer.join()
        self._readers.shutdown(wait=True)
        for db in [*self._reader_dbs, self._store]:
            db.close()


def _span(seconds: int) -> str:
    """``seconds`` as a person says it: "15 minutes", "2 hours", "90 seconds"."""
    for unit, size in (("day", 86_400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"
