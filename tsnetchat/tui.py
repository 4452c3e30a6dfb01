"""The interactive terminal chat (prompt_toolkit).

Incoming messages are printed above the line being typed (patch_stdout), senders coloured,
with timestamps; a bottom toolbar shows the room and connected/reconnecting. Each room is a
RoomSession, so reconnects resume after the last message shown: nothing missed, nothing twice.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.patch_stdout import patch_stdout

from . import render
from .client import Connection, RoomSession, connect
from .config import ROOM_RE
from .pb import chat_pb2 as pb

COLOURS = ["ansigreen", "ansicyan", "ansimagenta", "ansiyellow", "ansiblue", "ansired",
           "ansibrightgreen", "ansibrightcyan", "ansibrightmagenta"]
HELP = """commands:
  /join ROOM     join (and switch to) a room      /leave        leave the current room
  /who           who is in this room              /rooms        rooms you may use
  /me TEXT       an action ("* alice waves")      /history [N]  older messages
  /help          this help                        /quit         exit (also Ctrl-D)"""


def colour(login: str) -> str:
    return COLOURS[zlib.crc32(login.encode()) % len(COLOURS)]


def say(*parts: tuple[str, str]) -> None:
    print_formatted_text(FormattedText(list(parts)))


def show_message(m: pb.ChatMessage, current: str) -> None:
    t = time.strftime("%H:%M", time.localtime(m.sent_unix_ms / 1000))
    who = render.who(m.sender)
    first, *more = render.lines(m.text)
    prefix = [("ansibrightblack", f"{t} ")]
    if m.room != current:
        prefix.append(("ansibrightblack", f"[{m.room}] "))
    if m.kind == pb.MESSAGE_KIND_ACTION:
        say(*prefix, (f"{colour(m.sender.login)} italic", f"* {who} {first}"))
    else:
        say(*prefix, (f"{colour(m.sender.login)} bold", f"<{who}>"), ("", f" {first}"))
    for line in more:  # visibly not a message of its own (render.py)
        say(("ansibrightblack", render.continuation(len(t))), ("", line))


class ChatUI:
    def __init__(self, connect_fn: Any, server: str) -> None:
        self.connect_fn = connect_fn
        self.server = server
        self.rooms: dict[str, RoomSession] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.members: dict[str, list[str]] = {}
        self.current = ""
        self.fatal = ""
        self.session: PromptSession[str] | None = None
        self.info_login = ""  # our own login, to skip announcing our own join

    def toolbar(self) -> Any:
        s = self.rooms.get(self.current)
        state = ("connected" if s and s.connected else "reconnecting…") if s else "no room"
        style = "bg:ansigreen fg:ansiblack" if s and s.connected else "bg:ansiyellow fg:ansiblack"
        return FormattedText([(style, f" {self.server} #{self.current} — {state} "),
                              ("", "  /help for commands")])

    def refresh(self) -> None:
        if self.session is not None and self.session.app.is_running:
            self.session.app.invalidate()

    async def join(self, room: str) -> None:
        if room in self.rooms:
            self.current = room
            return
        session = RoomSession(self.connect_fn, room)
        self.rooms[room] = session
        self.current = room
        self.tasks[room] = asyncio.create_task(self._pump(session))

    async def _pump(self, s: RoomSession) -> None:
        async for ev in s.events():
            if ev.kind == "message" and ev.message is not None:
                show_message(ev.message, self.current)
            elif ev.kind == "welcome" and ev.welcome is not None:
                self.members[s.room] = [render.who(m) for m in ev.welcome.members]
                if s.reconnects == 0:
                    me = render.name(ev.welcome.you.login)
                    say(("ansibrightblack", f"-- joined #{s.room} as {me} "
                                            f"({len(ev.welcome.members)} here)"))
                else:
                    say(("ansibrightblack", f"-- reconnected to #{s.room}"))
            elif ev.kind == "presence" and ev.presence is not None:
                p = ev.presence
                self.members[s.room] = [render.who(m) for m in p.members]
                verb = "joined" if p.kind == pb.PRESENCE_KIND_JOINED else "left"
                if p.who.login and (p.kind == pb.PRESENCE_KIND_LEFT or
                                    p.who.login != self.info_login):
                    say(("ansibrightblack", f"-- {render.who(p.who)} {verb} "
                                            f"#{p.room}"))
            elif ev.kind == "error":
                say(("ansired", f"!! {ev.text}"))
            elif ev.kind == "status":
                say(("ansiyellow", f"-- {ev.text}"))
            elif ev.kind == "fatal":
                say(("ansired bold", f"!! {ev.text}"))
                self.fatal = ev.text
                if self.session is not None and self.session.app.is_running:
                    self.session.app.exit()
            self.refresh()

    async def leave(self) -> None:
        s = self.rooms.pop(self.current, None)
        if s is None:
            return
        self.tasks.pop(self.current).cancel()
        await s.close()
        say(("ansibrightblack", f"-- left #{self.current}"))
        self.current = next(iter(self.rooms), "")

    async def command(self, line: str) -> bool:
        """Handle one input line; False means quit."""
        if not line.strip():
            return True
        if not line.startswith("/") or line.startswith("//"):
            if not self.current:
                say(("ansired", "!! not in a room; /join ROOM"))
            else:
                self.rooms[self.current].send(line[1:] if line.startswith("//") else line)
            return True
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd == "help":
            say(("", HELP))
        elif cmd == "me" and arg and self.current:
            self.rooms[self.current].send(arg, pb.MESSAGE_KIND_ACTION)
        elif cmd == "join" and ROOM_RE.fullmatch(arg):
            await self.join(arg)
        elif cmd == "join":
            say(("ansired", "!! /join ROOM (a-z, 0-9, -, _)"))
        elif cmd == "leave":
            await self.leave()
        elif cmd == "who":
            say(("", f"in #{self.current}: " + ", ".join(self.members.get(self.current, []))))
        elif cmd in ("rooms", "history"):
            await self._query(cmd, arg)
        else:
            say(("ansired", f"!! unknown command /{cmd}; /help"))
        return True

    async def _query(self, cmd: str, arg: str) -> None:
        import grpc

        conn = await self.connect_fn()
        try:
            if cmd == "rooms":
                rooms = await conn.list_rooms()
                for r in rooms.rooms:
                    who = ", ".join(render.who(m) for m in r.members)
                    here = f"  here: {who}" if who else ""
                    say(("", f"#{r.name}"), ("ansibrightblack", f"  {r.last_id} messages{here}"))
            else:
                n = int(arg) if arg.isdigit() else 20
                page = await conn.history(self.current, limit=n)
                first_live = min((m.id for m in page.messages), default=0)
                say(("ansibrightblack", f"-- last {len(page.messages)} messages of #"
                                        f"{self.current} (from #{first_live})"))
                for m in page.messages:
                    show_message(m, self.current)
        except grpc.aio.AioRpcError as e:
            say(("ansired", f"!! {e.details()}"))
        finally:
            await conn.close()

    async def close(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        for s in self.rooms.values():
            await s.close()


async def run_tui(server: str, room: str, *, token: str, socket: str, proxy: str, port: int,
                  address: str = "") -> int:
    async def connect_fn() -> Connection:
        return await connect(server, token, socket=socket, port=port, proxy=proxy,
                             address=address)

    # Fail fast with a clear message if discovery or the locks refuse us.
    first = await connect_fn()
    try:
        me = await first.whoami()
    finally:
        await first.close()
    ui = ChatUI(connect_fn, server)
    ui.info_login = me.identity.login
    session: PromptSession[str] = PromptSession(bottom_toolbar=ui.toolbar, refresh_interval=0.5)
    ui.session = session
    say(("ansibrightblack", f"tsnetchat: {render.name(me.identity.login)} on "
                            f"{render.name(me.identity.node)}; /help for commands"))
    with patch_stdout(raw=True):
        await ui.join(room)
        try:
            while True:
                try:
                    line = await session.prompt_async(lambda: f"#{ui.current}> ")
                except EOFError:
                    break
                except KeyboardInterrupt:
                    continue
                if line is None or not await ui.command(line):
                    break
        finally:
            await ui.close()
    if ui.fatal:
        say(("ansired", f"disconnected: {ui.fatal}"))
        return 5
    return 0
