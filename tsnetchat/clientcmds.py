"""What the scripting commands do (`send`, `tail`, `history`, `whoami`); ``cli`` parses their
options and calls these. Each uses one ``client.Link`` and raises only ``ClientError``
(``clienterrors``), whose ``exit_code`` the CLI exits with.

``--json`` output, one stable shape for every command (README "Scripting"):

* a message is ``{"type": "message", "id", "room", "ts", "from", "name", "node", "text",
  "kind"}``: ``ts`` in milliseconds since the Unix epoch (the only time unit), ``from`` the
  sender's tailnet login, ``name`` the display name, ``kind`` ``"text"`` or ``"action"``;
* `history` prints one JSON array of messages, oldest first;
* `tail` prints one JSON object per line: messages, and once ``{"type": "live", "room",
  "last_id"}`` between the backlog and what arrives live; ``{"type": "restart", "room",
  "reason"}`` when the server's history was replaced (a restore): what was printed before
  may be printed again, or differ, ids included; then the backlog and ``live`` again;
* `send` prints ``{"id", "room"}``; `whoami` an object.
"""

from __future__ import annotations

import difflib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from .chatview import CHANGES, PlainView, dm_with, found_lines, person_login, room_label
from .client import (
    Connection,
    Link,
    RoomSession,
    SessionEvent,
    check_message_id,
    deliver_all,
    first_answer,
    not_yet,
    to_stderr,
)
from .clienterrors import ClientError
from .errors import InvalidInput
from .outbox import sendable, with_newlines
from .pb import chat_pb2 as pb
from .render import visible
from .resume import START_GRACE

T = TypeVar("T")
Echo = Callable[[str], None]


KINDS = {pb.MESSAGE_KIND_ACTION: "action", pb.MESSAGE_KIND_EDIT: "edit",
         pb.MESSAGE_KIND_DELETE: "delete", pb.MESSAGE_KIND_TOPIC: "topic"}


def message_record(m: pb.ChatMessage) -> dict[str, Any]:
    rec = {"type": "message", "id": m.id, "room": m.room, "ts": m.sent_unix_ms,
           "from": m.sender.login, "name": m.sender.display_name, "node": m.sender.node,
           "text": m.text, "kind": KINDS.get(m.kind, "text")}
    # Issue 15's keys, only when they say something (the shape above stays as it was).
    if m.target_id:
        rec["target"] = m.target_id
    if m.deleted_by:
        rec["deleted_by"] = m.deleted_by
    if m.edited_unix_ms:
        rec["edited_ts"] = m.edited_unix_ms
    if m.mentions:
        rec["mentions"] = list(m.mentions)
    return rec


class TextOut:
    """Messages as people read them: the chat's rules (``chatview.PlainView``), a line when
    the day changes."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.view = PlainView()

    def message(self, m: pb.ChatMessage) -> None:
        for line in self.view.lines(m):
            self.echo(line)


async def call(link: Link, fn: Callable[[Connection], Awaitable[T]], *,
               again: bool = True, warn: Echo = to_stderr) -> T:
    """``await fn(connection)`` on the link, then close it; failures as ClientError. A call
    safe to repeat (``again``: it reads, or resends under one client_msg_id) is tried again for
    a while when the way to the server fails (``client.first_answer``), a line on ``warn``
    each time; one that is not (a room's members) is not: its first attempt may have landed."""
    try:
        return await first_answer(link, fn, grace=START_GRACE if again else 0.0, warn=warn)
    finally:
        await link.close()


async def send(link: Link, room: str, text: str, *, kind: int, timeout: float,
               json_out: bool, split: bool = False) -> str:
    """`send` and `dm`: the message's id once stored (``split``: text over the server's
    limit as several messages, and their ids). Text no server could take (not UTF-8, too
    long for any) is refused before dialling; every failure says the message was not sent
    (or, when the server may have got it, that it is unknown; or which parts were stored)."""
    try:
        text = with_newlines(text)
        why = sendable(text, split=split)
        if why is not None:
            raise InvalidInput(f"the message was not sent: {why}")  # (translated below)
        deadline = time.monotonic() + timeout
        if _short_names(room):  # (within the same --timeout: it gave up at once while the
            room = await first_answer(  # server restarted; a new user's day, 2026-11-24)
                link, lambda c: dm_logins(c, room), grace=timeout)
        named: list[str] = []  # the room as the server names it (a DM's canonical name)
        ids = await deliver_all(link, room, text, kind=kind, split=split,
                                timeout=max(0.1, deadline - time.monotonic()),
                                welcomed=lambda w: named.append(w.room))
    except Exception as e:
        err = link.translate(e)
        if not split and err.status == grpc.StatusCode.INVALID_ARGUMENT and (
                "the limit is" in str(err)):  # (render.validate_text's words)
            err = ClientError(f"{err} (--split sends it as several messages)",
                              retryable=False, exit_code=err.exit_code, status=err.status)
        raise not_sent(err) from None
    finally:
        await link.close()
    room = named[-1] if named else room
    if json_out:
        return json.dumps({"id": ids[0], "room": room, **({"ids": ids} if split else {})})
    if len(ids) == 1:
        return f"sent #{ids[0]} to {room}"
    return f"sent as {len(ids)} messages to {room}: " + ", ".join(f"#{i}" for i in ids)


async def dm_logins(conn: Connection, room: str) -> str:
    """A DM's short names (``dm:bob``) as logins at the caller's own domain, as the chat's
    `/msg bob` takes them (`tsnetchat dm SERVER bob` said "'bob' is not a tailnet login",
    and so did `history --room dm:bob`: a new user's day, 2026-11-24). One WhoAmI, only
    when a name is short."""
    if not _short_names(room):
        return room
    return room_of(room, str((await conn.whoami()).identity.login))


def room_of(room: str, me: str) -> str:
    """``room`` with a DM's short names as logins at ``me``'s domain (``dm_logins`` once
    ``me`` is known)."""
    return dm_with(me, room[3:].split(",")) if _short_names(room) else room


def _short_login(who: str) -> bool:
    """Whether ``who`` names a person without a domain (``bob``, ``@bob``)."""
    who = who.strip().lstrip("@")
    return bool(who) and "@" not in who and not who.startswith("tag:")


def _login_of(who: str, me: str) -> str:
    """A person as `search --author` takes them: a short name at ``me``'s domain."""
    return person_login(who.strip().lstrip("@").lower(), me, ()) if _short_login(who) else \
        who.strip().lstrip("@")


def _short_names(room: str) -> bool:
    """Whether ``room`` is a DM that names someone without a domain."""
    return room.startswith("dm:") and any(
        "@" not in x and not x.strip().startswith("tag:") for x in room[3:].split(",")
        if x.strip())


def not_sent(e: ClientError) -> ClientError:
    """``e`` saying that the message was not sent (unless it says what became of it)."""
    words = str(e)
    if "not sent" in words or "not stored" in words or "may still" in words:
        return e
    return ClientError(f"the message was not sent: {words}", retryable=e.retryable,
                       exit_code=e.exit_code, transport=e.transport,
                       retry_after=e.retry_after, status=e.status)


MAX_HISTORY_PAGES = 50  # pages `history` reads back for its messages (edits take places)


async def last_messages(conn: Connection, room: str, *, before: int | None,
                        limit: int) -> list[pb.ChatMessage]:
    """The last ``limit`` messages before ``before``, with the edits, deletions and topic
    changes among them, oldest first. (The server's pages count those too: `history
    --limit 5` printed three lines after two edits; a new user's day, 2026-11-23.)"""
    items: list[pb.ChatMessage] = []
    said = 0
    for _ in range(MAX_HISTORY_PAGES):
        page = await conn.history(room, before=before, limit=limit)
        if not page.messages:
            break
        items[:0] = page.messages
        said += sum(m.kind not in CHANGES and m.kind != pb.MESSAGE_KIND_TOPIC
                    for m in page.messages)
        before = page.messages[0].id
        if said >= limit or not page.more:
            break
    first = 0
    for i in range(len(items) - 1, -1, -1):  # from the limit-th message from the end
        if items[i].kind not in CHANGES and items[i].kind != pb.MESSAGE_KIND_TOPIC:
            limit -= 1
            if limit == 0:
                first = i
                break
    return items[first:]


async def history(link: Link, room: str, *, before: int | None, limit: int, json_out: bool,
                  echo: Echo) -> None:
    unknown = ""

    async def read(conn: Connection) -> list[pb.ChatMessage]:
        nonlocal room, unknown
        room = await dm_logins(conn, room)  # (said as such when empty: `@bobb` showed as
        msgs = await last_messages(conn, room, before=before,  # "dm:bobb", no typo seen)
                                   limit=limit)
        if not msgs:
            unknown = await unknown_rooms(conn, [room])
        return msgs

    items = await call(link, read)
    if json_out:
        echo(json.dumps([message_record(m) for m in items]))
        return
    out = TextOut(echo)
    for m in items:
        out.message(m)
    if not items:  # (nothing at all read as a command that failed, or a typo'd DM)
        echo(f"no messages in {room}" + (f" before #{before}" if before else "") + unknown)


async def unknown_rooms(conn: Connection, named: list[str]) -> str:
    """What to add to "no messages" when a named room (not a DM) is none the caller can
    read: "; there is no room #genral here (did you mean #general?)". `history --room
    genral` answered "no messages in genral", and `search --room genral` "no messages
    match", both read as done (a new user's day, 2026-11-24). "" when all are there."""
    wanted = [r for r in dict.fromkeys(named) if not r.startswith("dm:")]
    if not wanted:
        return ""
    have = [r.name for r in (await conn.list_rooms()).rooms if not r.direct]
    said = []
    for r in wanted:
        if r in have:
            continue
        close = difflib.get_close_matches(r, have, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(room_label(c) for c in close)}?)" if close else ""
        said.append(f"; there is no room {room_label(r)} you can read here{hint}")
    return visible("".join(said))


async def whoami(link: Link) -> str:
    me = await call(link, lambda conn: conn.whoami())
    return json.dumps({"login": me.identity.login, "node": me.identity.node,
                       "rooms": list(me.rooms), "admin": me.admin,
                       "grant_applied": me.grant_applied, "token_id": me.token_id})


async def tail(link: Link, room: str, *, after: int | None, new: bool, count: int,
               json_out: bool, echo: Echo, warn: Echo) -> None:
    """Follow ``room`` (Subscribe) until ``count`` messages (0: for ever). A lost connection
    is one line on ``warn`` and another when it is back; nothing is missed or repeated."""
    if _short_names(room):
        try:
            room = await first_answer(link, lambda c: dm_logins(c, room), grace=START_GRACE,
                                      warn=warn)
        except BaseException:
            await link.close()
            raise
    session = RoomSession(link, room, after_id=after, from_now=new, read_only=True)
    text = TextOut(echo)
    seen = 0
    # A reconnect is reported once its replay is in: "nothing missed" was printed just
    # before "the server's history was restored from a backup" (an operator's run).
    reconnected: SessionEvent | None = None
    try:
        async for ev in session.events():
            if ev.kind == "message" and ev.message is not None:
                if json_out:
                    echo(json.dumps(message_record(ev.message)))
                else:
                    text.message(ev.message)
                seen += 1
                if count and seen >= count:
                    return
            elif ev.kind == "replay_done":
                if reconnected is not None:
                    warn(f"reconnected after {reconnected.outage()}; nothing missed")
                    reconnected = None
                if ev.first:
                    echo(json.dumps({"type": "live", "room": room, "last_id": ev.message_id})
                         if json_out else
                         f"── live: new messages in {visible(room_label(room))} from here ──")
            elif ev.kind == "state" and ev.error is not None and not session.state.ever_connected:
                warn(not_yet(link, ev.error))
            elif ev.kind == "state" and ev.error is not None and session.state.attempts == 1:
                warn(f"connection lost: {ev.error}; reconnecting")
            elif ev.kind == "state" and ev.seconds is not None:
                reconnected = ev
            elif ev.kind == "waiting":
                warn(ev.text)
            elif ev.kind == "restart":
                if reconnected is not None:
                    warn(f"reconnected after {reconnected.outage()}")
                    reconnected = None
                warn(ev.text)
                if json_out:  # (a reader keeping ids seen had no sign that they now name
                    # other messages: ids after a restore were new ones; an operator's run,
                    # 2026-11-24)
                    echo(json.dumps({"type": "restart", "room": room, "reason": ev.text}))
            elif ev.kind == "fatal" and ev.error is not None:
                raise ev.error
    finally:
        await session.close()
        await link.close()


# --- a team's day (issue 15) ------------------------------------------------------------


def _messages(msgs: Any, json_out: bool, echo: Echo, *, none: str) -> None:
    """Found messages, one a line; ``none`` when there are none (an empty screen read as a
    command that did not work)."""
    if json_out:
        echo(json.dumps([message_record(m) for m in msgs]))
        return
    for m in msgs:
        for line in found_lines(m):
            echo(line)
    if not msgs:
        echo(none)


async def search(link: Link, query: str, *, rooms: list[str], author: str, since_ms: int,
                 until_ms: int, newest: bool, limit: int, offset: int, json_out: bool,
                 echo: Echo) -> None:
    searched: list[str] = []
    who = ""
    unknown = ""

    async def find(c: Connection) -> pb.SearchResponse:
        nonlocal searched, who, unknown
        # Short names (a DM's `@bob`, `--author bob`) at the caller's domain: one WhoAmI.
        short = _short_login(author) or any(_short_names(r) for r in rooms)
        me = str((await c.whoami()).identity.login) if short else ""
        searched = [room_of(r, me) for r in rooms]
        who = _login_of(author, me)
        res = await c.search(query, rooms=searched, author=who, since_ms=since_ms,
                             until_ms=until_ms, newest=newest, limit=limit, offset=offset)
        if not res.messages and not offset:
            unknown = await unknown_rooms(c, searched)
        return res

    res = await call(link, find)
    # (the rooms and the author as searched: `--room @bobb` answered only "no messages
    # match", and the typo went unseen; a new user's day, 2026-11-24)
    where = (f" in {', '.join(room_label(r) for r in searched)}" if searched else "") + (
        f" from {who}" if who else "")
    where = visible(where)
    _messages(res.messages, json_out, echo,
              none=f"no more messages match{where}" if offset else
              f"no messages match{where}{unknown}")
    if res.more and not json_out:
        echo(f"(more: --offset {res.next_offset})")


async def unread(link: Link, *, json_out: bool, echo: Echo) -> None:
    res = await call(link, lambda c: c.unread())
    if json_out:
        echo(json.dumps({"total": res.total_unread, "mentions": res.total_mentions,
                         "rooms": [{"room": r.name, "unread": r.unread,
                                    "mentions": r.unread_mentions, "last_read": r.last_read_id,
                                    "last_id": r.last_id} for r in res.rooms]}))
        return
    for r in res.rooms:
        if r.unread:
            echo(f"{r.name}: {r.unread} unread" + (f", {r.unread_mentions} mentioning you"
                                                   if r.unread_mentions else ""))
    echo(f"total: {res.total_unread} unread, {res.total_mentions} "
         f"mention{'' if res.total_mentions == 1 else 's'}")


async def mentions(link: Link, *, include_read: bool, json_out: bool, echo: Echo) -> None:
    _messages(await call(link, lambda c: c.mentions(include_read=include_read)), json_out, echo,
              none="nothing mentions you" if include_read else "no unread mentions")


async def show_topic(link: Link, room: str, *, json_out: bool) -> str:
    """A room's topic, who set it and when (from the rooms the caller may use)."""
    async def read(c: Connection) -> tuple[str, pb.ListRoomsResponse]:
        named, rooms = await dm_logins(c, room), await c.list_rooms()
        if named.startswith("dm:") and all(r.name != named for r in rooms.rooms):
            # (`dm:bob@example.com` names the caller's conversation with bob, as in `send`)
            named = dm_with(str((await c.whoami()).identity.login), named[3:].split(","))
        return named, rooms

    room, rooms = await call(link, read)
    info = next((r for r in rooms.rooms if r.name == room), None)
    if info is None:
        raise link.translate(InvalidInput(
            f"no room {room!r} among the rooms you may use (the chat's /rooms lists them)"))
    t = info.topic if info.HasField("topic") and info.topic.text else None
    if json_out:
        return json.dumps({"room": room, "topic": t.text if t else "",
                           "set_by": t.set_by.login if t else "",
                           "set_unix_ms": t.set_unix_ms if t else 0})
    if t is None:
        return f"{room} has no topic"
    return f"topic of {room}: {visible(t.text)} (set by {visible(t.set_by.login)})"


async def change(link: Link, room: str, what: str, *, target: int = 0, text: str = "",
                 json_out: bool, warn: Echo = to_stderr) -> str:
    """edit, delete or topic, once stored: what was done, with the id of the event that did
    it. Every attempt carries the same client_msg_id, so one that landed before its
    connection broke is not stored twice."""
    cmid = uuid.uuid4().hex
    # Before dialling (and here, not in Connection: the raw API lets a test, or an attacker,
    # put any encodable id to the server, whose refusal is what the security tests check).
    if what in ("edit", "delete"):
        try:
            check_message_id(target)
        except InvalidInput as e:
            await link.close()
            raise link.translate(e) from None

    named = [room]  # the room as the server names it (a DM's logins)

    async def run(c: Connection) -> int:
        named[0] = await dm_logins(c, room)
        if what == "edit":
            return await c.edit(named[0], target, text, client_msg_id=cmid)
        if what == "delete":
            return await c.delete(named[0], target, client_msg_id=cmid)
        return await c.set_topic(named[0], text, client_msg_id=cmid)

    mid = await call(link, run, warn=warn)
    room = named[0]
    if json_out:
        return json.dumps({"id": mid, "room": room})
    if what == "edit":
        return f"edited #{target} in {room} (#{mid})"
    if what == "delete":
        return f"deleted #{target} in {room} (#{mid})"
    return f"{'set' if text else 'cleared'} the topic of {room} (#{mid})"


async def members(link: Link, room: str, *, create: bool, add: list[str], remove: list[str],
                  json_out: bool) -> str:
    """Create a private room, or add and remove members. Adding and removing is tried again
    on a first contact that fails (the same change twice leaves the same members); creating is
    not (a creation that landed before its connection broke would be refused as existing)."""
    async def run(c: Connection) -> pb.RoomMembersResponse:
        if create:
            return await c.create_room(room, add)
        return await c.set_room_members(room, add=add, remove=remove)

    res = await call(link, run, again=not create)
    return (json.dumps({"room": res.room, "members": list(res.members)}) if json_out
            else f"{res.room}: {', '.join(res.members) or '(nobody)'}")
