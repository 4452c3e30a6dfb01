"""Cluster mode: the history on a NATS JetStream cluster (``serve --cluster nats://...``).

Every tsnetchat server of a cluster is equal. The messages of all rooms are one R3 stream
(``STREAM``), a subject per room (``tsnetchat.msg.room.<room>``); docs/nats-cluster.md has
the measured facts this relies on ("fact N" below).

* **Writing** (``ClusterHistory.submit``, the ledger's ``History``): drafts queue per room; one
  appender per room sends what queued up as one atomic batch (fact 8), numbered from the
  room's last id, the first message expecting the room's last stream sequence (fact 6). The
  expectation serialises appends to a room across servers: ids have no gaps and no
  doubles. A refusal naming another sequence (10071) means another server got in first:
  wait until that is applied here, drop what turned out to be resends, renumber, retry.
  Retrying an unconfirmed batch is harmless for the same reason (fact 5).
* **Applying** (every server, ordered consumer from the last applied sequence, fact 12):
  messages go into this server's SQLite copy (``Store.import_messages``, with the stream
  position in the same transaction), then to the ledger (``on_applied``), in stream order,
  which publishes them to the local hub. A draft of our own is settled (published and
  acknowledged by the ledger) when it is applied, so the sender's ack comes after
  JetStream's quorum ack AND after the local copy has it. A copy that cannot take it by the
  draft's deadline (another process holds its write lock, a full
  disk) gets its sender refused as ``Unconfirmed`` (``_too_late``); the draft stays until it
  is applied, then reaches the room, and a resend meanwhile waits for it. A
  consumer that stops delivering while the stream moves on is replaced
  (``_watch_consumer``); a server stopping does not wait for it longer than ``wait``.
* **Resends** are found in the local copy by (room, sender login, client_msg_id), exact for
  as long as history is kept (not JetStream's 2-minute dedup window, fact 7), plus the
  drafts still in flight here.
* **No quorum**: a batch is retried until ``wait`` seconds (covering a leader election,
  fact 2), then refused with ``Unconfirmed``: it may still appear (fact 5), and a resend with
  the same client_msg_id is answered with its id, never stored twice.
* **Shared state in KV**: revoked token ids (``REVOKED``, watched by every server, and
  announced on ``REVOCATIONS`` once stored: streams close on all servers when one
  revokes), the token signing key (``STATE``), so a token issued by one server is good on
  all (a rotation on one is adopted by all: ``share_key``,
  ``follow_key``), and the servers themselves (``register``), which
  every Welcome lists so clients can fail over; presence (``PRESENCE``, entries that expire
  unless their server keeps them fresh). Kicks are stored for a minute in ``KICKS``,
  which every server follows from when it starts (``kick``, ``_Kicks``). The kicks, the
  revocations and the private rooms are followed anew when their bucket stays ahead of
  what was taken here (``_keep_up``: a delivery lost with a NATS node is never sent
  again). Each server also charges a person's rate bucket for what they sent through the
  others (``on_applied``).

Reads (history, resume, ListRooms) are answered from the local copy. nats-py errors are
translated here and nowhere else.

A team's day (issue 15): a DM is a room (``dm:<logins>``) of the same stream through the
same appender; mentions ride with each message (``_encode``) and are imported with it; read
positions are KV keys (``READS``) raised with compare-and-set and applied to every local
copy; search, unread and mention lists run on the local copy; a topic is a TOPIC message of
the room, imported into each copy's topics.

* **Edits and deletions** are messages of the room's subject too, each appended alone: the
  appender waits until the local copy has applied the room up to the sequence it expects,
  decides the change there (``Store.decide_change``: author, edit window, admin), and
  appends it with what the decision rests on (admin, window); if the append lands, nothing
  came in between, so every copy's import decides it the same way and applies it with the
  store's own code (``Store.import_messages``: tombstone, search index, purge). A deletion
  carries the stream sequences of its target and the target's edits (each copy keeps a
  text's sequence) and their rows without text, so a copy that never had them (erased
  before it caught up: the ordered consumer skips erased sequences) still gets the
  tombstones. Every server that applies a deletion erases those sequences from the stream
  (a secure delete, fact 14; again harmless: 10043), so it happens even if the sender died.
* **Private rooms**: members live in KV (``ROOMS``, one entry per room, created and changed
  with compare-and-set) rather than in the room's subject: the stream's retention
  (``max_age``, ``max_msgs_per_subject``) would drop a room's membership from a subject,
  and a server rebuilding its copy would then take a private room for an open one. Every
  server applies the entries to its copy (before serving, at start-up) and closes the
  streams of members removed through another server (``on_removed``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import stat
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig, StreamConfig

from .config import ServerConfig
from .errors import ConfigError, InvalidInput, StoreError, Unconfirmed
from .ledger import MAX_ID
from .loop import cancel_all
from .pb import chat_pb2 as pb
from .store import (
    DELETE,
    EDIT,
    Draft,
    HistoryIdentity,
    Imported,
    Outcome,
    Refused,
    RoomState,
    Sender,
    Settle,
    SqliteHistory,
    Store,
    StoredMessage,
    TokenRecord,
    Topic,
    Written,
    resent,
)
from .throttle import LogLimiter

log = logging.getLogger("tsnetchat.cluster")

STREAM = "TSNETCHAT"
PREFIX = "tsnetchat.msg."
ROOM_PREFIX = PREFIX + "room."
REVOKED = "tsnetchat-revoked"  # KV: token id -> revocation time
STATE = "tsnetchat-state"  # KV: signing-key, server.<name> (where clients reach it)
# KV used as a short log: <kick id> -> {id, room, login, by, o}, kept KICK_TTL seconds.
# Every server follows it from when it starts with an ordered consumer (``_follow``, as the
# stream's applier), so a server that was reconnecting to NATS when a kick was made gets
# it once back; the Kick call answers after a quorum stored it. (A plain core-NATS subject
# before: a kick made while another server reconnected was lost there, and the admin was
# told it worked; once in 9 tries of a kill -9 run, 2026-11-25.)
KICKS = "tsnetchat-kicks"
KICK_TTL = 60
# core NATS: {room, login, by, o}: where servers of the release before KICKS send and take
# kicks. Sent there too, and taken from there when it has no "id" (an old server's: ours
# are in KICKS as well), so a kick made on either side of a rolling upgrade closes the
# streams on both (one made on an old server reached no new one, nor the reverse).
OLD_KICKS = "tsnetchat.ctl.kick"
# Seconds between looks at the last sequence of the kicks' and the revocations' buckets
# (``_keep_up``: what a lost delivery left behind).
KICKS_CHECK = 2.0
# core NATS: {jti}, published once a revocation is in REVOKED: the other servers close its
# streams at once, not when their watch of REVOKED has it. That watch is an R1 consumer
# that lives on the bucket's stream leader; when that node died it was re-created only
# after two missed 5 s heartbeats (nats-py), and a revocation made after the election
# reached the other server 9-15 s after the kill (lab, 2026-11-23: 3 of 5 runs of
# test_a_token_revoked_through_server_2_... past its 10 s). The watch stays: it is what
# catches up a server that missed the message; and it is watched itself (``_keep_up``), as
# it loses a delivery for good as the kicks' consumer does (``_watch_kicks``).
REVOCATIONS = "tsnetchat.ctl.revoked"
# KV: <room>.<server process>.<login, base64url> -> Identity, for as long as that server
# keeps it fresh: a server that dies takes its members with it within PRESENCE_TTL
# (docs/nats-cluster.md fact 13).
PRESENCE = "tsnetchat-presence"
# KV: <login, base64url>.<room, base64url> -> the newest id that person has read there (per
# person, not per device), only ever raised (compare-and-set); every server applies it to
# its local copy's read positions, so unread counts agree on all servers.
READS = "tsnetchat-reads"
# KV: <room, base64url> -> {"room", "by", "members"}: a private room's members (issue 15),
# changed with compare-and-set; every server applies it to its local copy.
ROOMS = "tsnetchat-rooms"
PRESENCE_TTL = 30
PRESENCE_REFRESH = 10.0
READS_RETRY = 1.0  # seconds between tries to share read positions the cluster did not take
SOURCE = "nats:" + STREAM  # the local copy's name for how far the stream is applied
MAX_BATCH = 256  # messages per atomic batch (JetStream allows 1,000)
MAX_BATCHES_IN_FLIGHT = 32  # JetStream allows 50 per stream
ATTEMPT_TIMEOUT = 2.0  # one attempt at a batch or a request's KV write; then again
CONSUMER_STALL = 5.0  # seconds without anything applied before the stream is asked
# Messages of the stream the applier takes at once, at most: the consumer's callback waits
# for it past them. Unbounded, a new copy of 100,000 messages (58 MB in the stream) was
# imported in 8 transactions of up to 61,859, each decoded whole: the process grew by
# 184 MB; bounded, by 72 MB (a lab run, 2026-11-25). What comes meanwhile waits in
# nats-py's queue of the subscription (it answers JetStream's flow control by itself when
# the consumer stalls: 24,830 messages queued while one import was held 20 s), which is
# why ``_follow`` lifts that queue's limits: past them nats-py drops messages, and an
# ordered consumer never delivers a dropped one again.
INBOX_MAX = 5_000
# A draft the stream acknowledged at its deadline still gets this long to be applied here
# (normally a few ms) before its sender is told it is late.
APPLY_GRACE = 0.5
WRONG_LAST_SEQUENCE = 10071
# The same refusal with no sequence: an earlier append to the room's subject (this one's
# last attempt, or another server's) is still in flight in the stream, waiting for its
# quorum; tried again until the deadline. Its words
# ("wrong last sequence (10164)") reached people as the reason (a kill -9 run, 2026-11-24).
IN_FLIGHT = 10164
# A request to the stream's subjects that nobody answers is no quorum, or no stream at all
# (deleted under the running servers: said to be no quorum, for good). The stream's info,
# asked once a batch for at most GONE_ASK seconds, tells them apart: 10059 "stream not
# found" comes at once from the cluster's meta leader (without a quorum: no answer).
STREAM_NOT_FOUND = 10059
# "stream name already in use with a different configuration": a bucket made otherwise than
# this server makes it (by hand, or by a release that made it differently).
DIFFERENT_CONFIG = 10058
GONE_ASK = 0.25
_LAST = re.compile(r"wrong last sequence: (\d+)")
CHANGES = (EDIT, DELETE)  # decided against the room's history before they are appended
# JetStream's answer to erasing a sequence it does not hold (erased already, aged out):
# 10043 "sequence N not found" (nats-server 2.15.2, seen 2026-11-22), or 10037.
NO_MESSAGE = (10043, 10037)
CREDS_MARK = "-----BEGIN NATS USER JWT-----"


async def _shared(kv: Any, name: str, value: bytes) -> bytes:
    """The cluster's value of ``name``: ``value`` if we are the first to set it, else the
    one that was set first."""
    try:
        await kv.create(name, value)
        return value
    except nats.js.errors.KeyWrongLastSequenceError:
        entry = await kv.get(name)
        return bytes(entry.value)


async def _entries(watcher: Any, what: str, *,
                   ready: asyncio.Event | None = None) -> AsyncIterator[Any]:
    """A KV watcher's entries, for as long as the server runs (the end-of-history marker
    left out; it sets ``ready``, once the entries before it have been handled). nats-py's
    watcher recovers from a lost connection on its own, so an error is logged and the
    watcher asked again."""
    while True:
        try:
            # (Not ``watcher.updates()``: its ``asyncio.wait_for`` returns an entry that
            # arrives as the task is cancelled and drops the cancellation (Python 3.11), so a
            # stopping server waited for ever on the entry its own leaving the list of servers
            # made: the intermittent hang in cluster tests' stop, 7 of 47 of them in one run
            # once close() waited on its tasks with gather, 2026-11-24.)
            entry = await anext(watcher)
        except StopAsyncIteration:  # (the watcher was stopped)
            return
        except Exception as e:
            log.debug("%s watch: %r", what, e)
            await asyncio.sleep(0.5)
            continue
        if entry is not None:
            yield entry
        elif ready is not None:
            ready.set()


def _keep_revoked(jtis: list[str], store: Store) -> None:
    for jti in jtis:
        store.revoke(jti)


async def _quiet(e: Exception) -> None:
    """nats-py prints a traceback for every reconnect unless it is given an error callback."""
    log.debug("nats: %r", e)


def connect_options(cfg: ServerConfig, env: dict[str, str] | None = None) -> dict[str, Any]:
    """nats-py's connect arguments from the config: servers, and the credentials from the
    config, a file (``nats_credentials``) or the ``nats`` systemd credential. A .creds file
    (user JWT and nkey) is passed as one; any other file holds the password."""
    env = dict(os.environ) if env is None else env
    opts: dict[str, Any] = {"servers": cfg.cluster_urls}
    path = cfg.nats_credentials
    where = cfg.where("nats_credentials")
    if not path and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"].split(":")[0]) / "nats"
        if candidate.is_file():
            path, where = str(candidate), "the systemd credential `nats`"
    password = cfg.nats_password
    if path:
        try:
            mode = stat.S_IMODE(Path(path).stat().st_mode)
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from None
        if mode & 0o077 and path == cfg.nats_credentials:
            # (whoever reads it reads the cluster's signing key from NATS, and can mint
            # tokens: the same rule as for the key file; an operator's run, 2026-11-23)
            raise ConfigError(f"{where}: {path} is readable by others (mode {mode:04o}); "
                              f"anyone who reads it can reach the cluster's signing key. Fix "
                              f"it with `chmod 600 {path}`")
        if CREDS_MARK in text:
            opts["user_credentials"] = path
        else:
            password = text.strip()
    if password:
        if not cfg.nats_user:
            raise ConfigError(f"{cfg.where('nats_user')}: a NATS password is given but no "
                              "user name")
        opts["user"], opts["password"] = cfg.nats_user, password
    return opts


async def anyone_may_connect(servers: list[str]) -> bool:
    """Whether the NATS at ``servers`` lets in a connection that gives no credentials. Such
    a NATS hands the cluster's signing key (the state bucket) to whoever reaches it, who can
    then mint tokens, and takes messages published as anyone's (an attacker's run,
    2026-11-25: a token minted for mallory answered admin from her laptop, and a message
    put on a room's subject was shown to bob as alice's). Asked with one connection of its
    own; anything but being let in counts as no."""
    probe = NATS()
    try:
        await asyncio.wait_for(probe.connect(
            servers=servers, error_cb=_quiet, allow_reconnect=False, connect_timeout=2,
            name="tsnetchat credential check"), 5)
    except (nats.errors.Error, OSError, TimeoutError):
        return False
    with contextlib.suppress(nats.errors.Error, OSError):
        await probe.close()
    return True


def _wider(a: int, b: int) -> int:
    """The larger of two stream limits, where 0 or less is no limit."""
    return -1 if a <= 0 or b <= 0 else max(a, b)


def _encode(d: Draft, msg_id: int, ts_ms: int, origin: str,
            erased: Sequence[tuple[int, StoredMessage]] = ()) -> bytes:
    o: dict[str, object] = {"id": msg_id, "ts": ts_ms, "l": d.sender.login,
                            "d": d.sender.display_name, "n": d.sender.node, "k": d.kind,
                            "t": d.text, "c": d.client_msg_id, "o": origin}
    if d.mentions or d.kind == EDIT:  # recognised by the sender's server (the ledger),
        o["m"] = list(d.mentions)  # stored by every copy; an edit's, even none (Imported)
    if d.kind in CHANGES:  # decided alike by every copy (Store.import_messages)
        o.update(g=d.target, a=d.admin, w=d.edit_window_ms)
    if erased:  # a deletion: what it erases from the stream, and tombstones for copies
        o["x"] = [{"s": seq, "id": m.id, "ts": m.ts_ms, "k": m.kind, "l": m.sender.login,
                   "d": m.sender.display_name, "n": m.sender.node, "c": m.client_msg_id,
                   "g": m.target, "e": m.edited_ms} for seq, m in erased]
    return json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(subject: str, data: bytes, seq: int) -> tuple[Imported, str, list[int]]:
    """A message of the stream at ``seq``, the origin tag of the server that sent it, and
    (a deletion) the stream sequences it erases."""
    if not subject.startswith(ROOM_PREFIX):
        raise ValueError(f"not a room subject: {subject}")
    room = subject[len(ROOM_PREFIX):]
    o = json.loads(data)
    kind, login = int(o["k"]), str(o["l"])
    erased = [(int(x["s"]), StoredMessage(
        room, int(x["id"]), int(x["ts"]), Sender(str(x["l"]), str(x["d"]), str(x["n"])),
        int(x["k"]), "", str(x["c"]), int(x["g"]), edited_ms=int(x["e"])))
        for x in o.get("x", ())]
    mentions = tuple(sorted(str(x) for x in o.get("m", ())))
    m = StoredMessage(room, int(o["id"]), int(o["ts"]), Sender(login, str(o["d"]), str(o["n"])),
                      kind, str(o["t"]), str(o["c"]), target=int(o.get("g", 0)),
                      mentions=mentions if kind != EDIT else (),  # (an edit's: its target's)
                      deleted_by=login if kind == DELETE else "")
    erases = [s for s, _ in erased if s > 0]
    return (Imported(m, seq, bool(o.get("a", False)), int(o.get("w", 0)),
                     tuple(r for _, r in erased), tuple(erases),
                     edit_mentions=mentions if "m" in o or kind != EDIT else None),
            str(o.get("o", "")), erases)


@dataclass(eq=False)
class _Pending:
    draft: Draft
    then: Settle | None  # None once its sender was refused (``_too_late``)
    deadline: float
    origin: str
    resends: list[Settle] = field(default_factory=list)  # the same message sent again
    done: bool = False
    # Acknowledged by the stream: applied here sooner or later, whoever still waits for it.
    stored: bool = False
    # The deadlines of those who wait (``_bound``), cancelled once it is settled: a timer
    # per message lived for ``cluster_wait`` after its application (a review, 2026-11-25).
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class _Kicks:
    """Which kicks of the KICKS bucket this server applies: those stored after it began to
    follow the bucket (stream sequence above ``after``: a kick is a moment, not a ban, so
    one made before this server started never throws out someone who joined again since),
    each once (nats-py re-creates a lost consumer from after its last delivery, or from
    the start if it delivered none; a publish retried after a time-out beyond the bucket's
    duplicate window is stored twice), and not this server's own (``me``: closed here
    before they were published)."""

    def __init__(self, me: str, after: int = 0) -> None:
        self.me, self.after = me, after
        self._ids: dict[str, None] = {}  # the latest kick ids taken, oldest first

    def take(self, seq: int, data: bytes) -> tuple[str, str, str] | None:
        """The (room, login, by) to close streams for, given the kick stored at ``seq``;
        None for one to skip."""
        if seq <= self.after:
            return None
        self.after = seq
        if not data:  # (a purge or delete marker: nats CLI by hand)
            return None
        try:
            k = json.loads(data)
            kid, origin = str(k["id"]), k.get("o")
            kick = (str(k["room"]), str(k["login"]), str(k["by"]))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cluster: ignoring a malformed kick: %s", e)
            return None
        if kid in self._ids or origin == self.me:
            return None
        self._ids[kid] = None
        if len(self._ids) > 1000:
            del self._ids[next(iter(self._ids))]
        return kick


class _Watched:
    """A KV bucket's watch (nats-py's: an ordered consumer) that is asked for again when it
    lost an entry: ``run`` hands each entry to ``handle`` in order (the end-of-history
    marker sets ``ready``) and keeps the newest revision handed (``taken``);
    ``ClusterHistory._keep_up`` calls ``again`` when the bucket stays ahead of it, which
    watches the bucket anew from its start (``handle`` must take an entry twice)."""

    def __init__(self, kv: Any, what: str, handle: Callable[[Any], Awaitable[None]],
                 tasks: list[asyncio.Task[Any]], ready: asyncio.Event | None = None) -> None:
        self.kv, self.what, self.handle, self.ready = kv, what, handle, ready
        self.tasks = tasks  # (the owner's: cancelled when it closes)
        self.watcher: Any = None
        self.taken = 0

    def start(self, watcher: Any) -> None:
        self.watcher = watcher
        self.tasks.append(asyncio.create_task(self.run(watcher)))

    async def run(self, watcher: Any) -> None:
        async for entry in _entries(watcher, self.what, ready=self.ready):
            await self.handle(entry)
            self.taken = max(self.taken, int(entry.revision or 0))

    async def again(self) -> None:
        old = self.watcher
        self.start(await self.kv.watchall())
        if old is not None:
            with contextlib.suppress(Exception):
                await old.stop()


class ClusterHistory:
    """The ledger's ``History`` on a JetStream cluster, with ``local`` (this server's SQLite)
    as the copy reads come from. Construct on the serving loop; ``start`` connects, creates
    the stream and KV buckets if needed, adopts the cluster's signing key, and returns once
    the local copy has caught up with the stream; ``close`` settles what is in flight."""

    def __init__(self, local: SqliteHistory, cfg: ServerConfig) -> None:
        self.local, self.cfg = local, cfg
        self.wait = cfg.cluster_wait
        self._replicas = cfg.cluster_replicas  # the cluster's once ``start`` has its stream
        self._gone_log = LogLimiter(burst=1, rate=1 / 60)  # (``_gone``: every batch finds it)
        self.path = local.path
        self.identity = local.identity  # the cluster's, once ``start`` has read it
        # Called with token ids revoked anywhere in the cluster (the server closes streams).
        self.on_revoked: Callable[[list[str]], object] = lambda ids: None
        self._nc = NATS()
        self._js = self._nc.jetstream()
        # For the buckets people's requests write to (revocations, private rooms): a lost
        # request costs an attempt, not the default 5 s, so several fit in ``cluster_wait``
        # (a replica catching up after a restart ignores direct gets: they time out).
        self._js_attempt = self._nc.jetstream(timeout=ATTEMPT_TIMEOUT)
        self._me = uuid.uuid4().hex[:12]  # this process, in the origin tags of its messages
        self._n = 0
        self._queues: dict[str, deque[_Pending]] = {}
        self._appenders: dict[str, asyncio.Task[None]] = {}
        self._mine: dict[str, _Pending] = {}  # origin tag -> draft not yet applied
        self._inflight: dict[tuple[str, str, str], _Pending] = {}  # (room, login, cmid)
        self._unsettled = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._slots = asyncio.Semaphore(MAX_BATCHES_IN_FLIGHT)
        # What has been applied: stream position, each room's last id and stream sequence.
        self._applied = 0
        self._last_ids: dict[str, int] = local.rooms()
        self._last_seqs: dict[str, int] = {}
        self._progress = asyncio.Condition()
        # The appenders' view: (last id, its stream sequence), ahead of the applied one by
        # our own batches acknowledged and not yet applied.
        self._heads: dict[str, tuple[int, int]] = {}
        self._inbox: list[Any] = []
        self._inbox_ready = asyncio.Event()
        self._inbox_room = asyncio.Event()  # set while the inbox holds under INBOX_MAX
        self._inbox_room.set()
        # The stream's consumer (``_subscribe``); messages of an older one are dropped.
        self._consumer: Any = None
        self._generation = 0
        # The stream's last sequence when the consumer was last found stalled (one new
        # consumer per sequence: an emptied stream's last sequence is never delivered).
        self._stall_checked = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._subs: list[Any] = []
        self._kv_revoked: Any = None
        self._kv_state: Any = None
        self._kv_reads: Any = None
        # READS keys -> positions the cluster did not take (no quorum): shared again until
        # it does, so every server's unread counts converge once it returns.
        self._unshared_reads: dict[str, int] = {}
        # Everybody whose message has been applied here: login -> display name (mentions).
        self._senders: dict[str, str] = {}
        # Called with the sender of each message applied from another server (the ledger
        # learns who can be mentioned).
        self.on_sender: Callable[[Sender], object] = lambda sender: None
        # Token ids in the revocations bucket (as the watch has them), and those revoked in
        # the local database (`tsnetchat token revoke` on this machine) that the cluster has
        # not taken yet: shared again every second until it does. Once the watch has the
        # bucket's contents (``_revocations_known``), every local revocation is checked
        # once: those made while this server was down, or while NATS had no quorum.
        self._shared_revocations: set[str] = set()
        self._unshared_revocations: set[str] = set()
        self._revocations_known = asyncio.Event()
        self._local_revocations_checked = False
        self._copy_error = ""  # why the local copy could not be written, while it cannot
        self._importing_since = 0.0  # when the applier began its current write (0: idle)
        self._to_keep: list[str] = []  # revocations taken, not yet in the local copy
        self._keep_wake = asyncio.Event()
        # The servers of the cluster (``register``), as clients may reach them: name -> port.
        self.servers: dict[str, int] = {}
        self.server_nodes: dict[str, str] = {}  # name -> stable node id, as it registered
        self._registered = ""
        self._watching_servers = False  # (``register``: the servers' watch runs once)
        # Called with each message applied here that no sender here is waiting for, to make
        # it visible: another server's (``ours`` False), or one of this server's whose sender
        # was refused before this copy had it (``_too_late``). The server assembles it with
        # the ledger (``Ledger.applied``), which counts it, charges a foreign sender's rate
        # limit and publishes it: the one place a message becomes visible.
        self.on_applied: Callable[[StoredMessage, bool], object] = lambda m, ours: None
        # Presence on the other servers: room -> key -> who; and ours, kept fresh.
        self._elsewhere: dict[str, dict[str, pb.Identity]] = {}
        self._here: dict[str, bytes] = {}
        self._presence_writes: set[asyncio.Task[None]] = set()
        # Called when someone joins the room on another server, or has left it everywhere
        # else: (room, PRESENCE_KIND_*, who).
        self.on_presence: Callable[[str, int, pb.Identity], object] = lambda r, k, w: None
        # Called when a person is kicked through another server: (room, login, by whom).
        self.on_kick: Callable[[str, str, str], object] = lambda room, login, by: None
        self._kicks = _Kicks(self._me)
        self._kick_sub: Any = None  # the kicks' consumer (``_follow``)
        # Stream sequences of deleted messages still to be erased from the stream.
        self._erasing: deque[int] = deque()
        self._erase_ready = asyncio.Event()
        # Private rooms (ROOMS): the revision of each room's entry applied to the local copy,
        # changes applied one at a time; called with (room, logins, by whom) when members
        # are removed through another server (their streams here close).
        self._kv_rooms: Any = None
        self._room_revs: dict[str, int] = {}
        self._rooms_lock = asyncio.Lock()
        self.on_removed: Callable[[str, frozenset[str], str], object] = lambda r, gone, by: None

    # start / stop ------------------------------------------------------------------------

    async def _lost(self) -> None:
        # (a NATS node's death was not in the journal at all: an operator's run, 2026-11-24)
        if not self._nc.is_closed:  # (not our own close at shutdown)
            log.warning("cluster: lost the connection to NATS; reconnecting (sends wait for "
                        "it, up to cluster_wait)")

    async def _back(self) -> None:
        url = self._nc.connected_url
        log.warning("cluster: connected to NATS again (%s:%s)", url.hostname if url else "?",
                    url.port if url else "?")

    async def start(self, key: bytes, timeout: float) -> bytes:
        """Connect and catch up (see the class doc). Returns the cluster's signing key: ours
        if we are the first server, else the one the first server put there. Raises
        StoreError if the cluster cannot be reached or used within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        opts = connect_options(self.cfg)
        try:
            # (within the start-up time: unreachable, or refusing the password, it waited
            # for ever without a word; an operator's run, 2026-11-23)
            connecting = self._nc.connect(
                **opts, error_cb=_quiet, disconnected_cb=self._lost, reconnected_cb=self._back,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.1,  # type: ignore[arg-type]
                connect_timeout=2, name=f"tsnetchat {self.cfg.hostname}")
            await asyncio.wait_for(connecting, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise StoreError(f"cannot reach the NATS cluster at {self.cfg.cluster} within "
                             f"{timeout:g}s (startup_timeout): is it up, and are nats_user "
                             "and its password right?") from None
        except (nats.errors.Error, OSError) as e:
            raise StoreError(f"cannot reach the NATS cluster at {self.cfg.cluster}: {e}") from e
        if await anyone_may_connect(opts["servers"]):
            raise StoreError(
                f"the NATS cluster at {self.cfg.cluster} lets in connections without "
                "credentials: whoever reaches it could read the cluster's signing key (and "
                "make tokens) and post messages as anyone. Give NATS an authorization block "
                "(users, or accounts with .creds), and this server its nats_user and password "
                "or nats_credentials (README: Cluster mode)")
        retention = self.cfg.retention_count or -1
        stream = StreamConfig(name=STREAM, subjects=[PREFIX + ">"],
                              num_replicas=self.cfg.cluster_replicas, allow_atomic=True,
                              max_msgs_per_subject=retention,
                              max_age=self.cfg.retention_days * 86400 or None)
        # How far the copy is, known before anything is made in the cluster: a copy ahead
        # of the stream is refused there (``_ensure_stream``).
        self._applied = await self.local.read(lambda s: s.applied(SOURCE))
        info = await _retrying(lambda: self._ensure_stream(stream), deadline, "the stream")
        self._replicas = info.config.num_replicas or self.cfg.cluster_replicas  # (the buckets')
        kv_state = await _retrying(lambda: self._js.create_key_value(KeyValueConfig(
            bucket=STATE, replicas=self._replicas, history=1)), deadline,
            "the state bucket")
        self._kv_revoked = await _retrying(lambda: self._js_attempt.create_key_value(KeyValueConfig(
            bucket=REVOKED, replicas=self._replicas, history=1)), deadline,
            "the revocations bucket")
        key = await _retrying(lambda: _shared(kv_state, "signing-key", key), deadline,
                              "the signing key")
        # One identity for the whole cluster: a client that fails over to another server
        # resumes in the same history (each server's local copy has its own).
        made = uuid.uuid4().hex.encode()
        self.identity = HistoryIdentity((await _retrying(
            lambda: _shared(kv_state, "history-id", made), deadline, "the history id"
        )).decode(), 1)
        self._kv_state = kv_state
        kv_kicks = await _retrying(lambda: self._js.create_key_value(KeyValueConfig(
            bucket=KICKS, replicas=self._replicas, history=1, ttl=KICK_TTL)),
            deadline, "the kicks bucket")
        self._kicks.after = (await _retrying(kv_kicks.status, deadline, "the kicks bucket")
                             ).stream_info.state.last_seq
        self._kick_sub = await _retrying(self._follow_kicks, deadline, "the kicks' consumer")
        self._tasks.append(asyncio.create_task(self._watch_kicks()))
        self._subs.append(await self._nc.subscribe(OLD_KICKS, cb=self._on_old_kick))
        self._subs.append(await self._nc.subscribe(REVOCATIONS, cb=self._on_revocation))
        kv_presence = await _retrying(lambda: self._js.create_key_value(KeyValueConfig(
            bucket=PRESENCE, replicas=self._replicas, history=1,
            limit_marker_ttl=PRESENCE_TTL)), deadline, "the presence bucket")
        self._tasks.append(asyncio.create_task(self._watch_presence(await _retrying(
            kv_presence.watchall, deadline, "the presence watch"))))
        self._tasks.append(asyncio.create_task(self._refresh_presence()))
        self._kv_reads = await _retrying(lambda: self._js.create_key_value(KeyValueConfig(
            bucket=READS, replicas=self._replicas, history=1)), deadline,
            "the read positions bucket")
        self._tasks.append(asyncio.create_task(self._watch_reads(await _retrying(
            self._kv_reads.watchall, deadline, "the read positions watch"))))
        self._tasks.append(asyncio.create_task(self._reshare_reads()))
        # Deletions applied here whose erasure this server did not see confirmed (killed
        # right after applying one): erased now, whoever else erased them already.
        self._erasing.extend(await self.local.read(lambda s: s.to_erase()))
        self._erase_ready.set()
        # (An emptied stream, every message aged out, has nothing at its last sequence.)
        target = info.state.last_seq if info.state.messages else self._applied
        self._tasks.append(asyncio.create_task(self._apply_loop()))
        self._consumer = await _retrying(lambda: self._subscribe(self._applied), deadline,
                                         "the stream's consumer")
        self._tasks.append(asyncio.create_task(self._watch_consumer()))
        self._tasks.append(asyncio.create_task(self._keep_revocations()))
        self._keep_watching(self._kv_revoked, REVOKED, self._revocation_entry, await _retrying(
            self._kv_revoked.watchall, deadline, "the revocations watch"),
            "revocations", self._revocations_known)
        self._tasks.append(asyncio.create_task(self._erase_loop()))
        self._kv_rooms = await _retrying(lambda: self._js_attempt.create_key_value(KeyValueConfig(
            bucket=ROOMS, replicas=self._replicas, history=1)), deadline,
            "the private rooms bucket")
        rooms_known = asyncio.Event()
        self._keep_watching(self._kv_rooms, ROOMS, self._room_entry, await _retrying(
            self._kv_rooms.watchall, deadline, "the private rooms watch"),
            "private rooms", rooms_known)
        try:
            await asyncio.wait_for(self._applied_through(target), deadline - time.monotonic())
        except TimeoutError:
            raise StoreError(f"the local copy did not catch up with the cluster's stream "
                             f"(at {self._applied} of {target}) within {timeout:g}s") from None
        try:  # (a member removed while this server was down must not read on here)
            await asyncio.wait_for(rooms_known.wait(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise StoreError(f"the private rooms' members did not arrive from the cluster "
                             f"within {timeout:g}s") from None
        try:  # (nor a token revoked meanwhile work here: ``on_revoked`` has them all now)
            await asyncio.wait_for(self._revocations_known.wait(),
                                   max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise StoreError(f"the cluster's token revocations did not arrive within "
                             f"{timeout:g}s") from None
        log.info("cluster: joined %s; stream at %d, %d room(s)", self.cfg.cluster, target,
                 len(self._last_ids))
        return key

    def _check_not_ahead(self, last_seq: int) -> None:
        if last_seq < self._applied:
            # A stream's sequence never goes back (purged or aged out, it keeps its last):
            # this one is not the stream the copy came from. Served on, the copy waited for
            # sequences it took for applied, and every send was refused for good as "not
            # caught up" (NATS rebuilt empty: an operator's run, 2026-11-25).
            raise StoreError(
                f"this server's copy of the cluster ({self.cfg.db_path}) has applied the "
                f"stream {STREAM} up to sequence {self._applied}, but the stream on "
                f"{self.cfg.cluster} ends at {last_seq}: it was deleted and made "
                "again, or this is another NATS cluster; nothing was changed. If it is the "
                "cluster to use, move the copy aside (it holds the history that stream does "
                "not) and start again: the server makes a new copy from the stream")

    async def _ensure_stream(self, cfg: StreamConfig) -> Any:
        """The cluster's stream, made if there is none; StoreError (nothing made) if this
        copy has applied more of it than the stream holds."""
        try:
            info = await self._js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            self._check_not_ahead(0)  # (a copy of a stream gone: made here, it was a new one)
            return await self._js.add_stream(cfg)
        self._check_not_ahead(info.state.last_seq)
        have = info.config
        # The copies are the cluster's too: a server started with another cluster_replicas
        # than the first (3 then 1, or 1 then 3) waited out startup_timeout and stopped with
        # NATS's 10058 "stream name already in use with a different configuration" about
        # the state bucket (a lab run, 2026-11-25). Its buckets are made as the stream.
        if have.num_replicas and have.num_replicas != cfg.num_replicas:
            log.warning("cluster: the cluster keeps %d copies of its history and buckets, "
                        "not this server's cluster_replicas (%d); a server never changes "
                        "it (to change it: `nats stream edit %s --replicas N`, and each "
                        "KV_tsnetchat-* stream)", have.num_replicas, cfg.num_replicas, STREAM)
            cfg.num_replicas = have.num_replicas
        # Retention is the cluster's, and a server starting never shrinks it: one started with
        # a smaller retention_count cut the shared stream (everyone's history) to it, with a
        # line only in its own log (an operator's run, 2026-11-23). Larger limits apply.
        count = _wider(have.max_msgs_per_subject, cfg.max_msgs_per_subject)
        widest = _wider(int(have.max_age or 0), int(cfg.max_age or 0))
        age = None if widest <= 0 else widest
        if (count, age) != (cfg.max_msgs_per_subject, cfg.max_age):
            log.warning("cluster: retention stays the cluster's (%s a room, %s), wider than "
                        "this server's retention_count/retention_days; a server never shrinks "
                        "it (to shrink it deliberately: `nats stream edit %s`)",
                        "no limit" if count < 0 else count,
                        "no age limit" if not age else f"{age / 86400:g} days", STREAM)
        if (have.max_msgs_per_subject, have.max_age) != (count, age):
            cfg.max_msgs_per_subject, cfg.max_age = count, age
            await self._js.update_stream(cfg)  # retention widened
        return info

    async def register(self, name: str, port: int, node_id: str = "") -> None:
        """Tell the cluster (and so every client's Welcome) that this server serves at
        ``name``:``port`` on node ``node_id``, and follow the others. A server that stops
        cleanly takes itself off the list; a crashed one stays on it (a client trying it
        moves on to the next)."""
        try:
            await self._kv_state.put(f"server.{name}", json.dumps(
                {"name": name, "port": port, "node_id": node_id}).encode())
            self._registered = name
        except (nats.errors.Error, OSError) as e:  # serving matters more than being listed
            log.warning("cluster: could not list this server for failover: %s", _why(e))
        if not self._watching_servers:  # (registered again, under a new node: one watch)
            self._watching_servers = True
            self._tasks.append(asyncio.create_task(self._watch_servers()))

    async def _watch_servers(self) -> None:
        # (already serving: the watch is asked for until the cluster answers)
        watcher = await _until(lambda: self._kv_state.watch("server.*"), float("inf"),
                               (nats.errors.Error, OSError))
        async for entry in _entries(watcher, "server"):
            name = entry.key.removeprefix("server.")
            if entry.operation is not None:
                self.servers.pop(name, None)
                self.server_nodes.pop(name, None)
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                listed = json.loads(entry.value)
                self.servers[name] = int(listed["port"])
                self.server_nodes[name] = str(listed.get("node_id", ""))

    # the signing key: one for the cluster; a rotation on any server is every server's ----

    async def share_key(self, key: bytes) -> None:
        """Make ``key`` the cluster's signing key (`tsnetchat token rotate-key` on this
        server); every server's ``follow_key`` adopts it. Raises StoreError when the cluster
        does not confirm it (no quorum): the other servers still have the old key."""
        try:
            await self._kv_state.put("signing-key", key)
        except (nats.errors.Error, OSError) as e:
            raise StoreError(f"the rotated signing key could not be shared with the "
                             f"cluster: {_why(e)}") from e

    async def follow_key(self, on_key: Callable[[bytes], object]) -> None:
        """Call ``on_key`` with the cluster's signing key: now, and after each rotation on
        any server (within a second: a KV watch). Raises StoreError if the cluster does not
        answer within ``cluster_wait``."""
        watcher = await _retrying(lambda: self._kv_state.watch("signing-key"),
                                  time.monotonic() + self.wait, "the signing key watch")

        async def follow() -> None:
            async for entry in _entries(watcher, "signing key"):
                if entry.operation is None and entry.value:
                    on_key(bytes(entry.value))

        self._tasks.append(asyncio.create_task(follow()))

    # presence ------------------------------------------------------------------------

    def members(self, room: str) -> list[pb.Identity]:
        """Who is in ``room`` through the other servers (one entry per login)."""
        seen: dict[str, pb.Identity] = {}
        for who in self._elsewhere.get(room, {}).values():
            seen.setdefault(who.login, who)
        return list(seen.values())

    def share_presence(self, room: str, kind: int, who: pb.Identity) -> None:
        """``who`` joined or left ``room`` here: tell the other servers. (Away and back are
        not membership: taken for a leave, they took the person off the other servers'
        member lists.)"""
        key = f"{room}.{self._me}.{_b64(who.login)}"
        if kind == pb.PRESENCE_KIND_JOINED:
            self._here[key] = who.SerializeToString()
            write = self._put_presence(key, self._here[key])
        elif kind == pb.PRESENCE_KIND_LEFT:
            self._here.pop(key, None)
            write = self._delete_presence(key)
        else:
            return
        task = asyncio.ensure_future(write)
        self._presence_writes.add(task)
        task.add_done_callback(self._presence_writes.discard)

    def share_presence_gone(self, key: str) -> None:
        self._here.pop(key, None)
        task = asyncio.ensure_future(self._delete_presence(key))
        self._presence_writes.add(task)
        task.add_done_callback(self._presence_writes.discard)

    async def _put_presence(self, key: str, value: bytes) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):  # the refresh tries again
            await self._js.publish(f"$KV.{PRESENCE}.{key}", value,
                                   headers={"Nats-TTL": f"{PRESENCE_TTL}s"})

    async def _delete_presence(self, key: str) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):  # else it expires
            await self._js.publish(f"$KV.{PRESENCE}.{key}", b"",
                                   headers={"KV-Operation": "DEL"})

    async def _refresh_presence(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_REFRESH)
            for key, value in list(self._here.items()):
                await self._put_presence(key, value)

    async def _watch_presence(self, watcher: Any) -> None:
        async for entry in _entries(watcher, "presence"):
            try:
                room, server, _login = entry.key.split(".", 2)
            except ValueError:
                continue
            if server == self._me:
                continue
            there = self._elsewhere.setdefault(room, {})
            if entry.operation is None:
                try:
                    who = pb.Identity.FromString(entry.value)
                except Exception:  # not a member record of ours: skip it
                    continue
                new = all(w.login != who.login for w in there.values())
                there[entry.key] = who
                if new:
                    self.on_presence(room, pb.PRESENCE_KIND_JOINED, who)
                continue
            gone = there.pop(entry.key, None)
            if not there:
                del self._elsewhere[room]
            if gone is not None and all(w.login != gone.login for w in there.values()):
                self.on_presence(room, pb.PRESENCE_KIND_LEFT, gone)

    async def kick(self, room: str, login: str, by: str, within: float | None = None) -> None:
        """Close ``login``'s streams in ``room`` on the other servers too (this server has
        closed its own): the kick is stored in KICKS, whose consumer on every server that
        is up delivers it, also on one reconnecting to NATS meanwhile (once it is back).
        Returns once a quorum has stored it; while the bucket has no leader it tries again
        for up to ``cluster_wait`` seconds, or ``within``; then raises StoreError. A kick
        is a moment, not a state: a server that starts later does not apply it."""
        kid = uuid.uuid4().hex
        data = _json({"id": kid, "room": room, "login": login, "by": by, "o": self._me})
        deadline = self._deadline(within)

        def attempt() -> Awaitable[Any]:  # (each within what is left: the caller's answer)
            return self._js.publish(
                f"$KV.{KICKS}.{kid}", data, headers={"Nats-Msg-Id": kid},
                timeout=max(0.1, min(ATTEMPT_TIMEOUT, deadline - time.monotonic())))

        try:  # (tried again after a time-out: the same Nats-Msg-Id is stored once, fact 7)
            await _until(attempt, deadline, UNSURE)
        except (nats.errors.Error, OSError) as e:
            raise StoreError(f"the chat cluster did not confirm the kick ({_why(e)}): "
                             f"{login}'s streams in {room!r} are closed on this server, maybe "
                             "not on the others; try again") from e
        with contextlib.suppress(nats.errors.Error, OSError):  # (for old servers: OLD_KICKS)
            await self._nc.publish(OLD_KICKS, data)

    async def _follow_kicks(self) -> Any:
        return await self._follow(f"$KV.{KICKS}.>", self._kicks.after, self._on_kick,
                                  stream=f"KV_{KICKS}")

    async def _watch_kicks(self) -> None:
        """nats-py notices a delivery lost on the way (a NATS node that died with it) by a
        heartbeat naming a later consumer sequence than the last message it got, so never
        on a consumer that has got nothing yet, which the kicks' one usually is: a kick on
        its way to this server through its node when that node was SIGKILLed never came
        (3 of 4 runs of test_a_kick_in_flight_to_server_1_when_its_nats_node_dies_..., on
        2026-11-25). So the kicks are followed again when the bucket stays ahead of what
        was taken here (``_keep_up``)."""
        await self._keep_up(f"KV_{KICKS}", lambda: self._kicks.after, self._follow_kicks_again,
                            "kicks")

    async def _follow_kicks_again(self) -> None:
        old, self._kick_sub = self._kick_sub, None
        with contextlib.suppress(Exception):
            await old.unsubscribe()
        self._kick_sub = await self._follow_kicks()

    def _keep_watching(self, kv: Any, bucket: str, handle: Callable[[Any], Awaitable[None]],
                       watcher: Any, what: str, ready: asyncio.Event) -> None:
        """Hand ``watcher``'s entries of ``bucket`` to ``handle``, and watch the bucket anew
        whenever it stays ahead of what was handed (``_keep_up``). A watch loses an entry
        for good as the kicks' consumer does (``_watch_kicks``): a revocation on its way to
        this server through its NATS node when the node was SIGKILLed, in a cluster nobody
        had revoked anything in before, never came, nor its word on REVOCATIONS, and the
        token worked on here (test_a_revocation_in_flight_to_server_1_..., 2026-11-25). And
        a watch whose consumer's node died is re-created by nats-py only after two missed
        5 s heartbeats: bob read on in a private room on another server 13 s and more after
        his removal was confirmed, in 2 of 10 runs (the bucket's leader SIGKILLed first, a
        lab run on 2026-11-25)."""
        kept = _Watched(kv, what, handle, self._tasks, ready)
        kept.start(watcher)
        self._tasks.append(asyncio.create_task(self._keep_up(
            f"KV_{bucket}", lambda: kept.taken, kept.again, what)))

    async def _keep_up(self, stream: str, taken: Callable[[], int],
                       again: Callable[[], Awaitable[None]], what: str) -> None:
        """Every KICKS_CHECK seconds, ``stream``'s last sequence; past what was ``taken``
        here at two looks in a row (not just on its way), a delivery was lost: ``again``
        follows the stream anew. Once per sequence: one erased or aged out is never
        delivered."""
        seen = checked = 0
        while True:
            await asyncio.sleep(KICKS_CHECK)
            try:
                last = (await self._js_attempt.stream_info(stream)).state.last_seq
            except (nats.errors.Error, OSError) as e:
                log.debug("cluster: the %s bucket's state: %s", what, _why(e))
                continue
            if last <= max(taken(), checked):
                seen = 0
                continue
            if last != seen:  # (maybe on its way: look again)
                seen = last
                continue
            log.info("cluster: the %s up to %d did not all arrive (taken: %d); following "
                     "them again", what, last, taken())
            try:
                await again()
            except (nats.errors.Error, OSError) as e:
                log.warning("cluster: could not follow the %s again (%s); trying again",
                            what, _why(e))
                continue
            checked = last

    async def _on_kick(self, msg: Any) -> None:
        kick = self._kicks.take(msg.metadata.sequence.stream, msg.data)
        if kick is not None:
            self.on_kick(*kick)

    async def _on_old_kick(self, msg: Any) -> None:
        """A kick on OLD_KICKS: taken from a server of the release before (no "id")."""
        try:
            k = json.loads(msg.data)
            if "id" in k or k.get("o") == self._me:
                return
            kick = (str(k["room"]), str(k["login"]), str(k["by"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("cluster: ignoring a malformed kick: %s", e)
            return
        self.on_kick(*kick)

    async def close(self) -> None:
        """Settle what was submitted (acknowledged or refused), erase what deletions left
        to erase (for up to 2 s: the other servers erase them too), stop following the
        stream, leave the list of servers, disconnect, close the local copy. What the
        cluster has not confirmed and this copy not applied within ``wait`` seconds is
        refused as Unconfirmed (a stalled consumer must not keep the server from stopping)."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain(), self.wait)
            # (and those the stream has whose senders were refused already: ``_too_late``)
            left = self._unsettled + sum(p.then is None for p in self._mine.values())
            if left:
                log.warning("cluster: stopping with %d message(s) not applied here", left)
            for _ in range(20):
                if not self._erasing:
                    break
                await asyncio.sleep(0.1)
            for key in list(self._here):  # our members leave with us
                self.share_presence_gone(key)
            if self._presence_writes:
                await asyncio.wait(set(self._presence_writes), timeout=2)
            if self._registered:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._kv_state.delete(f"server.{self._registered}"), 2)
            for sub in [s for s in (*self._subs, self._consumer, self._kick_sub)
                        if s is not None]:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        finally:  # (also when close itself is cancelled, as Server.stop's)
            await cancel_all([*self._tasks, *self._appenders.values()])
            for p in list(self._mine.values()):  # (queued ones: settled by their appender)
                self._settle(p, _unconfirmed("the server stopped before the chat cluster "
                                             "confirmed this message"))
            with contextlib.suppress(Exception):
                await self._nc.close()
            await self.local.close()

    # the History protocol ---------------------------------------------------------------

    def submit(self, draft: Draft, then: Settle) -> None:
        self._unsettled += 1
        self._settled.clear()
        key = (draft.room, draft.sender.login, draft.client_msg_id)
        if draft.client_msg_id:
            first = self._inflight.get(key)
            if first is not None:  # sent again before the first try settled
                first.resends.append(then)
                if first.stored:  # (waits for the copy, for a wait of its own)
                    self._bound(first, then, time.monotonic() + self.wait)
                return
        self._n += 1
        p = _Pending(draft, then, time.monotonic() + self.wait, f"{self._me}:{self._n}")
        if draft.client_msg_id:
            self._inflight[key] = p
        self._queues.setdefault(draft.room, deque()).append(p)
        if draft.room not in self._appenders:
            self._appenders[draft.room] = asyncio.create_task(self._append_room(draft.room))

    def pending(self) -> int:
        return self._unsettled

    def last_id(self, room: str) -> int:
        return self._last_ids.get(room, 0)

    def rooms(self) -> dict[str, int]:
        return dict(self._last_ids)

    async def after(self, room: str, after_id: int, limit: int) -> list[StoredMessage]:
        return await self.local.after(room, after_id, limit)

    async def before(self, room: str, before_id: int, limit: int) -> list[StoredMessage]:
        return await self.local.before(room, before_id, limit)

    async def latest(self, room: str, n: int) -> list[StoredMessage]:
        return await self.local.latest(room, n)

    async def drain(self) -> None:
        await self._settled.wait()

    # A team's day (issue 15). DMs are rooms of the stream like any other. Mentions are
    # recognised by the sender's server and ride the stream with the message, so every copy
    # stores them. Read positions are shared through the READS bucket and applied to every
    # local copy. Unread counts, mention lists and search are then answered by the local
    # copy (the same on every server once it has applied the stream and the bucket).
    # Topics, edits and deletions ride the stream as messages and are imported into each
    # copy. Private rooms' members are in the ROOMS bucket, applied to each copy.

    def people(self) -> dict[str, str]:
        return {**self.local.people(), **self._senders}

    def private_members(self, room: str) -> frozenset[str]:
        return self.local.private_members(room)

    def private_rooms(self) -> dict[str, frozenset[str]]:
        return self.local.private_rooms()

    async def set_members(self, room: str, by: str, add: Sequence[str], remove: Sequence[str],
                          *, create: bool = False, within: float | None = None
                          ) -> frozenset[str]:
        """Create a private room or change its members in the cluster's ROOMS bucket
        (compare-and-set: of two servers creating one room, one succeeds), then here; the
        other servers apply it from their watch (``on_removed``). Raises InvalidInput as
        Store.set_members does, StoreError when the cluster did not confirm the change
        within ``cluster_wait`` (while the bucket elects a leader) or ``within``."""
        key = _b64(room)
        deadline = self._deadline(within)
        kv = self._kv_rooms
        try:
            async with self._rooms_lock:  # (our own watch waits: it finds this applied)
                for _ in range(10):
                    if create:
                        value = {"room": room, "by": by, "members": sorted(set(add) - set(remove))}
                        try:
                            rev = await self._create_room(key, value, deadline)
                        except nats.js.errors.KeyWrongLastSequenceError:
                            raise InvalidInput(f"private room {room!r} already exists") from None
                    else:
                        try:
                            entry = await _until(lambda: kv.get(key), deadline, UNSURE)
                        except nats.js.errors.KeyNotFoundError:
                            entry = None
                        if entry is None or entry.operation is not None or not entry.value:
                            raise InvalidInput(f"there is no private room {room!r}")
                        value = json.loads(entry.value)
                        value["members"] = sorted((set(value["members"]) | set(add))
                                                  - set(remove))
                        value["by"] = by
                        try:
                            rev = await _until(partial(kv.update, key, _json(value),
                                                       last=entry.revision), deadline, UNSURE)
                        except nats.js.errors.KeyWrongLastSequenceError:
                            # Changed through another server meanwhile (or by an attempt
                            # that timed out and landed): again, from what is there.
                            continue
                    await self._apply_room(room, value, rev)
                    return frozenset(value["members"])
        except (nats.errors.Error, OSError) as e:
            raise StoreError(f"the cluster did not confirm the change of {room!r} ({_why(e)}); "
                             "it may still take effect: look at the room's members, then try "
                             "again") from e
        raise StoreError(f"{room!r} kept changing through other servers; try again")

    def _deadline(self, within: float | None) -> float:
        """When a change waiting for the cluster gives up: after ``cluster_wait``, or sooner
        when its caller stops waiting (``within`` seconds)."""
        wait = self.wait if within is None else min(self.wait, within)
        return time.monotonic() + wait

    async def _create_room(self, key: str, value: dict[str, Any], deadline: float) -> int:
        """Create the room's entry; its revision. An attempt that timed out may have landed,
        so an "already exists" after one is checked: the entry we meant is ours."""
        retried = False

        async def attempt() -> int:
            nonlocal retried
            try:
                rev: int = await self._kv_rooms.create(key, _json(value))
                return rev
            except nats.js.errors.KeyWrongLastSequenceError:
                if retried:
                    entry = await self._kv_rooms.get(key)
                    if entry.value and json.loads(entry.value) == value:
                        return int(entry.revision)
                raise
            except UNSURE:
                retried = True
                raise

        rev: int = await _until(attempt, deadline, UNSURE)
        return rev

    async def _apply_room(self, room: str, value: dict[str, Any], rev: int) -> frozenset[str]:
        """Make the local copy's members of ``room`` those of revision ``rev`` (older
        revisions than the one applied are ignored); returns who was removed. Called under
        ``_rooms_lock``."""
        if rev <= self._room_revs.get(room, 0):
            return frozenset()
        new = frozenset(str(x) for x in value["members"])
        exists = room in self.local.private_rooms()
        now = self.local.private_members(room)
        if not exists or new != now:
            await self.local.set_members(room, str(value.get("by", "")), sorted(new - now),
                                         sorted(now - new), create=not exists)
        self._room_revs[room] = rev
        return now - new

    async def _room_entry(self, entry: Any) -> None:
        """A private room's entry from the watch of ROOMS (``_keep_watching``; again after
        a new watch: revisions applied already change nothing)."""
        if entry.operation is not None or not entry.value:
            return  # (rooms are never deleted; a purge by hand changes nothing here)
        try:
            value = json.loads(entry.value)
            room = str(value["room"])
            if _b64(room) != entry.key or not isinstance(value["members"], list):
                raise ValueError(entry.key)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cluster: ignoring private room entry %r: %s", entry.key, e)
            return
        while True:
            try:
                async with self._rooms_lock:
                    gone = await self._apply_room(room, value, entry.revision)
                break
            except StoreError as e:  # the local copy must follow: try until it does
                log.error("cluster: cannot apply the members of %r here (%s); retrying",
                          room, e)
                await asyncio.sleep(1.0)
        if gone:
            self.on_removed(room, gone, str(value.get("by", "")))

    async def topic(self, room: str) -> Topic | None:
        return await self.local.topic(room)

    async def topics(self, rooms: Collection[str]) -> dict[str, Topic]:
        return await self.local.topics(rooms)

    async def mark_read(self, marks: Sequence[tuple[str, str, int]]) -> None:
        """Here at once, then in the cluster's READS bucket (raised only, compare-and-set),
        from which every other server applies it. Raises StoreError if the cluster could not
        take one (the ledger logs it; this server keeps the position and shares it again
        every READS_RETRY seconds until the cluster takes it)."""
        await self.local.mark_read(marks)
        failed: list[str] = []
        why = ""  # once one is not taken (no quorum), the rest are not tried: each waited
        for login, room, last_read in marks:  # for NATS in turn (a batch of N took N times)
            key = f"{_b64(login)}.{_b64(room)}"
            if not why:
                try:
                    await self._share_read(key, last_read)
                    if self._unshared_reads.get(key, 0) <= last_read:
                        self._unshared_reads.pop(key, None)
                    continue
                except (nats.errors.Error, OSError) as e:
                    why = _why(e)
            self._unshared_reads[key] = max(last_read, self._unshared_reads.get(key, 0))
            failed.append(f"{login} in {room}")
        if failed:
            more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
            raise StoreError(f"{len(failed)} read position(s) not shared with the cluster yet "
                             f"({why}; tried again until it takes them): "
                             + "; ".join(failed[:3]) + more)

    async def _reshare_reads(self) -> None:
        while True:
            await asyncio.sleep(READS_RETRY)
            for key, last_read in list(self._unshared_reads.items()):
                try:
                    await self._share_read(key, last_read)
                except (nats.errors.Error, OSError):
                    break  # still no quorum: all of them later
                if self._unshared_reads.get(key) == last_read:
                    del self._unshared_reads[key]

    async def _share_read(self, key: str, last_read: int) -> None:
        for _ in range(10):  # another server raised it meanwhile: look again
            try:
                entry = await self._kv_reads.get(key)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            try:
                if entry is None or entry.value is None or entry.operation is not None:
                    await self._kv_reads.create(key, str(last_read).encode())
                elif _position(entry.value) >= last_read:
                    return
                else:
                    await self._kv_reads.update(key, str(last_read).encode(),
                                                last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    async def _watch_reads(self, watcher: Any) -> None:
        async for entry in _entries(watcher, "read positions"):
            if entry.operation is not None or not entry.value:
                continue
            try:
                login, room = (_unb64(x) for x in entry.key.split("."))
                mark = (login, room, _position(entry.value))
                if mark[2] < 0:
                    raise ValueError(entry.value)
            except ValueError:
                log.warning("cluster: ignoring read position %r: %r", entry.key, entry.value)
                continue
            try:
                await self.local.mark_read([mark])
            except StoreError as e:  # a later position (or a restart) brings it
                log.warning("cluster: could not apply a read position: %s", e)

    async def read_mark(self, login: str, room: str) -> int:
        return await self.local.read_mark(login, room)

    async def unread(self, login: str, rooms: Sequence[str]) -> list[RoomState]:
        return await self.local.unread(login, rooms)

    async def mentions_of(self, login: str, *, include_read: bool, limit: int,
                          rooms: Sequence[str] | None = None) -> list[StoredMessage]:
        return await self.local.mentions_of(login, include_read=include_read, limit=limit,
                                            rooms=rooms)

    async def search(self, query: str, rooms: Sequence[str], *, author: str = "",
                     since_ms: int = 0, until_ms: int = 0, newest: bool = False,
                     limit: int = 20, offset: int = 0) -> list[StoredMessage]:
        return await self.local.search(query, rooms, author=author, since_ms=since_ms,
                                       until_ms=until_ms, newest=newest, limit=limit,
                                       offset=offset)

    # what the server needs besides (tokens, revocations, retention) ------------------------

    def thread_ids(self) -> set[int]:
        return self.local.thread_ids()

    async def revoke(self, jti: str, *, within: float | None = None) -> bool:
        """Revoke everywhere: in the cluster's bucket (every server's watcher closes the
        token's streams) and in the local copy. While the bucket has no leader it tries
        again for up to ``cluster_wait`` seconds, or ``within`` (a put of a revocation twice
        is harmless, so after a time-out too); then raises StoreError."""
        try:
            await _until(lambda: self._share_revocation(jti), self._deadline(within), UNSURE)
        except (nats.errors.Error, OSError) as e:
            raise StoreError(f"the revocation could not be shared with the cluster "
                             f"({_why(e)}); nothing was revoked, try again") from e
        self._shared_revocations.add(jti)
        return await self.local.revoke(jti)

    async def _share_revocation(self, jti: str) -> None:
        """One put of ``jti`` into the revocations bucket (its value: when, Unix seconds);
        once it is there, word to the other servers (``REVOCATIONS``; lost words are
        harmless: their watch brings it too)."""
        await self._kv_revoked.put(jti, str(int(time.time())).encode())
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._nc.publish(REVOCATIONS, json.dumps({"jti": jti, "o": self._me}).encode())

    async def _on_revocation(self, msg: Any) -> None:
        try:
            r = json.loads(msg.data)
            jti, origin = str(r["jti"]), r.get("o")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cluster: ignoring a malformed revocation: %s", e)
            return
        if origin != self._me:
            self._take_revocation(jti)

    def _take_revocation(self, jti: str) -> None:
        """A revocation from the cluster (its word or the bucket's watch; twice is harmless):
        close the token's streams here at once, and keep it in the local copy soon
        (``_keep_revocations``): the watch waited for each write, and start-up (which waits
        for the watch) for all of them, one transaction each (a review, 2026-11-24)."""
        self._shared_revocations.add(jti)
        self.on_revoked([jti])
        self._to_keep.append(jti)
        self._keep_wake.set()

    async def _keep_revocations(self) -> None:
        while True:
            await self._keep_wake.wait()
            self._keep_wake.clear()
            jtis, self._to_keep = self._to_keep, []
            try:  # (the bucket stays the cluster's record: the next start takes them again)
                await self.local.job(partial(_keep_revoked, jtis))
            except Exception as e:
                log.debug("cluster: %d revocation(s) not kept in the local copy: %s",
                          len(jtis), e)

    async def revocations_since(self, seq: int) -> tuple[list[str], int]:
        """Revocations written to the local database (also by `tsnetchat token revoke`),
        shared with the cluster as they are found, and again until the cluster takes them
        (the server asks every second)."""
        new, seq = await self.local.revocations_since(seq)
        self._unshared_revocations.update(new)
        if self._revocations_known.is_set() and not self._local_revocations_checked:
            self._local_revocations_checked = True
            self._unshared_revocations.update((await self.local.revocations_since(0))[0])
        for jti in sorted(self._unshared_revocations - self._shared_revocations):
            try:
                await self._share_revocation(jti)
            except (nats.errors.Error, OSError) as e:
                log.debug("cluster: revocation %s not shared yet: %s", jti, _why(e))
                break  # no quorum: all of them next time
            self._shared_revocations.add(jti)
        self._unshared_revocations -= self._shared_revocations
        return new, seq

    async def list_tokens(self) -> list[TokenRecord]:
        return await self.local.list_tokens()

    async def knows_token(self, jti: str) -> bool:
        """Any id: another server of the cluster may have signed it (tokens are recorded
        where they were signed, as `tsnetchat token revoke` knows)."""
        return True

    async def record_token(self, row: dict[str, object]) -> None:
        await self.local.record_token(row)

    async def renew_token(self, row: dict[str, object]) -> None:
        await self.local.renew_token(row)

    async def prune(self, *, keep_count: int, keep_days: float,
                    now: float | None = None) -> int:
        """The local copy's retention (the stream applies the same limits itself)."""
        n = await self.local.prune(keep_count=keep_count, keep_days=keep_days, now=now)
        if n:
            await self.local.job(lambda s: s.forget_stream_seqs())
        return n

    async def _revocation_entry(self, entry: Any) -> None:
        """An entry of the watch of REVOKED (``_keep_watching``; all of them again after a
        new watch: twice is harmless)."""
        if entry.operation is None:
            self._take_revocation(entry.key)

    # appending ------------------------------------------------------------------------

    def _settle(self, p: _Pending, outcome: Outcome) -> None:
        if p.done:
            return
        p.done = True
        for timer in p.timers:
            timer.cancel()
        self._mine.pop(p.origin, None)
        d = p.draft
        if self._inflight.get((d.room, d.sender.login, d.client_msg_id)) is p:
            del self._inflight[(d.room, d.sender.login, d.client_msg_id)]
        self._unsettle((p.then is not None) + len(p.resends))
        if p.then is not None:
            p.then(outcome)
        elif isinstance(outcome, Written):  # its sender was refused (``_too_late``)
            self.on_applied(outcome.message, True)
        for then in p.resends:
            then(Written(outcome.message, True) if isinstance(outcome, Written) else outcome)

    def _unsettle(self, n: int) -> None:
        """``n`` fewer senders wait for an answer (``drain`` returns once none do)."""
        self._unsettled -= n
        if not self._unsettled:
            self._settled.set()

    def _bound(self, p: _Pending, then: Settle, deadline: float) -> None:
        """``then`` waits for ``p``, which the stream has acknowledged, to be applied here
        until ``deadline`` at most (``_too_late``)."""
        if not p.done:  # (settled while the append's answer was on its way)
            p.timers.append(asyncio.get_running_loop().call_later(
                max(APPLY_GRACE, deadline - time.monotonic()), self._too_late, p, then))

    def _too_late(self, p: _Pending, then: Settle) -> None:
        """Refuse ``then`` if ``p`` is still not applied here: the stream has it, but this
        server's copy cannot take it (another process holds its database's write lock, its
        disk is full). The applier retries until it can, so ``p`` stays in ``_mine`` and
        ``_inflight``: applied, it is published to the room then, and a resend in the
        meantime waits for it instead of being appended a second time."""
        if p.done:
            return
        if p.then is then:
            p.then = None
        elif then in p.resends:
            p.resends.remove(then)
        else:
            return
        self._unsettle(1)
        # (it waited for ever: a send's own client timeout, a /topic the client's deadline;
        # a kill -9 run with cluster.db's write lock held by another process, 2026-11-25)
        then(Unconfirmed(
            f"the chat cluster has this message, but this server could not add it to its "
            f"copy within {self.wait:g}s ({self._behind()}); it appears once it can. Sending "
            "it again with the same client_msg_id is safe: it is never stored twice"))

    async def _append_room(self, room: str) -> None:
        q = self._queues[room]
        try:
            while q:
                # An edit or deletion goes alone: it is decided against the room as the
                # stream has it just before (``_append``).
                batch = [q.popleft()]
                while (q and len(batch) < MAX_BATCH and batch[0].draft.kind not in CHANGES
                       and q[0].draft.kind not in CHANGES):
                    batch.append(q.popleft())
                try:
                    async with self._slots:
                        await self._append(room, batch)
                except asyncio.CancelledError:
                    # (shutting down: those not sent yet are refused with the queue's below,
                    # those sent are ``close``'s; left out of both, they were never answered:
                    # a review, 2026-11-25)
                    q.extendleft(p for p in reversed(batch) if p.origin not in self._mine)
                    raise
                except Exception as e:  # a bug: refuse rather than leave senders waiting
                    log.error("cluster: appending to %r failed", room, exc_info=e)
                    for p in batch:
                        if p.origin in self._mine:
                            continue  # acknowledged: settled when applied
                        self._settle(p, StoreError(f"internal error: {e}"))
        finally:
            if not q:
                self._queues.pop(room, None)
            self._appenders.pop(room, None)
            if q:  # cancelled with drafts left (shutting down)
                for p in list(q):
                    self._settle(p, StoreError("the server is shutting down; not stored"))

    async def _append(self, room: str, batch: list[_Pending]) -> None:
        """Append ``batch`` to the room (see the module doc); returns once the stream has
        acknowledged it (the drafts settle when applied) or the drafts are refused."""
        live = batch
        why = "no answer"
        gone: str | None = None  # why, if the stream is not there (``_gone``; None: not asked)
        subject = ROOM_PREFIX + room
        while True:
            live = [p for p in live if not p.done]
            now = time.monotonic()
            for p in [p for p in live if p.deadline <= now]:
                self._settle(p, _unconfirmed(
                    f"the chat cluster did not confirm this message within {self.wait:g}s "
                    f"({why})"))
            live = [p for p in live if not p.done]
            if not live:
                return
            keys = [(p.draft.sender.login, p.draft.client_msg_id) for p in live
                    if p.draft.client_msg_id]
            if keys:
                found = await self.local.read(partial(_find_resends, room, keys))
                for p in live:
                    m = found.get((p.draft.sender.login, p.draft.client_msg_id))
                    if m is not None:
                        self._settle(p, resent(p.draft, m))
                live = [p for p in live if not p.done]
                if not live:
                    return
            last_id, last_seq = self._heads.get(room) or (
                self._last_ids.get(room, 0), self._last_seqs.get(room, 0))
            ts = int(time.time() * 1000)
            erased: list[tuple[int, StoredMessage]] = []
            if live[0].draft.kind in CHANGES:  # (alone in its batch)
                # Decided here against the room up to ``last_seq``: if the append then
                # lands, nothing came in between (the expectation), so every copy that
                # applies it decides the same (Store.import_messages); else decided again.
                try:
                    await asyncio.wait_for(self._applied_through(last_seq),
                                           max(0.01, live[0].deadline - now))
                except TimeoutError:
                    why = self._behind()
                    continue
                ts = int(time.time() * 1000)
                verdict = await self.local.read(partial(_decide, live[0].draft, ts))
                if isinstance(verdict, Refused):
                    self._settle(live[0], verdict)
                    return
                erased = verdict
            payloads = [_encode(p.draft, last_id + i, ts, p.origin, erased)
                        for i, p in enumerate(live, 1)]
            for p in live:
                self._mine[p.origin] = p  # settled by the applier once it sees it
            timeout = max(0.1, min(ATTEMPT_TIMEOUT, min(p.deadline for p in live) - now))
            try:
                answer = await self._commit(subject, payloads, last_seq, timeout)
            except (nats.errors.Error, OSError) as e:
                if isinstance(e, nats.errors.NoRespondersError) and gone is None:
                    gone = await self._gone()
                why = gone if isinstance(e, nats.errors.NoRespondersError) and gone else _why(e)
                await asyncio.sleep(0.1)
                continue  # the same expectation again: harmless if the first one landed
            err = answer.get("error")
            if err is None:
                self._heads[room] = (last_id + len(live), int(answer["seq"]))
                for p in live:
                    p.stored = True
                    for then in [t for t in (p.then, *p.resends) if t is not None]:
                        self._bound(p, then, p.deadline)
                return
            actual = _LAST.search(str(err.get("description", "")))
            if err.get("err_code") == WRONG_LAST_SEQUENCE and actual:
                seq = int(actual.group(1))
                try:
                    await asyncio.wait_for(self._applied_through(seq),
                                           max(0.01, min(p.deadline for p in live) - now))
                except TimeoutError:
                    why = self._behind()
                    continue
                self._heads[room] = (self._last_ids.get(room, 0),
                                     max(self._last_seqs.get(room, 0), seq))
                continue
            why = ("the stream still waits for a quorum on an earlier write to this room"
                   if err.get("err_code") == IN_FLIGHT else
                   f"{err.get('description', 'error')} ({err.get('err_code')})")
            await asyncio.sleep(0.1)

    async def _gone(self) -> str:
        """Why the stream's subjects have no responder when it is because the stream is
        not there; "" when it is, or when the cluster does not say (no quorum)."""
        try:
            reply = await self._nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"",
                                           timeout=GONE_ASK)
            code = (json.loads(reply.data).get("error") or {}).get("err_code")
        except (nats.errors.Error, OSError, ValueError, AttributeError):
            return ""
        if code != STREAM_NOT_FOUND:
            return ""
        self._gone_log.log(log, logging.ERROR, "cluster: the NATS cluster has no stream %s: "
                           "nothing can be stored until it is restored", STREAM)
        return (f"the NATS cluster has no stream {STREAM} any more (deleted?): nothing can be "
                "stored until an operator restores it")

    async def _commit(self, subject: str, payloads: list[bytes], expected: int,
                      timeout: float) -> dict[str, Any]:
        """Publish one message, or an atomic batch; the stream's answer (ack or error)."""
        head = {"Nats-Expected-Last-Subject-Sequence": str(expected)}
        if len(payloads) == 1:
            reply = await self._nc.request(subject, payloads[0], timeout=timeout, headers=head)
            return json.loads(reply.data)  # type: ignore[no-any-return]
        bid = uuid.uuid4().hex
        for i, data in enumerate(payloads, 1):
            h = {"Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(i)}
            if i == 1:
                h.update(head)
            if i == len(payloads):
                h["Nats-Batch-Commit"] = "1"
                reply = await self._nc.request(subject, data, timeout=timeout, headers=h)
                return json.loads(reply.data)  # type: ignore[no-any-return]
            await self._nc.publish(subject, data, headers=h)
        raise AssertionError("empty batch")

    # applying ---------------------------------------------------------------------------

    async def _subscribe(self, applied: int) -> Any:
        """A new ordered consumer of the stream from after ``applied``, feeding the applier;
        from now on only its messages are taken (those of the one before, if any, are
        delivered again by this one: it starts where the applied ones end)."""
        self._generation += 1
        generation = self._generation

        async def take(msg: Any) -> None:
            if generation == self._generation:
                self._inbox.append(msg)
                self._inbox_ready.set()
                if len(self._inbox) >= INBOX_MAX:
                    self._inbox_room.clear()
                    await self._inbox_room.wait()

        return await self._follow(PREFIX + ">", applied, take)

    async def _follow(self, subject: str, after: int, take: Callable[[Any], Awaitable[None]],
                      stream: str | None = None) -> Any:
        """An ordered consumer (fact 12) delivering ``subject``'s messages to ``take`` from
        after stream sequence ``after``. nats-py re-creates it when two heartbeats are
        missed (a lost NATS node or connection) from after the last sequence it delivered,
        or from the stream's start if it delivered none: ``take`` skips what it has had."""
        start = (dict(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                      config=ConsumerConfig(opt_start_seq=after + 1))
                 if after else dict(deliver_policy=DeliverPolicy.ALL))
        return await self._js.subscribe(subject, stream=stream, cb=take, ordered_consumer=True,
                                        idle_heartbeat=0.5, pending_msgs_limit=0,
                                        pending_bytes_limit=0, **start)

    async def _watch_consumer(self) -> None:
        """nats-py re-creates the ordered consumer when its heartbeats stop, not when it
        stops delivering while they go on (a consumer paused on the server, say). A stalled
        applier would refuse every send as "not caught up" and show nobody's messages, so:
        when nothing has been applied for CONSUMER_STALL seconds, ask the stream for its
        last sequence, and if that is past the applied one, subscribe again from there."""
        seen, since = self._applied, time.monotonic()
        while True:
            await asyncio.sleep(CONSUMER_STALL / 5)
            if self._applied != seen or self._importing_since:
                # (the applier waiting on its own copy is no stalled consumer: a new one
                # would only deliver again what the applier holds)
                seen, since = self._applied, time.monotonic()
                continue
            if time.monotonic() - since < CONSUMER_STALL:
                continue
            since = time.monotonic()
            try:
                last = (await self._js_attempt.stream_info(STREAM)).state.last_seq
            except (nats.errors.Error, OSError) as e:
                log.debug("cluster: the stream's state: %s", _why(e))
                continue
            if last <= max(self._applied, self._stall_checked) or self._applied != seen:
                continue
            log.warning("cluster: the stream's consumer delivered nothing for %.0fs while "
                        "the stream holds %d (applied here: %d); subscribing again",
                        CONSUMER_STALL, last, self._applied)
            old, self._consumer = self._consumer, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.unsubscribe()
            try:
                self._consumer = await self._subscribe(self._applied)
            except (nats.errors.Error, OSError) as e:
                log.warning("cluster: could not subscribe to the stream again (%s); "
                            "trying again", _why(e))
                since -= CONSUMER_STALL  # (again at the next look)
                continue
            self._stall_checked = last

    async def caught_up(self, room: str, after: int, within: float | None = None) -> bool:
        """Whether this copy has message ``after`` of ``room``, if the cluster has it:
        waits for the copy to apply the room's last message in the stream, up to
        ``cluster_wait`` (or ``within`` seconds). True at once when the stream holds no
        such id (a reader asking for what comes next, ``after`` past every id), or the
        cluster cannot say (the copy is then all there is to read)."""
        deadline = self._deadline(within)
        try:
            last = await asyncio.wait_for(
                self._js_attempt.get_last_msg(STREAM, ROOM_PREFIX + room),
                max(0.01, deadline - time.monotonic()))
            newest = int(json.loads(last.data or b"{}")["id"])
        except (nats.errors.Error, OSError, TimeoutError,  # (none of it: NotFoundError)
                ValueError, KeyError, TypeError):  # (not a message of ours: as the applier)
            return True
        if after > newest:
            return True  # (waiting would not give it: sends must not wait on the copy)
        try:
            await asyncio.wait_for(self._applied_through(last.seq or 0),
                                   max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    async def _applied_through(self, seq: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: self._applied >= seq)

    def _behind(self) -> str:
        """Why a send waits for this server's copy to catch up with the stream."""
        # (with its disk full, sends were refused as "not caught up" only: a kill -9 run
        # over a real NATS cluster, 2026-11-24)
        if self._copy_error:
            return f"this server cannot write its copy of the stream: {self._copy_error}"
        if self._importing_since and time.monotonic() - self._importing_since > 1.0:
            return (f"this server has been writing its copy of the stream for "
                    f"{time.monotonic() - self._importing_since:.0f}s: another process may "
                    "hold its database's write lock, or its disk is slow")
        return "this server has not caught up with the stream"

    async def _apply_loop(self) -> None:
        while True:
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            msgs, self._inbox = self._inbox, []
            self._inbox_room.set()
            todo: list[tuple[int, Imported, str, list[int]]] = []
            for raw in msgs:
                seq = raw.metadata.sequence.stream
                if seq <= self._applied or (todo and seq <= todo[-1][0]):
                    continue
                try:
                    it, origin, erases = _decode(raw.subject, raw.data, seq)
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("cluster: skipping stream message %d on %s: %s", seq,
                                raw.subject, e)
                    continue
                todo.append((seq, it, origin, erases))
            if not msgs:
                continue
            last = max(msgs[-1].metadata.sequence.stream, self._applied)
            self._importing_since = time.monotonic()
            while True:
                try:
                    refused = await self.local.job(partial(_import, [t[1] for t in todo],
                                                           last))
                    self._copy_error = ""
                    self._importing_since = 0.0
                    break
                except StoreError as e:  # keep them: the stream does not move on without us
                    log.error("cluster: cannot write the local copy (%s); retrying", e)
                    self._copy_error = str(e)
                    await asyncio.sleep(1.0)
            for i, (seq, it, origin, erases) in enumerate(todo):
                m = it.message
                if m.id <= self._last_ids.get(m.room, 0):
                    continue  # (was in the local copy already)
                self._last_seqs[m.room] = seq
                p = self._mine.get(origin)
                why = refused.get(i)
                if why is not None:
                    # Decided alike by every copy; normally refused before it was appended
                    # (``_decide``), so only when this copy differs (its retention, say).
                    log.warning("cluster: %s %d in %r not applied: %s", "a change", m.id,
                                m.room, why.error)
                    if p is not None:
                        self._settle(p, why)
                    continue
                self._last_ids[m.room] = m.id
                if erases:  # every server erases (again): whoever sent it may be gone
                    self._erasing.extend(erases)
                    self._erase_ready.set()
                if self._senders.get(m.sender.login) != m.sender.display_name:
                    self._senders[m.sender.login] = m.sender.display_name
                    self.on_sender(m.sender)
                if p is not None:
                    self._settle(p, Written(m, False))  # the ledger publishes and acks
                else:
                    self.on_applied(m, origin.startswith(self._me + ":"))
            async with self._progress:
                self._applied = last
                self._progress.notify_all()

    async def _erase_loop(self) -> None:
        """Erase deleted messages from the stream (fact 14: a secure delete, the bytes
        overwritten on every node), retrying while the cluster cannot."""
        while True:
            await self._erase_ready.wait()
            self._erase_ready.clear()
            while self._erasing:
                seq = self._erasing[0]
                try:
                    await self._js.delete_msg(STREAM, seq)
                except nats.js.errors.APIError as e:
                    if e.code != 404 and e.err_code not in NO_MESSAGE:
                        log.warning("cluster: could not erase stream message %d yet: %s",
                                    seq, e)
                        await asyncio.sleep(1.0)
                        continue
                except (nats.errors.Error, OSError) as e:
                    log.debug("cluster: erasing %d: %s", seq, _why(e))
                    await asyncio.sleep(1.0)
                    continue
                self._erasing.popleft()  # erased, or gone already (erased, aged out)
                with contextlib.suppress(StoreError):  # (else erased again at start-up)
                    await self.local.job(partial(_erased, seq))


def _unconfirmed(what: str) -> Unconfirmed:
    return Unconfirmed(f"{what}; it may still appear. Sending it again with the same "
                       "client_msg_id is safe: it is never stored twice")


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(text: str) -> str:
    """A login as a KV key token (letters, digits, - and _ only)."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(token: str) -> str:
    """``_b64``'s text again; ValueError if ``token`` is not one."""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(str(e)) from None


def _position(value: bytes) -> int:
    """A read position as the READS bucket holds it; -1 if it is not one (put there by
    hand or by something else): ``_share_read`` replaces it. (Its ValueError ended the
    share, and a number past SQLite's integers, applied, the watch of read positions.)"""
    try:
        n = int(value)
    except ValueError:
        return -1
    return n if 0 <= n <= MAX_ID else -1


def _find_resends(room: str, keys: list[tuple[str, str]], s: Store
                  ) -> dict[tuple[str, str], StoredMessage]:
    return s.find_resends(room, keys)


def _import(items: list[Imported], seq: int, s: Store) -> dict[int, Refused]:
    return s.import_messages(items, SOURCE, seq)


def _erased(seq: int, s: Store) -> None:
    s.erased(seq)


def _decide(d: Draft, ts: int, s: Store) -> Refused | list[tuple[int, StoredMessage]]:
    return s.decide_change(d, ts)


def _why(e: BaseException) -> str:
    if isinstance(e, nats.errors.NoRespondersError):
        return "no stream leader answers: the NATS cluster has no quorum"
    if isinstance(e, nats.errors.TimeoutError):
        return "the NATS cluster did not answer in time"
    return f"NATS: {e or type(e).__name__}"


# Answers that mean nothing was written: no stream leader took the request (none elected
# yet, or an election under way), so the same request again is safe. (A time-out is not
# one of them: the write may have landed.)
UNANSWERED: tuple[type[BaseException], ...] = (
    nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError)
# ... and a time-out besides: for requests that may be made twice (reads, puts of one value,
# compare-and-set updates).
UNSURE: tuple[type[BaseException], ...] = (*UNANSWERED, nats.errors.TimeoutError)


async def _until(step: Callable[[], Any], deadline: float,
                 again: tuple[type[BaseException], ...] = UNANSWERED) -> Any:
    """``step()``, again while it raises one of ``again`` and ``deadline`` has not passed;
    then the last error is raised. A new R3 bucket, or one whose leader just died, has no
    leader for a moment (2026-11: up to 9 s after a SIGKILL of the leader in the lab)."""
    while True:
        try:
            return await step()
        except again:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def _retrying(step: Callable[[], Any], deadline: float, what: str) -> Any:
    """Start-up against a cluster that may be electing leaders (10005, 10008, no
    responders): try again until ``deadline``."""
    async def once() -> Any:
        try:
            return await step()
        except nats.js.errors.APIError as e:
            if e.err_code != DIFFERENT_CONFIG:
                raise
            # (not a passing state of the cluster: tried again, it waited out the start-up
            # time for the same answer)
            raise StoreError(
                f"cluster: could not set up {what}: the NATS cluster has it with another "
                f"configuration than this server's ({e.description}); nothing was changed. "
                f"Compare it (`nats stream info`) with a server's that runs") from None

    try:
        return await _until(once, deadline, (nats.errors.Error, OSError))
    except (nats.errors.Error, OSError) as e:
        raise StoreError(f"cluster: could not set up {what}: {_why(e)}") from e
