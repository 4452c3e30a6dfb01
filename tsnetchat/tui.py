"""The interactive terminal chat: a prompt_toolkit full-screen application.

Why prompt_toolkit and not Textual: it was already our dependency, it runs on the same
asyncio loop as grpc.aio with nothing in between, it starts in a few tens of milliseconds
(Textual pulls in Rich and its own CSS and widget machinery, about 10 MB, for a screen
that is three panes and an input line), and its ``UIControl`` lets the message pane draw
exactly the lines ``chatview`` lays out (hanging indents, markers, scrollback) instead of
fighting a widget's own wrapping.

Screen::

    rooms │ [the topic of the current room, when it has one]
    DMs   │ messages of the current conversation (scrollback: PgUp/PgDn)
          │
    [a line saying what is wrong with the connection, only while something is]
    status: you, room, members, connection, pending
    #room> the input (several lines: Alt-Enter or Ctrl-J)

Every room is a ``client.RoomSession`` on one shared ``client.Link`` and ``outbox.Pacer``:
what is typed stays in the room's outbox, shown pending, until the server stores it;
nothing is lost across reconnects, nothing shown twice. Unread and mention counts in the
room list are the server's (``Unread``, polled, and at once when something arrives in a
room not on screen), so every device of a person shows the same; reading a buffer moves the
read position (an Ack on its stream). DMs are rooms named ``dm:`` plus logins; one that
someone else starts appears when the server first counts it unread. No exception text ever
reaches the screen: failures pass through ``clienterrors``; anything unexpected is logged to a file
(``log_path``) and shown as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from prompt_toolkit.application import Application, run_in_terminal
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.key_binding.bindings.basic import load_basic_bindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import (
    ConditionalContainer,
    Dimension,
    FormattedTextControl,
    HSplit,
    Layout,
    VSplit,
    Window,
)
from prompt_toolkit.layout.controls import BufferControl, UIContent, UIControl
from prompt_toolkit.layout.processors import (
    BeforeInput,
    Processor,
    Transformation,
    TransformationInput,
)
from prompt_toolkit.layout.screen import Char
from prompt_toolkit.output import create_output
from prompt_toolkit.styles import Style

from . import commands, keepsafe, openrooms
from .chatview import (
    Conversation,
    Renderer,
    clock,
    describe_members,
    dm_name,
    dm_title,
    is_mention,
    kind_of,
    mention_pattern,
    on_screen,
    person_login,
    visible,
    visible_lines,
    who,
    width_of,
    wrap,
)
from .client import (
    Link,
    RoomSession,
    SessionEvent,
    cancelled_under_us,
    first_answer,
    link_for,
    to_stderr,
)
from .clienterrors import EXIT_ERROR, ClientError, internal
from .config import user_state_dir
from .errors import ConfigError, InvalidInput
from .outbox import Outgoing, Pacer, State, split_text, utf8_len, with_newlines
from .pb import chat_pb2 as pb
from .render import UNSAFE, UNSHOWN, validate_text
from .resume import Phase, StreamState, worst

log = logging.getLogger("tsnetchat.tui")

SIDEBAR = 20
# After our own reconnect, people who were here before it and rejoin within this many
# seconds were cut off by the same outage (a server restart): no "joined" line for them.
QUIET_REJOINS = 15.0
# A line the server keeps refusing for now ("not stored": a full or locked disk) says so
# once in this long, per room and reason: it sat at "2 pending" for 20 s with nothing said
# (a kill -9 run, 2026-11-24).
DEFERRED_SAID_EVERY = 30.0
# A rate refusal shorter than this is the chat's own pacing, said nowhere; a longer one (a
# new conversation a minute, edits a minute) is said: a first DM sat "pending" a minute.
DEFERRED_QUIET = 2.0
# How often the room list asks the server for unread counts when nothing happens here (a
# second device reading, a DM started elsewhere); one cheap call (Unread).
UNREAD_EVERY = 3.0
# How often what is typed and not stored is written to the chat's ``keepsafe`` file when it
# changed (and after every line submitted): what a kill -9 can take is what was typed in the
# last second.
KEEP_EVERY = 1.0
SEARCH_PAGE = 100
SEARCH = "?search"  # the search buffer's key: no room can be named so
MAX_LISTED_DMS = 20  # DMs in the room list at the start, newest first
# prompt_toolkit's own paste (a terminal's \r\n or \r is a line end), which the chat's
# runs before it looks at what was pasted: no copy of its rules to fall behind them.
PASTE = load_basic_bindings().get_bindings_for_keys((Keys.BracketedPaste,))[-1]
STYLE = Style.from_dict({
    "time": "#8a8a8a",
    "notice": "#8a8a8a",
    "error": "#ff5f5f bold",
    "separator": "#6c6c6c",
    "marker": "#ff8700 bold",
    "continuation": "#6c6c6c",
    "gutter.own": "#5fafff bold",
    "gutter.mention": "#ffd700 bold",
    "gutter.failed": "#ff5f5f bold",
    "text.mention": "#ffd700",
    "edited": "#8a8a8a",
    "deleted": "#8a8a8a italic",
    "topic": "bg:#262626 #d0d0d0",
    "pending": "#8a8a8a italic",
    "sidebar": "",
    "sidebar.current": "reverse bold",
    "sidebar.unread": "bold",
    "sidebar.mention": "#ffd700 bold",
    "sidebar.down": "#8a8a8a",
    "border": "#6c6c6c",
    "status": "bg:#303030 #d0d0d0",
    "status.ok": "bg:#303030 #87d75f bold",
    "status.bad": "bg:#303030 #ffaf00 bold",
    "problem": "bg:#5f0000 #ffffff",
    "prompt": "bold",
})


def log_path() -> Path:
    """The chat's log, in this user's state dir (``config.user_state_dir``), beside the
    rest it keeps."""
    return user_state_dir() / "client.log"


class MessagePane(UIControl):
    """Draws the current conversation at the pane's size (``chatview.visible_lines``)."""

    def __init__(self, chat: ChatApp) -> None:
        self.chat = chat
        self.height = 20

    def create_content(self, width: int, height: int | None) -> UIContent:
        self.height = height or self.height
        conv = self.chat.conversation or self.chat.system
        session = self.chat.sessions.get(conv.name)
        lines, at_top = visible_lines(conv, self.chat.renderer, width, self.height,
                                      list(session.outbox) if session else [], self.chat.me)
        if at_top and conv.scroll and not conv.history_complete:
            self.chat.load_older(conv)
        pad: list[StyleAndTextTuples] = [[] for _ in range(max(0, self.height - len(lines)))]
        shown: list[StyleAndTextTuples] = [*pad, *lines]  # type: ignore[list-item]
        return UIContent(get_line=lambda i: shown[i], line_count=len(shown),
                         show_cursor=False)

    def is_focusable(self) -> bool:
        return False


# The characters of ``render.UNSAFE`` that prompt_toolkit would write to the terminal as they
# are (it shows C0 and C1 controls itself, as ^G and <80>): ``render.UNSHOWN``.
RAW_UNSAFE = re.compile(f"[{UNSHOWN}]")


class ShownSafe(Processor):
    """The input's ``RAW_UNSAFE`` characters shown as one marked ``�`` each, never to the
    terminal as they are: a pasted U+202E reversed the rest of the line on the screen (a
    daily user's day, 2026-11-25). One character for one, so the cursor needs no mapping."""

    def apply_transformation(self, ti: TransformationInput) -> Transformation:
        out: StyleAndTextTuples = []
        for style, text, *rest in ti.fragments:
            if not RAW_UNSAFE.search(text):
                out.append((style, text, *rest))  # type: ignore[arg-type]
                continue
            for part in re.split(f"({RAW_UNSAFE.pattern}+)", text):
                if part:
                    out.append((f"{style} class:error", "�" * len(part))
                               if RAW_UNSAFE.match(part) else (style, part))
        return Transformation(out)


class HangingPrompt(Processor):
    """Lines after the first of a multi-line input start under the first line's text."""

    def __init__(self, width: Callable[[], int]) -> None:
        self.width = width

    def apply_transformation(self, ti: TransformationInput) -> Transformation:
        if ti.lineno == 0:
            return Transformation(ti.fragments)
        pad = self.width()
        return Transformation([("class:continuation", " " * pad), *ti.fragments],
                              source_to_display=lambda i: i + pad,
                              display_to_source=lambda i: max(0, i - pad))


class TabCompletion:
    """Tab completes the word before the cursor at once; Tab again, with nothing typed in
    between, cycles the candidates. (prompt_toolkit's own completion runs in the background:
    2026-11-22, in tmux, text typed right after Tab arrived first and the completion was
    dropped.)"""

    def __init__(self) -> None:
        self.candidates: list[str] = []
        self.index = 0
        self.start = 0  # where the completed word begins
        self.applied = ""  # the text before the cursor right after the last Tab

    def press(self, buffer: Buffer, candidates: Callable[[str], list[tuple[str, int]]]
              ) -> None:
        before = buffer.document.text_before_cursor
        if self.candidates and before == self.applied:
            self.index = (self.index + 1) % len(self.candidates)
        else:
            found = candidates(before)
            if not found:
                self.candidates = []
                return
            self.candidates = [text for text, _ in found]
            self.start, self.index = len(before) + found[0][1], 0
        after = buffer.document.text_after_cursor
        new_before = before[:self.start] + self.candidates[self.index]
        buffer.document = Document(new_before + after, len(new_before))
        self.applied = new_before


def notify_argv(notify_send: str, title: str, body: str) -> list[str]:
    """notify-send's arguments for a notification whose title and body other people wrote:
    after ``--``, so text such as "--urgency=critical" is shown, not taken as an option (an
    attacker's run, 2026-11-23)."""
    return [notify_send, "--app-name=tsnetchat", "--", title, body]


class ChatApp:
    """The conversations, their sessions, the screen and the commands."""

    def __init__(self, link: Link, me: pb.WhoAmIResponse, *, notify: bool = False,
                 keep: keepsafe.KeepSafe | None = None, inherited: Sequence[str] = (),
                 orphans: keepsafe.Orphans | None = None) -> None:
        self.link = link
        self.me = me.identity
        self.notify = notify
        # Where what is typed and not stored is kept while the chat runs (None: at its exit
        # only); and lines a chat that ended without its exit left, that this one could not
        # write to unsent.txt: listed with this chat's own until they are.
        self.keep = keep
        self.inherited = list(inherited)
        # Lines on their way to a room that went away without them (``keep_outbox``), as
        # listed at the exit.
        self.dropped: list[str] = []
        self.orphans = orphans  # (their files: forgotten once ``keep`` holds what they held)
        self.pacer = Pacer()
        self.renderer = Renderer()
        self.conversations: dict[str, Conversation] = {}
        self.sessions: dict[str, RoomSession] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.known_rooms: set[str] = {r for r in me.rooms if r != "*"}
        self.current: str | None = None
        # A /join's room and the buffer shown before it, until the server welcomes us: a
        # refused join goes back there. (The new buffer is shown at once, so what is typed
        # next goes to the room joined. It used to be shown only once welcomed: a line typed
        # meanwhile, or while the server was down, went to the room before.)
        self.came_from: dict[str, str | None] = {}
        self.searched_from: str | None = None  # the buffer shown when /search opened its own
        self.created: set[str] = set()  # private rooms /create made and then joined
        # A room closed for good that /join asks for again: its old session, until welcomed.
        self.rejoining: dict[str, RoomSession] = {}
        self.system = Conversation("tsnetchat", kind="system")  # shown when in no room
        self.split_offer: str | None = None  # an over-long text the person may send in parts
        self.unmarked_paste = False  # an Enter of these keys read at once was a line end
        # What the chat's start has to say, by room (or "" for the chat): the rooms it opens
        # (``reopen``: a --room, the rooms open last time) that are refused, said in the
        # room shown, where the backlog that followed scrolled it away (a new user's day,
        # 2026-11-24); lines an earlier chat could not send. Held in the problem bar, below
        # any trouble with the connection, until the next line typed (a room's, until it is
        # joined after all).
        self.start_notes: dict[str, str] = {}
        self.opening: set[str] = set()  # the rooms the start opens, until answered
        # DMs joined because someone wrote, until shown: never shown in place of a room left
        # (the next line went to a DM the person had not looked at; a new user's day).
        self.unasked: set[str] = set()
        self.loading: set[str] = set()
        self.background: set[asyncio.Task[None]] = set()
        self.quitting = False
        # What the server says of us (a Welcome's or a presence's away list, our own AWAY
        # with its message), not what we asked for: an /away it refuses (too long, too
        # often) must not show us away. ("" while away with no message, or one not known.)
        self.away: str | None = None
        self.away_asked = ("", "", "")  # the last /away or /back: (its id, line, room)
        self.unread_wake = asyncio.Event()  # ask the server for unread counts now
        # /edit or /delete typed while one's last message is still on its way: done once the
        # server has stored it (with its id), or dropped with a line if it is refused.
        self.after_sent: dict[str, Callable[[int | None], None]] = {}
        self.waiting_changes: dict[str, tuple[str, str]] = {}  # the same: (line, room)
        # Commands sent and not answered yet (/topic, /edit, /kick...): (line, room), listed
        # with what was not sent if the chat ends first (a /topic typed while the server
        # could not be reached was gone without a word; a daily user's run, 2026-11-24).
        self.commands_out: dict[object, tuple[str, str]] = {}
        self.mentions = mention_pattern([self.me.login, self.me.login.split("@")[0],
                                         self.me.display_name])
        self.input = Buffer(multiline=True, accept_handler=self.accepted)
        # What was being typed in each room while another is shown (the line was shared:
        # half a sentence for #ops went to #general with the next Enter; a new user's day,
        # 2026-11-23). ``submitting``: a line is being carried out, and is not a draft.
        self.drafts: dict[str, Document] = {}
        # What the last chat had typed, by room, until the room is joined; and as it was.
        self.restored: dict[str, str] = {}
        self.restored_as: dict[str, str] = {}
        self.shown_again: set[str] = set()  # rooms restarted from a restored history
        # "reconnected after ..." by room, said once the replay of what came meanwhile is
        # shown: said at the welcome, "nothing missed" stood above the lines missed.
        self.rejoined: dict[str, str] = {}
        self.deferred_said: dict[str, tuple[str, float]] = {}  # room -> (reason, when said)
        self.submitting = False
        self.history = commands.InputHistory()
        self.tab = TabCompletion()
        self.input.on_text_changed += lambda _: setattr(self, "split_offer", None)
        self.pane = MessagePane(self)
        self.app: Application[int] = Application(
            layout=Layout(self._layout(), focused_element=self.input),
            key_bindings=self._keys(), style=STYLE, full_screen=True, mouse_support=False,
            refresh_interval=0.5, output=create_output(stdout=sys.stdout))

    # --- what is on screen ------------------------------------------------------------

    @property
    def conversation(self) -> Conversation | None:
        return self.conversations.get(self.current) if self.current else None

    def _layout(self) -> HSplit:
        problem = Condition(lambda: bool(self.problem()))
        topic = Condition(lambda: bool(self.topic_bar()))
        # Below this many columns the room list would leave too little for the messages.
        wide = Condition(lambda: self.app.output.get_size().columns >= 3 * SIDEBAR)
        return HSplit([
            VSplit([
                ConditionalContainer(VSplit([
                    Window(FormattedTextControl(self.sidebar), width=SIDEBAR,
                           style="class:sidebar"),
                    Window(width=1, char="│", style="class:border")]), filter=wide),
                HSplit([
                    ConditionalContainer(Window(FormattedTextControl(self.topic_bar), height=1,
                                                style="class:topic"), filter=topic),
                    Window(self.pane, wrap_lines=False)]),
            ]),
            # (wrapped, up to three lines: one cut a long reason off mid-word, the part
            # that said what to do; a new user's day, 2026-11-24)
            ConditionalContainer(Window(FormattedTextControl(self.problem_bar),
                                        height=Dimension(min=1, max=3), wrap_lines=True,
                                        dont_extend_height=True, style="class:problem"),
                                 filter=problem),
            Window(FormattedTextControl(self.status_bar), height=1, style="class:status"),
            Window(BufferControl(self.input, input_processors=[
                ShownSafe(),
                BeforeInput(self.prompt, style="class:prompt"),
                HangingPrompt(lambda: width_of(self.prompt()))]),
                height=Dimension(min=1, max=10), dont_extend_height=True, wrap_lines=True),
        ])

    def prompt(self) -> str:
        conv = self.conversation
        return f"{conv.title}> " if conv else "(no room)> "

    def topic_bar(self) -> StyleAndTextTuples:
        conv = self.conversation
        if conv is None or conv.topic is None or not conv.topic.text:
            return []
        by = who(conv.topic.set_by) if conv.topic.set_by.login else ""
        return [("", f" {visible(conv.topic.text)}".replace("\n", " ")),
                ("class:notice", f"  (set by {by})" if by else "")]

    def sidebar(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        for n, (name, conv) in enumerate(self.conversations.items(), 1):
            session = self.sessions.get(name)
            phase = session.state.phase if session else Phase.CLOSED
            counts = ""
            if conv.mentions:
                counts = f"@{conv.mentions}"
            if conv.unread:
                counts += f"{'·' if counts else ''}{conv.unread}"
            if session is None:
                pass  # a search buffer, or a room listed for its unread count: not joined
            elif phase is not Phase.CONNECTED:
                counts = {Phase.FAILED: "✗", Phase.CONNECTING: "…"}.get(phase, "~") + counts
            elif conv.activity and not counts:
                counts = "*"
            label = f"{n if n < 10 else ' '} {conv.title}"
            room_w = SIDEBAR - 1 - width_of(counts)
            label = label[:room_w].ljust(room_w)
            style = ("class:sidebar.current" if name == self.current else
                     "class:sidebar.mention" if conv.mentions else
                     "class:sidebar.unread" if conv.unread else
                     "class:sidebar.down" if phase is not Phase.CONNECTED and session else "")
            out.append((style, f"{label}{counts} \n"))
        return out

    def problem(self) -> str:
        """What is wrong with the way to the server: the shown room's trouble if it has any
        (its countdown is the status bar's: two countdowns disagreed with several rooms
        open; a new user's day, 2026-11-24), else the worst of the others'; and on a line
        after it, the notes of the chat's start (``start_notes``)."""
        troubled = (Phase.RECONNECTING, Phase.CONNECTING, Phase.WAITING)
        here = self.sessions.get(self.current or "")
        if here is not None and here.state.phase in troubled and here.state.error is not None:
            bad: StreamState | None = here.state
        else:
            bad = worst([s.state for s in self.sessions.values()
                         if s.state.phase is not Phase.FAILED])
        lines = [] if bad is None or bad.error is None or bad.phase not in troubled else [
            bad.describe(time.monotonic())]
        if self.start_notes:
            lines.append(" · ".join(self.start_notes.values()))
        return "\n".join(" " + x for x in lines)

    def problem_bar(self) -> StyleAndTextTuples:
        # (between words: cut at the terminal's edge it read "nothi / ng answers")
        width = max(10, self.app.output.get_size().columns - 1)
        rows = [r for line in self.problem().split("\n") for r in wrap(line, width)]
        return [("", "\n".join(rows))]

    def status_bar(self) -> StyleAndTextTuples:
        """Who and where, then the state of the room shown. What is pending, not sent or
        away must show at any width: where the line is too narrow the device, the member
        count, who one is and then the end of the title go first (below about 90 columns the
        pending count was cut off: a new user's day, 2026-11-24)."""
        state = self.state_parts()
        room_w = self.app.output.get_size().columns - sum(width_of(p[1]) for p in state)
        node = self.me.node.split(".")[0]
        me = f" {visible(self.me.login)} ({visible(node)}) │ "
        where: list[tuple[str, str]] = []
        conv = self.conversation
        if conv is None:
            where.append(("", "not in a room: /join ROOM"))
        else:
            n = len(conv.members)
            where.append(("", f"{conv.title} │ "))
            session = self.sessions.get(conv.name)
            if session is not None and session.state.phase is not Phase.FAILED:
                where.append(("", f"{n} member{'s' if n != 1 else ''} │ "))

        def fits(first: str, parts: list[tuple[str, str]]) -> bool:
            return width_of(first) + sum(width_of(t) for _, t in parts) <= room_w

        if not fits(me, where):
            me = f" {visible(self.me.login)} │ "
        if not fits(me, where) and len(where) > 1:
            where = where[:1]
        if not fits(me, where):
            me = " "
        if conv is not None and not fits(me, where):  # last, the title (a DM of several)
            title = conv.title
            while title and not fits(me, [("", f"{title}… │ ")]):
                title = title[:-1]
            where = [("", f"{title}… │ ")]
        if not state or state[0][1].startswith(" │ "):  # (no connection: a search buffer)
            # (it ended "?restart │", or read "?restart │  │ away: /back")
            where[-1] = (where[-1][0], where[-1][1].removesuffix(" │ "))
        return [("", me), *where, *state]

    def state_parts(self) -> StyleAndTextTuples:
        """The shown room's connection, what is pending or not sent, away, scrolled up."""
        parts: StyleAndTextTuples = []
        conv = self.conversation
        session = self.sessions.get(self.current or "")
        if session is not None:
            state = session.state
            if state.phase is Phase.CONNECTED:
                parts.append(("class:status.ok", "connected"))
            elif state.phase is Phase.RECONNECTING:
                parts.append(("class:status.bad",
                              f"reconnecting in {state.countdown(time.monotonic()):.0f}s"))
            else:
                parts.append(("class:status.bad", state.phase.value))
            pending = len(session.outbox.pending)
            if pending:
                parts.append(("", f" │ {pending} pending"))
            failed = len(session.outbox.failed)
            if failed:
                parts.append(("class:status.bad", f" │ {failed} not sent: /retry"))
        if self.away is not None:
            parts.append(("class:status.bad", " │ away: /back"))
        if conv is not None and conv.scroll:
            # (a message arriving meanwhile, a mention too, changed nothing here: a new
            # user's day, 2026-11-24)
            parts.append(("class:status.bad", " │ scrolled up: PgDn"
                          + (f" ({conv.below} new)" if conv.below else "")))
        return parts

    def suspend(self) -> None:
        """Stop as a shell job, the terminal given back in its usual mode first; `fg` brings
        the chat back in its own. For Ctrl-Z and for a SIGTSTP from outside (`kill -TSTP`,
        which the chat now catches: stopped by the signal's default, it came back after `fg`
        with the terminal left line by line, where Enter no longer sent; a new user's day,
        2026-11-23)."""
        loop = asyncio.get_running_loop()

        def stop() -> None:
            loop.remove_signal_handler(signal.SIGTSTP)  # (so the signal below stops us)
            try:
                os.kill(0, signal.SIGTSTP)  # the process group, as a shell's Ctrl-Z does
            finally:
                loop.add_signal_handler(signal.SIGTSTP, self.suspend)

        run_in_terminal(stop)

    def resumed(self) -> None:
        """SIGCONT: the chat runs again. After a stop it could not catch (kill -STOP), the
        shell had put the terminal back line by line, where Enter no longer sent (a daily
        user's run, 2026-11-24): the chat's mode is set again (prompt_toolkit's own, which
        its ``raw_mode`` from the start still undoes when the chat ends) and the screen is
        drawn whole. (After Ctrl-Z, the mode is already set: one more redraw.)"""
        if not self.app.is_running or self.quitting:
            return
        from prompt_toolkit.input.vt100 import raw_mode

        with contextlib.suppress(Exception):  # (not a terminal: nothing to set)
            raw_mode(self.app.input.fileno()).__enter__()  # (no __exit__: see above)
        self.app.renderer.reset()
        self.app.invalidate()

    def invalidate(self) -> None:
        if self.app.is_running:
            self.app.invalidate()

    def say(self, text: str, *, error: bool = False) -> None:
        """A line in the current conversation (or, in none, on the screen shown then)."""
        conv = self.conversation or self.system
        conv.notice(text, error=error, renderer=self.renderer)
        self.invalidate()

    # --- keys -----------------------------------------------------------------------------

    def _keys(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("enter")
        def _(event: KeyPressEvent) -> None:
            # A terminal that does not mark a paste (GNU screen; tmux a moment after a
            # resize, before the chat asks for it again) types each of its line ends as
            # Enter: 300 lines pasted went to the room as 300 messages (a daily user's day,
            # 2026-11-25). An Enter with pasted text after it (``_text_follows``), or after
            # one such, is a line end of a paste; the Enter typed after it sends it all.
            if self.unmarked_paste or self._text_follows(event):
                self.input.insert_text("\n")
                if not self.unmarked_paste:
                    self.unmarked_paste = True
                    asyncio.get_running_loop().call_soon(self._read_at_once)
                return
            self.submit()

        @kb.add("escape", "enter")
        @kb.add("c-j")
        def _(event: KeyPressEvent) -> None:
            self.input.insert_text("\n")

        @kb.add("c-u")
        def _(event: KeyPressEvent) -> None:
            # The whole input before the cursor, as a one-line input's Ctrl-U: prompt_toolkit's
            # clears one line of it, and a pasted block took a press per line end to clear (a
            # daily user's day, 2026-11-25). Ctrl-Y puts it back, as it does after theirs.
            gone = self.input.delete_before_cursor(len(self.input.document.text_before_cursor))
            if gone:
                event.app.clipboard.set_text(gone)

        @kb.add(Keys.BracketedPaste)
        def _(event: KeyPressEvent) -> None:
            start = self.input.cursor_position
            PASTE.call(event)  # (inserted at the cursor; overwritten from it in overwrite mode)
            data = self.input.text[start:self.input.cursor_position]
            bad = UNSAFE.search(data)
            if bad is not None:  # (said only at Enter, while it showed as it was)
                shown = Char.display_mappings.get(bad.group(), "�")  # (as the input shows it)
                self.say(f"the pasted text holds a character the server refuses (U+"
                         f"{ord(bad.group()):04X}, shown as {shown}): delete it before you "
                         "send", error=True)

        @kb.add("escape", "#")
        def _(event: KeyPressEvent) -> None:
            # (prompt_toolkit's own Alt-# puts a # before every line and accepts the input:
            # the line went out as "#..."; 2026-11-25)
            self.input.insert_text("#")

        @kb.add("c-c")
        @kb.add("c-d")
        @kb.add(Keys.SIGINT)
        def _(event: KeyPressEvent) -> None:
            self.quit()

        @kb.add("c-z")
        def _(event: KeyPressEvent) -> None:
            # Suspended as a shell job; `fg` redraws. (It typed an invisible U+001A that the
            # server then refused: a new user's day, 2026-11-23.)
            self.suspend()

        @kb.add("up")
        def _(event: KeyPressEvent) -> None:
            if self.input.document.cursor_position_row > 0:
                self.input.cursor_up()
            else:
                self.recall(self.history.older(self.input.text))

        @kb.add("down")
        def _(event: KeyPressEvent) -> None:
            doc = self.input.document
            if doc.cursor_position_row < doc.line_count - 1:
                self.input.cursor_down()
            else:
                self.recall(self.history.newer())

        @kb.add("pageup")
        def _(event: KeyPressEvent) -> None:
            self.scroll(+1)

        @kb.add("pagedown")
        def _(event: KeyPressEvent) -> None:
            self.scroll(-1)

        @kb.add("c-end")
        def _(event: KeyPressEvent) -> None:
            if self.conversation is not None:
                self.conversation.scroll = self.conversation.below = 0

        @kb.add("c-n")
        def _(event: KeyPressEvent) -> None:
            self.cycle(+1)

        @kb.add("c-p")
        def _(event: KeyPressEvent) -> None:
            self.cycle(-1)

        for i in range(1, 10):
            @kb.add("escape", str(i))
            def _(event: KeyPressEvent, i: int = i) -> None:
                names = list(self.conversations)
                if i <= len(names):
                    self.switch(names[i - 1])

        @kb.add("tab")
        def _(event: KeyPressEvent) -> None:
            if self.unmarked_paste:  # (a tab of the text pasted, not a completion asked for)
                self.input.insert_text("\t")
                return
            self.tab.press(self.input, self.completions)

        return kb

    def recall(self, text: str | None) -> None:
        if text is not None:
            self.input.document = Document(text, len(text))

    def completions(self, before: str) -> list[tuple[str, int]]:
        conv = self.conversation
        nicks = [who(m) for m in conv.members] if conv else []
        if commands.wants_people(before):
            nicks += [who(m) for m in self.people()]
        rooms = self.known_rooms | {n for n in self.conversations if n != SEARCH}
        return commands.complete(before, rooms=rooms, nicks=nicks)

    def scroll(self, direction: int) -> None:
        conv = self.conversation
        if conv is None:
            return
        page = max(1, self.pane.height - 2)
        conv.scroll = max(0, conv.scroll + direction * page)
        if not conv.scroll:
            conv.below = 0

    def cycle(self, step: int) -> None:
        names = list(self.conversations)
        if names:
            i = names.index(self.current) if self.current in names else -step
            self.switch(names[(i + step) % len(names)])

    def switch(self, name: str) -> None:
        if name == self.current or name not in self.conversations:
            return
        if self.conversations[name].listed:  # counted by the server, not joined yet
            self.came_from[name] = self.current
            self.join(name, switch=False)
        self.unasked.discard(name)
        old = self.conversation
        if old is not None:
            old.left()
        if not self.submitting:
            self.keep_draft(name)
        self.current = name
        conv = self.conversations[name]
        conv.looked_at()
        self.seen(conv)
        self.invalidate()

    def keep_draft(self, going_to: str) -> None:
        """Keep what is typed for the room shown now, and bring back ``going_to``'s. Typing
        that has no room any more (a /join refused while it was typed) stays in the input,
        with ``going_to``'s draft on the lines after it."""
        if self.current is not None and self.current in self.conversations:
            if self.history.recalled() is None:
                self.drafts[self.current] = self.input.document
            else:  # (Up's line is not the room's draft: the line Up was pressed on is)
                text = self.typed_here()
                self.drafts[self.current] = Document(text, len(text))
            self.history.leave()
            self.input.reset()
        self.bring_back_draft(going_to)

    def typed_here(self) -> str:
        """What the person typed in the input: the text shown, except a line Up brought back
        unchanged, and the line Up was pressed on (``InputHistory.draft``) before it. Quitting
        while Up showed an old line kept the old line and lost the one being typed, and
        the half-typed line followed the next room switched to (a kill -9 run, 2026-11-24)."""
        recalled = self.history.recalled()
        if recalled is None:
            return self.input.text
        shown = "" if self.input.text == recalled else self.input.text
        return "\n".join(t for t in (self.history.draft, shown) if t.strip())

    def bring_back_draft(self, room: str) -> None:
        """``room``'s draft into the input, after what is there (kept) on a line of its own."""
        draft = self.drafts.pop(room, None)
        if draft is None:
            return
        if self.input.text:
            text = f"{self.input.text}\n{draft.text}"
            draft = Document(text, len(text))
        self.input.document = draft

    def seen(self, conv: Conversation) -> None:
        """Everything in ``conv`` is on screen: its read position moves (Ack)."""
        session = self.sessions.get(conv.name)
        last = next((e.id for e in reversed(conv.entries) if e.id), 0)
        if session is not None and last:
            session.read_up_to(last)

    # --- input ----------------------------------------------------------------------------

    def _text_follows(self, event: KeyPressEvent) -> bool:
        """Whether text comes right after this Enter: the next key read with it is one a
        paste holds (a character, a line end, a tab), or the terminal has more bytes to
        read. (An Up or a Ctrl-C read with an Enter is typed, not pasted: that Enter
        sends.) prompt_toolkit reads 1,024 bytes at a time: a paste of 2,050 bytes was sent
        by its own last line end, the only one in its last read (2026-11-25)."""
        queue = event.app.key_processor.input_queue
        if queue:
            key = queue[0].key
            return not isinstance(key, Keys) or key in (Keys.ControlM, Keys.ControlJ,
                                                        Keys.ControlI)
        return self._bytes_waiting()

    def _bytes_waiting(self) -> bool:
        """Whether the terminal has bytes the chat has not read yet."""
        try:
            return bool(select.select([self.app.input.fileno()], [], [], 0)[0])
        except (OSError, ValueError, NotImplementedError):  # (no file: nothing waits)
            return False

    def _read_at_once(self) -> None:
        """The keys read at once are carried out (``unmarked_paste``), unless the paste
        goes on in bytes the terminal has not given yet: its last line end is not the
        Enter that sends it."""
        if self._bytes_waiting() and self.app.is_running:  # (else nothing reads them)
            asyncio.get_running_loop().call_soon(self._read_at_once)
            return
        self.unmarked_paste = False

    def accepted(self, _: Buffer) -> bool:
        """A line accepted by one of prompt_toolkit's own keys (Ctrl-O): carried out as by
        Enter, the input left to ``submit`` (without a handler the input was cleared, the
        line neither sent nor kept: a daily user's day, 2026-11-25)."""
        self.submit()
        return True

    def submit(self) -> None:
        text = self.input.text
        if not text.strip():
            if "\n" in text:  # (blank lines pasted: Enter did nothing, the input stuck)
                self.input.reset()
            return
        before = self.current
        self.submitting = True
        self.start_notes.clear()
        self.opening.clear()
        try:
            keep = self.handle(text)
        finally:
            self.submitting = False
        if keep and self.current == before and self.history.recalled() is not None:
            pass  # (a line Up brought, kept to edit: the one Up was pressed on waits for Down)
        else:
            # The line Up was pressed on comes back once the one Up brought is submitted (it
            # was gone): into the input, or the draft of its room if this line left it (a
            # room left keeps its draft for the next /join).
            draft = self.history.leave()
            self.history.add(text)
            if not keep:
                self.input.reset()
            if draft.strip() and before is not None and before != self.current:
                self.drafts[before] = appended(self.drafts.get(before, Document()).text, draft)
            elif draft.strip():
                self.input.document = appended(self.input.text, draft)
        if self.current != before:  # (a /join, /msg or /leave: the room shown now may have
            self.bring_back_draft(self.current or "")  # a draft, after a line kept to edit)
        # At once, not at the next second's: a line sent and then killed with the chat came
        # back from the file as a draft, to be sent twice.
        self.keep_safe()
        self.invalidate()

    def handle(self, line: str) -> bool:
        """Carry out one submitted line; True keeps it in the input for editing."""
        parsed = commands.parse(line)
        if isinstance(parsed, commands.Problem):
            # (the line stayed without a word, and read as lost or as still to be sent: a
            # new user's day, 2026-11-24)
            self.say(f"{parsed.text} (your text is still in the input)", error=True)
            return True
        if isinstance(parsed, commands.Message):
            return self.send(parsed.text, pb.MESSAGE_KIND_TEXT, line)
        name = parsed.command.name
        if name == "quit":
            self.quit()
        elif name == "help":
            self.say(commands.help_text(parsed.text))
        elif name == "me":
            return self.send(parsed.text, pb.MESSAGE_KIND_ACTION, line)
        elif name == "join":
            self.join(parsed.room)
        elif name == "leave" and parsed.nicks:  # a DM, named by its people
            known = self.people()
            room = dm_name(self.me.login, *(person_login(p, self.me.login, known)
                                            for p in parsed.nicks))
            self.leave(next((n for n in self.conversations if _same_dm(n, room)), room))
        elif name == "leave":
            self.leave(parsed.room or self.current or "")
        elif name == "msg":
            if parsed.after_comma and self.is_somebody(parsed.after_comma):
                # (`/msg bob, carol hi` sent "carol hi" to bob alone: a review, 2026-11-24)
                self.say("no space after a comma in a group: /msg bob,carol TEXT (your text "
                         "is still in the input)", error=True)
                return True
            return self.direct(parsed.nicks, parsed.text, line)
        elif name == "topic":
            return self.topic(parsed.text, line)
        elif name in ("edit", "delete"):
            return self.change(name, parsed.text, line)
        elif name == "search":  # (a failed one's words were gone: a daily user, 2026-11-25)
            self.spawn(self.search(parsed.text), line=line, room=self.current or "",
                       asks_only=True)
        elif name in ("away", "back"):
            return self.set_away(name == "away", parsed.text, line)
        elif name in ("create", "invite", "remove"):
            return self.members(name, parsed.room, parsed.nicks, line)
        elif name == "kick":
            return self.kick(parsed.nicks[0], line)
        elif name == "who":
            conv = self.conversation
            session = self.sessions.get(self.current or "")
            if conv is None or conv.kind == "search":
                self.say(self.no_room(), error=True)
            elif session is not None and session.state.phase is Phase.FAILED:
                self.say(f"{conv.title} is closed for good: /join asks for it again",
                         error=True)
            else:
                self.say(f"in {conv.title}: {describe_members(conv.members, conv.away)}")
        elif name == "history":
            if self.conversation is not None:
                self.load_older(self.conversation, parsed.number, say=True)
        elif name == "rooms":
            self.spawn(self.list_rooms())
        elif name == "retry":
            session = self.sessions.get(self.current or "")
            again = session.retry_failed() if session else []
            self.say(f"sending {len(again)} message(s) again" if again else
                     "nothing failed here")
        return False

    def no_room(self) -> str:
        """What a line meant for a room is told where there is none. (In a search's results,
        "not in a room: /join ROOM first" was said to a person in #general, and /who said
        "in ?lid: nobody"; a daily user's day, 2026-11-25.)"""
        if self.current == SEARCH:
            return ("this buffer holds a search's results: Alt-1 (or Ctrl-N) shows a room, "
                    "/leave closes it")
        return "not in a room: /join ROOM first"

    def send(self, text: str, kind: int, line: str, room: str | None = None) -> bool:
        session = self.sessions.get(room or self.current or "")
        if session is None:
            self.say(f"{self.no_room()} (your text is still in the input)", error=True)
            return True
        if not text.strip():
            return False
        if session.state.phase is Phase.FAILED:
            # (it showed "… pending" for ever in a room one had been removed from: a new
            # user's day, 2026-11-24)
            title = self.conversations[room or self.current or ""].title
            self.say(f"{title} is closed for good, so this cannot be sent there (your text is "
                     "still in the input; /join asks for it again, /leave closes it)",
                     error=True)
            return True
        # (a pasted line's end was kept as an empty last line: a new user's day, 2026-11-24)
        text = with_newlines(text).rstrip("\n")
        limit = session.max_message_bytes
        size = utf8_len(text)
        if size > limit:
            parts = split_text(text, limit)
            if self.split_offer == line:
                for p in parts:
                    session.send(p, kind)
                self.taken_back(session, line)
                return False
            self.say(f"that is {size} bytes, over the {limit}-byte limit: press Enter again "
                     f"to send it as {len(parts)} messages, or edit it", error=True)
            self.split_offer = line
            return True
        try:
            validate_text(text, kind, limit)
        except InvalidInput as e:
            self.say(f"{e} (your text is still in the input)", error=True)
            return True
        session.send(text, kind)
        self.taken_back(session, line)
        return False

    def taken_back(self, session: RoomSession, sent: str) -> None:
        """The failed message whose text Up brought back, sent again as it was: out of the
        outbox (it stayed ✗ with "1 not sent: /retry" for ever, and was listed as not sent
        at the exit; a daily user's day, 2026-11-25). Only the very text: one edited, or
        replaced by another line, stays failed, listed and in unsent.txt (it vanished; a
        review, 2026-11-25)."""
        if self.history.recalled() != sent:
            return
        for o in session.outbox.failed:
            if as_typed(o) == sent:
                session.outbox.discard(o)
                return

    # --- a team's day: DMs, topics, edits, search, away, private rooms ----------------------

    def people(self) -> list[pb.Identity]:
        """Everyone seen in this session: members of our rooms, senders of what is shown."""
        out = [m for c in self.conversations.values() for m in c.members]
        out += [e.message.sender for c in self.conversations.values() for e in c.entries[-200:]
                if e.message is not None]
        return out

    def is_somebody(self, word: str) -> bool:
        """Whether ``word`` names someone this chat has seen (a login, a short login or a
        display name, capitals aside)."""
        low = word.lstrip("@").lower()
        return any(low in (i.login.lower(), i.login.split("@")[0].lower(),
                           i.display_name.lower()) for i in self.people())

    def direct(self, people: Sequence[str], text: str, line: str) -> bool:
        """/msg NICK[,NICK...] [TEXT]: open (or show) the DM with them and send TEXT there."""
        known = self.people()
        logins = {person_login(p, self.me.login, known) for p in people} - {self.me.login}
        if not logins:
            self.say("a direct message needs somebody else: /msg NICK TEXT", error=True)
            return True
        room = dm_name(self.me.login, *logins)
        self.join(room)
        if text:
            return self.send(text, pb.MESSAGE_KIND_TEXT, line, room)
        return False

    def topic(self, text: str, line: str = "") -> bool:
        conv = self.conversation
        if conv is None or conv.name not in self.sessions:
            self.say(self.no_room(), error=True)
            return True
        if not text:
            t = conv.topic
            self.say(f"topic of {conv.title}: {t.text} (set by {who(t.set_by)})"
                     if t is not None and t.text else f"{conv.title} has no topic; "
                     "/topic TEXT sets one")
            return False
        room = conv.name

        async def set_it() -> None:
            conn = await self.link.get()
            await conn.set_topic(room, text)

        self.spawn(set_it(), line=line, room=room)
        return False

    def change(self, what: str, text: str, line: str = "") -> bool:
        """/edit TEXT or /delete: the person's own last message in this conversation. When
        that one is still on its way (typed just before), the change waits for its id: it
        never falls on the message before it."""
        conv = self.conversation
        session = self.sessions.get(self.current or "")
        if conv is None or session is None:
            self.say(self.no_room(), error=True)
            return True
        room = conv.name
        done = "edited" if what == "edit" else "deleted"

        def run(target: int | None) -> None:
            if target is None:
                back = self.put_back(line, room)
                self.say(f"not {done}: your last message was not sent"
                         + (" (your text is back in the input)" if back else ""), error=True)
                return

            async def call() -> None:
                conn = await self.link.get()
                if what == "edit":
                    await conn.edit(room, target, text)
                else:
                    await conn.delete(room, target)
                self.said_when_out_of_view(room, target, done)

            self.spawn(call(), line=line, room=room)

        waiting = session.outbox.pending
        if waiting:
            # Said, and kept with what was not sent on the way out: it was only a closure,
            # gone without a word at /quit, and the text saved was the one it corrected (a
            # new user's day, 2026-11-24).
            self.after_sent[waiting[-1].client_msg_id] = run
            self.waiting_changes[waiting[-1].client_msg_id] = (line, room)
            self.say(f"/{what} waits for your last message, still on its way")
            return False
        newest = session.outbox.newest
        if newest is not None and newest.state is State.FAILED:
            # (the stored one before it is not "your last message"; an older refusal, with
            # stored messages since, is not in the way: a review, 2026-11-24)
            self.say(f"your last message here was not sent (✗): /retry sends it again; not "
                     f"{done}", error=True)
            return True
        last = conv.last_own()
        if last is None:
            self.say(f"nothing of yours to {what} here (only what is on screen)", error=True)
            return True
        if last.message is not None and last.message.deleted_by:
            # (a second /delete, or Up and Enter, deleted the message before it, and the one
            # before that: a new user's day, 2026-11-24)
            self.say("your last message here is deleted already" if what == "delete" else
                     f"your last message here is deleted; not {done}", error=True)
            return what == "edit"
        run(last.id)
        return False

    def said_when_out_of_view(self, room: str, target: int, done: str) -> None:
        """A change to one's message whose line is not on screen (scrolled above it, or
        another buffer shown) is said in its room; one in view shows it in its line. (Bob
        wrote 40 lines after it and a /delete changed nothing to be seen: a daily user's
        day, 2026-11-25.) The text is not repeated: a deletion is often of a secret."""
        conv = self.conversations.get(room)
        entry = next((e for e in reversed(conv.entries) if e.id == target), None) if (
            conv is not None) else None
        if conv is None or entry is None:
            return
        session = self.sessions.get(room)
        if self.current == room and on_screen(
                conv, entry, self.renderer, conv.width, self.pane.height,
                list(session.outbox) if session else [], self.me):
            return
        conv.notice(f"{done} your message of {clock(entry.ts_ms)} (out of view, above)",
                    renderer=self.renderer)
        self.invalidate()

    async def search(self, words: str) -> None:
        """/search WORDS: the results in a buffer of their own (oldest at the top)."""
        conn = await self.link.get()
        res = await conn.search(words, newest=True, limit=SEARCH_PAGE)
        found = list(res.messages)
        # A server gives at most its max_search_page (50 by default) a call: the next pages
        # until SEARCH_PAGE (it showed 50 and said "the newest 100"; a daily user's day,
        # 2026-11-25).
        # Counted from the newest, a page after a match stored meanwhile repeats the last
        # one shown: listed once. A later page refused (each is a search against
        # searches_per_minute) or failed leaves those found so far shown, as cut short.
        seen = {(m.room, m.id) for m in found}
        cut = ""
        while res.more and res.messages and len(found) < SEARCH_PAGE:
            try:
                page = await conn.search(words, newest=True, limit=SEARCH_PAGE - len(found),
                                         offset=res.next_offset)
            except Exception as e:
                cut = f" ({self.link.translate(e)})"
                break
            res = page
            for m in res.messages:
                if (m.room, m.id) not in seen:
                    seen.add((m.room, m.id))
                    found.append(m)
        found.reverse()
        conv = Conversation(SEARCH, kind="search", title=f"?{words}")
        conv.history_complete = conv.backlog_done = True
        if not found:  # (it said "0 result(s), newest at the bottom": a daily user's run)
            conv.notice(f"search {words!r}: nothing found (every word must occur; word* "
                        "matches a prefix); /leave closes this buffer")
        else:
            conv.notice(f"search {words!r}: {len(found)} result(s), newest at the bottom"
                        + (f" (the newest {len(found)}; narrow it to see older ones)"
                           if res.more else "") + cut + "; /leave closes this buffer")
        for m in found:
            where = (dm_title(m.room, self.me.login) if m.room.startswith("dm:") else
                     m.room if m.room.startswith("+") else f"#{m.room}")
            conv.add_result(m, where=where, own=m.sender.login == self.me.login,
                            mention=is_mention(m, self.me.login, self.mentions))
        if self.current != SEARCH:
            self.searched_from = self.current
        old = self.conversations.pop(SEARCH, None)
        if old is not None and self.current == SEARCH:
            self.current = None
        self.conversations[SEARCH] = conv
        self.switch(SEARCH)

    def set_away(self, away: bool, message: str, line: str = "") -> bool:
        session = self.sessions.get(self.current or "") or next(iter(self.sessions.values()),
                                                                 None)
        if session is None:
            self.say("not in a room: /join ROOM first", error=True)
            return True
        if self.away == message.strip() if away else self.away is None:
            # (sent all the same: the server is the judge, and answers only a change)
            self.say("you are already away" if away else "you are not away")
        # (the server's announcement confirms it: on_presence; a refusal names the id, and
        # the line comes back: a refused /away was gone, a new user's day, 2026-11-24)
        self.away_asked = (session.set_away(away, message), line, self.current or "")
        return False

    def members(self, what: str, room: str, nicks: tuple[str, ...], line: str = "") -> bool:
        """/create +room NICK..., /invite NICK..., /remove NICK... (admins)."""
        if what != "create":
            conv = self.conversation
            if conv is None or conv.kind != "private":
                self.say(f"/{what} works in a private room (+name)", error=True)
                return True
            room = conv.name
        logins = [person_login(n, self.me.login, self.people()) for n in nicks]

        async def run() -> None:
            conn = await self.link.get()
            if what == "create":
                res = await conn.create_room(room, [self.me.login, *logins])
            else:
                res = await conn.set_room_members(room, add=logins if what == "invite" else (),
                                                  remove=logins if what == "remove" else ())
            said = f"{res.room}: members {', '.join(res.members) or 'nobody'}"
            if what == "create":
                self.created.add(room)
                self.join(room)  # the line goes into the room's own buffer
                self.conversations[room].notice(said, renderer=self.renderer)
                self.invalidate()
            else:
                self.say(said)

        self.spawn(run(), line=line, room=self.current or "")  # (listed at quit if unanswered)
        return False

    def kick(self, nick: str, line: str) -> bool:
        """/kick NICK (admins): the server closes NICK's streams in the room shown."""
        conv = self.conversation
        if conv is None or conv.kind != "room":
            self.say("/kick works in a room (#name); in a private room /remove takes people "
                     "out", error=True)
            return True
        login = person_login(nick, self.me.login, self.people())

        async def run() -> None:
            conn = await self.link.get()
            res = await conn.kick(conv.name, login)
            # (in cluster mode the other servers close theirs too, uncounted here)
            if not res.streams_closed:  # (a typo read as done: a daily user's day, 2026-11-25)
                others = (" (the cluster's other servers close theirs)" if self.link.servers
                          else "")
                self.say(f"{login} had no stream in {conv.title} on this server: nobody was "
                         f"removed here{others}; check the name: /who")
                return
            self.say(f"{login} was removed from {conv.title} ({res.streams_closed} stream(s) "
                     "on this server); they may join again (to keep them out, revoke their "
                     "token or narrow their grant)")

        self.spawn(run(), line=line, room=conv.name)
        return False

    # --- unread counts from the server --------------------------------------------------------

    async def poll_unread(self) -> None:
        """Keep the room list's counts the server's; list DMs and rooms with unread messages
        that this client is not in (a DM someone started is joined: its buffer appears)."""
        with contextlib.suppress(Exception):
            conn = await self.link.get()
            listed = await conn.list_rooms()
            dms = sorted((r for r in listed.rooms if r.direct), key=lambda r: -r.last_id)
            for r in dms[:MAX_LISTED_DMS]:
                if r.name not in self.conversations:
                    self.conversations[r.name] = self.conversation_for(r.name, listed=True)
        while not self.quitting:
            started = time.monotonic()
            # While the token is refused the rooms try it again, ever less often; this poll
            # is not to ask every 3 s meanwhile (a review, 2026-11-24).
            if not any(s.state.phase is Phase.WAITING for s in self.sessions.values()):
                try:
                    conn = await self.link.get()
                    res = await conn.unread()
                    self.apply_unread(res.rooms, started)
                    self.invalidate()
                except asyncio.CancelledError:
                    if not cancelled_under_us():
                        raise
                    log.debug("unread: the connection was opened again under the call")
                except Exception as e:  # the rooms' own state says when the server is away
                    log.debug("unread: %r", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.unread_wake.wait(), UNREAD_EVERY)
            self.unread_wake.clear()
            await asyncio.sleep(0.2)  # a burst of messages: one call

    def apply_unread(self, rooms: Any, started: float) -> None:
        """The server's counts (``RoomInfo``s) asked for at ``started`` (monotonic)."""
        for r in rooms:
            conv = self.conversations.get(r.name)
            if conv is None:
                if not r.unread:
                    continue
                conv = self.conversation_for(r.name, listed=True)
                self.conversations[r.name] = conv
            if conv.listed and conv.kind == "dm" and r.unread > conv.unread:
                self.join(r.name, switch=False)  # someone wrote to us: its buffer
                self.unasked.add(r.name)
                with contextlib.suppress(Exception):
                    self.app.output.bell()
            if r.name == self.current or conv.looked > started:
                continue  # on screen, or read here since we asked
            if conv.listed and r.unread_mentions > conv.mentions:
                with contextlib.suppress(Exception):
                    self.app.output.bell()  # mentioned in a room we are not in
            conv.set_counts(r.unread, r.unread_mentions)

    # --- rooms ----------------------------------------------------------------------------

    def join(self, room: str, *, switch: bool = True) -> None:
        """Join ``room`` (a room, ``+private`` or a canonical ``dm:`` name). ``switch``: show
        it at once (a refused join goes back to the buffer shown before, ``came_from``)."""
        old = self.sessions.get(room)
        if old is not None and old.state.phase is not Phase.FAILED:
            if switch:
                self.switch(room)
            return
        conv = self.conversations.get(room)
        if conv is None:
            conv = self.conversations[room] = self.conversation_for(room)
        conv.listed = False
        # A refusal ends a join at once; the way to the server failing never does: the server
        # answered before the chat started (``_first_contact``). A reply typed into a listed
        # room during a server restart was dropped after 8 s, with the room (a new user's
        # day, 2026-11-23).
        session = RoomSession(self.link, room, pacer=self.pacer, fail_fast=True, patient=True,
                              grace=math.inf, after_id=old.last_id if old else None)
        if old is not None:
            # A room closed for good (a kick, a right withdrawn) is asked for again, from
            # where it stopped, keeping what was typed for it: /join did nothing there.
            # Refused again, it stays as it was (``on_fatal``).
            task = self.tasks.pop(room, None)  # (none once refused again: on_fatal)
            if task is not None:
                task.cancel()
            session.outbox = old.outbox
            self.rejoining[room] = old
        self.sessions[room] = session
        if switch:
            self.came_from[room] = self.current
            self.switch(room)
        self.tasks[room] = asyncio.get_running_loop().create_task(self._pump(conv, session))

    def conversation_for(self, room: str, *, listed: bool = False) -> Conversation:
        kind = kind_of(room)
        title = dm_title(room, self.me.login) if kind == "dm" else ""
        return Conversation(room, kind=kind, title=title, listed=listed)

    def leave(self, room: str) -> None:
        session = self.sessions.pop(room, None)
        if session is None:
            if room in self.conversations and room not in self.tasks:
                self.close_buffer(room)  # search results, or a room only listed
                return
            where = dm_title(room, self.me.login) if room.startswith("dm:") else (
                room if room.startswith("+") else f"#{room}")
            self.say(f"not in {where}" if room else "not in a room", error=True)
            return
        task = self.tasks.pop(room, None)  # (none for a room refused again: on_fatal)
        if task is not None:
            task.cancel()
        self.came_from.pop(room, None)
        self.spawn(session.close())
        old = self.rejoining.pop(room, None)
        if old is not None:
            self.spawn(old.close())
        title = self.conversations[room].title
        self.close_buffer(room)
        kept = " (what you had typed there is back when you join it again)" if (
            room in self.drafts) else ""
        self.say(f"left {title}{kept}")
        self.keep_outbox(session, title, "you left it")

    def keep_outbox(self, session: RoomSession, title: str, why: str) -> None:
        """What was on its way to a room that goes away without it (a refused /join, a
        /leave): said, and kept with what is pending: listed at the exit, in unsent.txt (it
        was said once, then in neither: a daily user's day, 2026-11-25)."""
        for o in session.outbox:
            was = outgoing_note(o)
            note = f"{why}; {was}" if was else why
            self.dropped.append(indented(f"{title}: {as_typed(o)}  ({note})"))
            self.say(f"not sent to {title} ({why}): {visible(o.text)} (kept: listed when the "
                     "chat ends, and in unsent.txt)", error=True)

    def close_buffer(self, room: str) -> None:
        names = list(self.conversations)
        i = names.index(room)
        del self.conversations[room]
        # (its draft stays: back at a /join, listed at the exit if not; /leave from another
        # room dropped it without a word, a kill -9 run, 2026-11-24)
        self.unasked.discard(room)
        if self.current == room:
            # (search results closed showed the last buffer open, a DM, where the next line
            # meant for the room searched from went: a daily user's day, 2026-11-25)
            self.show_open(i, prefer=self.searched_from if room == SEARCH else None)

    def show_open(self, near: int, prefer: str | None = None) -> None:
        """Show ``prefer`` if it is open, else the buffer open at position ``near`` or the
        first after it, else the last one open; never one only listed (showing that joins
        it) nor a DM opened because someone wrote and not shown yet (``unasked``): the next
        line went to a DM nobody had chosen (new users' days, 2026-11-24). With none, the
        chat is in no room and says so at the next line."""
        self.current = None
        names = list(self.conversations)
        rest = [n for n in names if not self.conversations[n].listed and n not in self.unasked]
        if prefer in rest:
            self.switch(prefer)
        elif rest:
            self.switch(next((n for n in rest if names.index(n) >= near), rest[-1]))

    async def _pump(self, conv: Conversation, session: RoomSession) -> None:
        try:
            async for ev in session.events():
                try:
                    self.on_event(conv, session, ev)
                except Exception as e:  # a bug in showing an event must not stop the room
                    log.exception("showing %s in #%s", ev.kind, conv.name)
                    self.say(internal(e, log_path(), " showing an event"), error=True)
                self.invalidate()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("room %s stopped", conv.name)
            # Closed, as a refusal closes it: it went on showing "connected", and what was
            # typed there waited, pending, for ever (a daily user's day, 2026-11-25). /join
            # opens it again with what it holds.
            session.state.phase = Phase.FAILED
            self.on_fatal(conv, session, ClientError(internal(e, log_path()), retryable=False,
                                                     bug=True))
            self.invalidate()

    def on_event(self, conv: Conversation, session: RoomSession, ev: SessionEvent) -> None:
        if ev.kind == "welcome" and ev.welcome is not None:
            self.opening.discard(conv.name)
            self.start_notes.pop(conv.name, None)  # (refused at the start, joined since)
            self.bring_back_restored(conv.name)
            w = ev.welcome
            conv.members = list(w.members)
            conv.away = set(w.away_logins)
            was_away = self.away
            self.follow_away(conv)
            if was_away is not None and self.away is None:
                # (a restarted server forgets who is away: the mark went without a word)
                # (said where the person is: in the room whose welcome came first, it was
                # missed; a daily user's day, 2026-11-25)
                self.say("you are no longer marked away: the server forgot it (restarted, or "
                         "another server); /away MESSAGE to say it again", error=True)
            conv.topic = w.topic if w.HasField("topic") else None
            conv.last_read = w.last_read_id
            self.known_rooms.add(conv.name)
            self.came_from.pop(conv.name, None)
            old = self.rejoining.pop(conv.name, None)
            if old is not None:
                self.spawn(old.close())
        elif ev.kind == "message" and ev.message is not None:
            self.on_message(conv, ev.message)
        elif ev.kind == "replay_done":
            if ev.first:
                conv.backlog_done = True
                conv.notice("end of backlog" if conv.entries else "no earlier messages",
                            renderer=self.renderer)
                conv.notice(f"you joined {conv.title} as {visible(self.me.login)}; here: "
                            f"{describe_members(conv.members, conv.away)}",
                            renderer=self.renderer)
                if conv.topic is not None and conv.topic.text:
                    conv.notice(f"topic: {conv.topic.text} (set by {who(conv.topic.set_by)})",
                                ts_ms=conv.topic.set_unix_ms, renderer=self.renderer)
            rejoined = self.rejoined.pop(conv.name, None)
            if rejoined is not None:
                # (after a restored history the room was shown again from what the server
                # has: "nothing missed" contradicted the line just above; a new user's day,
                # 2026-11-23)
                missed = "" if conv.name in self.shown_again else "; nothing missed"
                self.shown_again.discard(conv.name)
                conv.notice(f"reconnected after {rejoined}{missed}", renderer=self.renderer)
        elif ev.kind == "presence" and ev.presence is not None:
            self.on_presence(conv, ev.presence)
        elif ev.kind == "state" and ev.seconds is not None:
            # (said at the replay's end, below what it brings: a line Bob wrote during an
            # 85 s outage stood under "reconnected after 85s; nothing missed"; a daily
            # user's day, 2026-11-25)
            self.rejoined[conv.name] = ev.outage()
            conv.quiet_until = time.monotonic() + QUIET_REJOINS
        elif ev.kind == "state":
            self.rejoined.pop(conv.name, None)  # (broken before its replay: the next says it)
            if ev.error is not None and session.state.attempts == 1:
                conv.away_from = {m.login for m in conv.members}
        elif ev.kind in ("sent", "failed") and ev.outgoing is not None:
            self.waiting_changes.pop(ev.outgoing.client_msg_id, None)
            then = self.after_sent.pop(ev.outgoing.client_msg_id, None)
            if then is not None:
                then(ev.message_id if ev.kind == "sent" else None)
        elif ev.kind == "deferred" and ev.error is not None:
            paced = ev.error.status is grpc.StatusCode.RESOURCE_EXHAUSTED
            said, when = self.deferred_said.get(conv.name, ("", 0.0))
            if (not paced or ev.error.retry_after >= DEFERRED_QUIET) and (
                    ev.text != said or time.monotonic() - when > DEFERRED_SAID_EVERY):
                self.deferred_said[conv.name] = (ev.text, time.monotonic())
                # (the server's words go on for a script: "send it again", "the same
                # client_msg_id is safe"; the chat does that itself: a review)
                reason = ev.text.split("; ")[0]
                conv.notice(f"{'not sent' if paced else 'not stored'} yet: {reason} (the chat "
                            "tries again by itself)", error=True, renderer=self.renderer)
        elif ev.kind in ("error", "restart", "waiting"):
            # restart: the history was restored (the room is shown again from it); waiting:
            # for a new token (what is typed meanwhile waits with it)
            if ev.kind == "restart":
                self.shown_again.add(conv.name)
            text = ev.text
            asked, line, room = self.away_asked
            if ev.refused_id and ev.refused_id == asked:
                self.away_asked = ("", "", "")
                if self.put_back(line, room):
                    text += " (your text is back in the input)"
            conv.notice(text, error=True, renderer=self.renderer)
        elif ev.kind == "fatal" and ev.error is not None:
            self.on_fatal(conv, session, ev.error)

    def follow_away(self, conv: Conversation, message: str | None = None) -> None:
        """The away mark from the room's away list, which names us too (a restarted server,
        or another one after a failover, no longer has us away); ``message``: ours, when
        this is our own AWAY."""
        if self.me.login in conv.away:
            self.away = message if message is not None else (self.away or "")
        elif any(m.login == self.me.login for m in conv.members):
            self.away = None

    def on_presence(self, conv: Conversation, p: pb.Presence) -> None:
        conv.members = list(p.members)
        conv.away = set(p.away_logins)
        mine = p.who.login == self.me.login
        self.follow_away(conv, p.away_message if mine and p.kind == pb.PRESENCE_KIND_AWAY
                         else None)
        if mine and p.kind in (pb.PRESENCE_KIND_AWAY, pb.PRESENCE_KIND_BACK):
            conv.notice(("you are away" + (f": {p.away_message}" if p.away_message else "")
                         + "; /back when you return") if p.kind == pb.PRESENCE_KIND_AWAY
                        else "you are back", renderer=self.renderer)
            return
        if not p.who.login or mine:
            return
        if p.kind == pb.PRESENCE_KIND_AWAY:
            why = f": {p.away_message}" if p.away_message else ""
            conv.notice(f"{who(p.who)} is away{why}", renderer=self.renderer)
            return
        if p.kind == pb.PRESENCE_KIND_BACK:
            conv.notice(f"{who(p.who)} is back", renderer=self.renderer)
            return
        joined = p.kind == pb.PRESENCE_KIND_JOINED
        if joined and p.who.login in conv.away_from and time.monotonic() < conv.quiet_until:
            conv.away_from.discard(p.who.login)  # back after the same outage as ours
            return
        verb = "joined" if joined else "left"
        why = f" ({p.reason})" if p.reason and not joined else ""
        conv.notice(f"{who(p.who)} {verb} {conv.title}{why}", renderer=self.renderer)
        if conv.name != self.current:
            conv.activity = True

    def on_message(self, conv: Conversation, m: pb.ChatMessage) -> None:
        own = m.sender.login == self.me.login
        # Live messages: the server's ``mentions`` decide (and ring); the backlog: our names.
        mention = is_mention(m, self.me.login, self.mentions)
        shown = conv.name == self.current
        live = conv.backlog_done
        entry = conv.add_message(m, own=own, mention=mention, shown=shown, live=live,
                                 renderer=self.renderer)
        if shown:
            self.seen(conv)
        elif live and not own and (entry is not None or m.kind == pb.MESSAGE_KIND_EDIT):
            self.unread_wake.set()  # the server's counts, now (an edit may change mentions)
        if live and entry is not None and not own and entry.mention:
            self.ring(conv, m)
        elif live and entry is not None and not own and conv.kind == "dm" and not shown:
            self.ring(conv, m)  # a direct message is meant for you

    def on_fatal(self, conv: Conversation, session: RoomSession, err: ClientError) -> None:
        old = self.rejoining.pop(conv.name, None)
        if old is not None and not session.state.ever_connected:
            # A room closed for good, refused again: as it was, with what was typed for it
            # (still listed when the chat ends, and in unsent.txt).
            self.sessions[conv.name] = old
            self.tasks.pop(conv.name, None)
            self.came_from.pop(conv.name, None)
            self.say(f"cannot join {conv.title}: {err}", error=True)
            return
        if not session.state.ever_connected:
            # A refused /join: one line where the person is, and they stay there.
            self.sessions.pop(conv.name, None)
            self.tasks.pop(conv.name, None)
            self.conversations.pop(conv.name, None)
            back = self.came_from.pop(conv.name, None)
            if self.current == conv.name:
                self.show_open(0, prefer=back)
            # (a room /create made and could not join, at the limit of open rooms, seemed
            # not to have been made: a new user's day, 2026-11-23)
            made = (f"; {conv.title} was created: /join {conv.name} later"
                    if conv.name in self.created else "")
            self.say(f"cannot join {conv.title}: {err}{made}", error=True)
            if conv.name in self.opening:
                self.start_notes[conv.name] = f"cannot join {conv.title}: {err}"
            self.keep_outbox(session, conv.title, "its join was refused")
            return
        # (its members stayed counted in the status bar and listed by /who after a kick: a
        # daily user's day, 2026-11-25)
        conv.members, conv.away = [], set()
        # (after a kick, "closed for good" read as a ban: /join takes one back at once)
        # (a private room's: the same words end a /remove, after which /join is refused; a
        # daily user's day, 2026-11-25)
        members = (" (refused if you are no longer a member of it)"
                   if kind_of(conv.name) == "private" else "")
        conv.notice(f"{conv.title} is closed for good: {err}; /join {conv.title} asks for it "
                    f"again{members}, /leave closes it", error=True, renderer=self.renderer)

    def ring(self, conv: Conversation, m: pb.ChatMessage) -> None:
        """A mention: the terminal bell, and a desktop notification if asked for."""
        with contextlib.suppress(Exception):
            self.app.output.bell()
        if not self.notify:
            return
        title = f"{who(m.sender)} in {conv.title}"
        body = visible(m.text)[:200].replace("\n", " ")
        notify_send = shutil.which("notify-send")
        if notify_send:
            with contextlib.suppress(OSError):
                subprocess.Popen(notify_argv(notify_send, title, body),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:  # the terminal's own notification (OSC 777; OSC 9 where that is unknown)
            clean = f"{title}: {body}".replace("\x1b", "").replace("\x07", "")
            with contextlib.suppress(Exception):
                self.app.output.write_raw(f"\x1b]777;notify;tsnetchat;{clean}\x07")
                self.app.output.flush()

    # --- calls ------------------------------------------------------------------------------

    def put_back(self, line: str, room: str) -> bool:
        """Bring a refused command's ``line`` back into the input, when it was typed in the
        room still shown and the input is empty (True)."""
        if not line or (self.current or "") != room or self.input.text:
            return False
        self.input.document = Document(line, len(line))
        return True

    def spawn(self, coro: Any, *, line: str = "", room: str = "", asks_only: bool = False
              ) -> None:
        """Run ``coro`` in the background; a failure is one line on the screen, and the
        command ``line`` it carries out for ``room`` comes back into the input when that
        room is still shown and its input empty (a /topic refused as too long was gone: a
        new user's day, 2026-11-23; in another room's input it would act on that room).
        Until answered, ``line`` is listed at the exit as maybe done, unless it ``asks_only``
        (a /search changes nothing)."""
        key = object()
        if line and not asks_only:
            self.commands_out[key] = (line, room)

        async def guarded() -> None:
            try:
                try:
                    await coro
                except asyncio.CancelledError:
                    if not cancelled_under_us():
                        raise  # (the chat is ending: still in commands_out, listed as not done)
                    # grpc.aio's own: the connection it was on was closed under it (a room
                    # reconnecting, after a server's restart, closes the one they share).
                    # It said nothing, or "internal error" (a kill -9 run, 2026-11-24).
                    raise ClientError("the connection closed before the server answered" + (
                        "; it may have been done: look before you do it again"
                        if line and not asks_only else "; try again"),
                        retryable=True, transport=True) from None
            except Exception as e:
                back = self.put_back(line, room)
                err = self.link.translate(e)
                said = str(err)
                if err.bug:  # (said "internal error in the client (...)", with nothing in
                    # the log; a review, 2026-11-25)
                    log.error("a command failed: %s", visible(line), exc_info=e)
                    said = internal(e, log_path())
                self.say(said + (" (your text is back in the input)" if back else
                                 f" (not done: {visible(line)})" if line else ""), error=True)
            self.commands_out.pop(key, None)

        task = asyncio.get_running_loop().create_task(guarded())
        self.background.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self.background.discard)

    async def list_rooms(self) -> None:
        conn = await self.link.get()
        rooms = await conn.list_rooms()
        lines = ["rooms you may use:" if rooms.rooms else "no rooms yet"]
        for r in rooms.rooms:
            if not r.direct:
                self.known_rooms.add(r.name)
            title = (dm_title(r.name, self.me.login) if r.direct else
                     r.name if r.private else f"#{r.name}")
            # (the newest id, not a count: "42 messages" was said of a room whose ids also
            # went to edits, deletions and topics; a new user's day, 2026-11-23)
            said = f"last #{r.last_id}" if r.last_id else "nothing said yet"
            unread = f", {r.unread} unread" if r.unread else ""
            here = f"; here: {describe_members(r.members)}" if r.members else ""
            lines.append(f"  {title} ({said}{unread}{here})")
        if rooms.all_rooms_allowed:
            lines.append("and any new one: /join NAME creates it")
        self.say("\n".join(lines))

    def load_older(self, conv: Conversation, count: int = 100, *, say: bool = False) -> None:
        if conv.name in self.loading or conv.kind not in ("room", "private", "dm"):
            return
        self.loading.add(conv.name)

        async def fetch() -> None:
            try:
                conn = await self.link.get()
                before = conv.oldest_loaded
                page = await conn.history(conv.name, before=before, limit=count)
                n = conv.add_older(page.messages, me=self.me.login, mentions=self.mentions,
                                   more=page.more)
                if say:
                    self.say(f"loaded {n} older message(s); PgUp to read them" if n else
                             "no older messages")
                self.invalidate()
            finally:
                self.loading.discard(conv.name)

        self.spawn(fetch())

    # --- start and end ----------------------------------------------------------------------

    def quit(self) -> None:
        if not self.quitting:
            self.quitting = True
            ending = self.app.future is not None and self.app.future.done()
            if self.app.is_running and not ending:  # (a lost terminal may have ended it)
                self.app.exit(result=0)

    async def close(self) -> None:
        """Stop every room and the link, within a second whatever the network does."""
        for t in [*self.tasks.values(), *self.background]:
            t.cancel()
        closing = [s.close() for s in (*self.sessions.values(), *self.rejoining.values())]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 0.5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.link.close(), 0.5)

    def reopen(self, rooms: Sequence[str], shown: str, *, back: str | None) -> None:
        """Open ``rooms`` (listed in this order, then ``shown`` if it is not among them),
        showing ``shown``: joined first, so that the server's limit of open rooms falls on
        the others; refused, the chat goes ``back`` (the room shown last time)."""
        for name in (*rooms, shown):
            if name not in self.conversations:
                self.conversations[name] = self.conversation_for(name)
        self.opening.update((*rooms, shown))
        self.join(shown)
        if back in rooms and back != shown:
            self.came_from[shown] = back
        for name in rooms:
            self.join(name, switch=False)

    def open_rooms(self) -> openrooms.OpenRooms:
        """The rooms open now, in the order listed, and the one shown: for the next chat
        with this server (not one closed for good, nor search results)."""
        rooms = tuple(name for name in self.conversations if name in self.sessions
                      and self.sessions[name].state.phase is not Phase.FAILED)
        typed = dict(self.typed())
        drafts = tuple((name, typed[name]) for name in rooms if typed.get(name, "").strip())
        return openrooms.OpenRooms(rooms, self.current if self.current in rooms else None,
                                   drafts)

    def typed(self) -> list[tuple[str, str]]:
        """What is typed and not sent, by room ("" for typing that has no room): the input,
        each other room's draft, and what the last chat had typed in a room not joined yet
        (``restored``)."""
        out = [(self.current or "", self.typed_here())]
        out += [(room, d.text) for room, d in self.drafts.items()]
        out += [(room, text) for room, text in self.restored.items()]
        return [(room, text) for room, text in out if text.strip()]

    def restore_drafts(self, drafts: Iterable[tuple[str, str]]) -> None:
        """What the last chat had typed in each room and not sent: each comes back into its
        room's input once the room is joined (``bring_back_restored``), never before, so a
        room refused at the start cannot hand its text to the next one shown (a review,
        2026-11-24). Only in unsent.txt, a line typed before a restart had to be copied back
        by hand (carried over since the nineteenth session)."""
        self.restored = dict(drafts)
        self.restored_as = dict(self.restored)

    def bring_back_restored(self, room: str) -> None:
        """``room`` is joined: what the last chat had typed there becomes its draft (in the
        input, if it is shown), after anything typed there since."""
        text = self.restored.pop(room, None)
        if text is None:
            return
        shown = room == self.current
        before = self.input.text if shown else self.drafts.get(room, Document()).text
        if shown:
            self.input.document = appended(before, text)
        else:
            self.drafts[room] = appended(before, text)
        self.invalidate()

    def unsent(self, kept: Mapping[str, str]) -> list[str]:
        """What was typed but not stored, to print after the screen is gone (a message's
        later lines indented under its first: ``indented``): ``pending_lines``, then what
        is typed. ``kept``: the drafts ``openrooms.save`` wrote, back in their inputs next
        time; one brought back unchanged from the last chat is not listed again (it is in
        unsent.txt already, and was listed at every exit: a review, 2026-11-24)."""
        typed_now = self.typed()
        titles = self.titles(typed_now)
        # (in which room: "(input)" alone did not say; a new user's day, 2026-11-24)
        typed = [f"(typed in {titles.get(room, room or 'no room')}"
                 f"{'; back in its input next time' if kept.get(room) == text else ''}) {text}"
                 for room, text in typed_now
                 if not (kept.get(room) == text == self.restored_as.get(room))]
        return self.pending_lines(titles) + [indented(line) for line in typed]

    def pending_lines(self, titles: Mapping[str, str], *, if_killed: bool = False
                      ) -> list[str]:
        """What was submitted and not stored: each room's outbox, the changes waiting for
        it, the commands not answered yet, those on their way to a room that went away
        (``dropped``) and lines an earlier chat left (``inherited``);
        as listed at the exit, rooms by their ``titles``. ``if_killed``: as a chat killed
        after this would have to list them, each message on its way "may have been stored"
        (one sent the moment before a kill -9 was stored, and listed as not sent;
        2026-11-25)."""
        # (one written before the link broke is QUEUED again: it was listed as plainly not
        # sent, and had been stored; a kill -9 run, 2026-11-24)
        def note(o: Outgoing) -> str:
            was = outgoing_note(o, if_killed=if_killed)
            return f"  ({was})" if was else ""

        out = [f"{titles.get(room, room)}: {as_typed(o)}{note(o)}"
               for room, s in self.sessions.items() for o in s.outbox]
        out += [f"(waiting in {titles.get(room, room)} for the message above) {line}"
                for line, room in self.waiting_changes.values()]
        out += [f"(not answered yet in {titles.get(room, room)}: it may have been done) {line}"
                for line, room in self.commands_out.values()]
        return [indented(line) for line in out] + self.dropped + self.inherited

    def left_unstored(self) -> bool:
        """Whether a message sent in this chat is not stored: still in a room's outbox, or
        on its way to a room that went away (``dropped``: listed, and the exit said 0; a
        daily user's day, 2026-11-25)."""
        return bool(self.dropped) or any(len(s.outbox) for s in self.sessions.values())

    def titles(self, typed: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Each room's title, by name: the open ones' and those with something ``typed``."""
        titles = {room: self.conversation_for(room).title for room, _ in typed if room}
        titles.update((name, c.title) for name, c in self.conversations.items())
        return titles

    def held(self) -> keepsafe.Held:
        """What the chat holds and has not had stored, for ``keepsafe``."""
        typed = self.typed()
        opened, titles = self.open_rooms(), self.titles(typed)
        return keepsafe.Held(opened.rooms, opened.shown,
                             tuple((room, titles.get(room, room or "no room"), text)
                                   for room, text in typed),
                             tuple(self.pending_lines(titles, if_killed=True)),
                             tuple(room for room, text in typed
                                   if self.restored_as.get(room) == text))

    def keep_safe(self) -> None:
        """``held`` into this chat's ``keepsafe`` file, if it changed; said once when it
        cannot be (it was in the log alone: crash protection off without a word; a kill -9
        run, 2026-11-25)."""
        if self.keep is None:
            return
        was = self.keep.failing
        self.keep.keep(self.held())
        if self.orphans is not None and not self.keep.failing:
            self.orphans.forget()
            self.orphans = None
        if self.keep.failing and not was:
            self.say(f"cannot keep what you type in {self.keep.path.parent} "
                     f"({self.keep.failing}): until it can, a crash of this chat loses it",
                     error=True)

    async def keep_safe_every(self, seconds: float) -> None:
        """``keep_safe`` each ``seconds``, for what changes without a line submitted: typing,
        a message confirmed, a command answered."""
        while True:
            await asyncio.sleep(seconds)
            self.keep_safe()


def appended(before: str, text: str) -> Document:
    """``text`` on a line of its own after ``before`` (alone when there is none), with the
    cursor at its end: a draft brought back to what is typed already."""
    joined = f"{before}\n{text}" if before else text
    return Document(joined, len(joined))


def as_typed(o: Outgoing) -> str:
    """A message as it would be typed again (a /me listed as plain text was sent back as
    one)."""
    return f"/me {o.text}" if o.kind == pb.MESSAGE_KIND_ACTION else o.text


def outgoing_note(o: Outgoing, *, if_killed: bool = False) -> str:
    """What to say of a message not stored, when listed: "refused", "sent, not confirmed:
    it may have been stored" (written and not answered; ``if_killed``: any on its way, see
    ``pending_lines``), or nothing."""
    if o.state is State.FAILED:
        return "refused"
    if o.unsure or if_killed:
        return "sent, not confirmed: it may have been stored"
    return ""


def indented(text: str, by: str = "    ") -> str:
    """``text``'s second and later lines indented by ``by``: printed under "  " + its first
    line, a multi-line message's lines no longer start flush left like the next entry's (a
    new user's day, 2026-11-23)."""
    return text.replace("\n", "\n" + by)


def _unsent_untold() -> Path | None:
    """``unsent.txt`` if an earlier chat added to it since a chat last said so (then
    noted, beside it, as said). A chat whose terminal closed printed its unsent lines to
    nowhere, and the next one did not mention them (a new user's day, 2026-11-24)."""
    path = log_path().with_name("unsent.txt")
    told = path.with_name("unsent.told")
    try:
        added = path.stat().st_mtime
    except OSError:
        return None
    with contextlib.suppress(OSError):
        if told.stat().st_mtime >= added:
            return None
    with contextlib.suppress(OSError):
        os.close(os.open(told, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        os.utime(told, (added, added))
    return path


@dataclass(frozen=True)
class TakenOver:
    """What the chats before this one with its server left it (``_take_over``): the rooms to
    open with the drafts to bring back; the drafts this chat took out of the file of open
    rooms (``openrooms.save``'s ``took``); lines not stored that unsent.txt could not take,
    for this chat to list and keep with its own."""

    rooms: openrooms.OpenRooms
    took: dict[str, str]
    inherited: list[str]
    # Their files, until what they held is kept elsewhere (``ChatApp.keep_safe``): None
    # once it is in unsent.txt.
    orphans: keepsafe.Orphans | None


def _take_over(state: Path, key: str) -> TakenOver:
    """What the last chat with ``key``'s server left at its exit (``openrooms``) and what the
    chats that ended without keeping it left (``keepsafe``): the rooms of those (the newest
    first) and then the exit's (if it came after the newest of those began), and the room
    the newest of them showed; every one's drafts;
    and their lines not stored, appended to unsent.txt (then said at the start, as any
    addition is). The file's drafts are taken out of it (in the inputs now: a chat killed
    later must not bring them back twice).

    Two chats with one server, one killed and one that exits: the killed one's rooms alone
    were opened, and the other's draft in another room was not brought back, or came back
    later after it had been sent (a kill -9 run, 2026-11-25)."""
    exited = openrooms.load(state, key)
    taken_over = keepsafe.take_orphans(state, key)
    orphans = taken_over.held
    if orphans and openrooms.written(state, key) <= taken_over.began:
        # That exit was before the killed chat began, which opened its rooms then: the
        # rooms it had open when killed are newer. (A room it had left, or all of them,
        # came back from the exit; a daily user's day, 2026-11-25.) A room with a draft
        # the killed chat had not taken out of the file (a full disk) stays.
        exited = replace(exited, rooms=tuple(r for r, _ in exited.drafts), shown=None)
    newest = next((h for h in reversed(orphans) if h.rooms), None)
    rooms = tuple(dict.fromkeys(
        (*(r for h in reversed(orphans) for r in h.rooms), *exited.rooms)))
    rooms = rooms[:openrooms.MAX_ROOMS]
    drafts = dict(exited.drafts)
    lines: list[str] = []
    for held in orphans:
        lines += held.lines
        for room, title, text in held.drafts:
            if room in rooms and drafts.get(room) != text:
                drafts[room] = appended(drafts.get(room, ""), text).text
            if room not in held.as_restored:  # (else in unsent.txt already)
                back = "; back in its input" if room in rooms else ""
                lines.append(indented(f"(typed in {title}{back}) {text}"))
    taken = TakenOver(openrooms.OpenRooms(
        rooms, newest.shown if newest else exited.shown,
        tuple((room, text) for room, text in drafts.items() if room in rooms)),
        dict(exited.drafts), [], None)
    if exited.drafts or orphans:
        openrooms.save(state, key, replace(taken.rooms, drafts=()))
    if orphans:
        log.warning("a chat with %s ended without keeping what it held: %d line(s) not "
                    "stored, %d draft(s)", key, sum(len(h.lines) for h in orphans),
                    sum(len(h.drafts) for h in orphans))
    path, not_kept = (_keep_unsent(lines, key, "from a chat that ended without keeping them")
                      if lines else (None, ""))
    if not_kept:  # (their files stay until this chat keeps what they held: a full disk)
        log.warning("could not add them to %s (%s): listed at this chat's exit", path, not_kept)
        return replace(taken, inherited=lines, orphans=taken_over)
    taken_over.forget()
    return taken


def _same_dm(a: str, b: str) -> bool:
    """Whether two DM names have the same people, capitals aside (a buffer's name is the
    server's spelling; a name typed may differ)."""
    return a.startswith("dm:") and b.startswith("dm:") and (
        sorted(a[3:].lower().split(",")) == sorted(b[3:].lower().split(",")))


def _keep_unsent(lines: list[str], server: str, whose: str = "") -> tuple[Path, str]:
    """Append what was typed and not stored to ``unsent.txt`` beside the client's log (0600),
    under the time, the server (``openrooms.server_key``: with two servers, "#general" did
    not say which) and ``whose`` they were, if not this chat's: the file, and "" or why it
    could not be written. A write that failed half-way is taken back (a full disk left an
    empty file that the next chat announced as holding the lines; 2026-11-24)."""
    path = log_path().with_name("unsent.txt")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):  # (one made before, open to all: the client's own)
            path.parent.chmod(0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        return path, e.strerror or str(e)
    before = os.fstat(fd)
    try:
        os.fchmod(fd, 0o600)  # (one made before, or by another program, may be open to all)
        with os.fdopen(os.dup(fd), "ab") as f:
            f.write(_bytes(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}, {server}, "
                           f"{whose + ', ' if whose else ''}not sent or not confirmed:\n"))
            f.writelines(_bytes(f"  {line}\n") for line in lines)
    except OSError as e:
        with contextlib.suppress(OSError):
            if before.st_size:
                os.ftruncate(fd, before.st_size)
                os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
            else:
                path.unlink()
        return path, e.strerror or str(e)
    finally:
        os.close(fd)
    return path, ""


def _bytes(text: str) -> bytes:
    """``text`` for a file: UTF-8, bytes the terminal sent that are not UTF-8 as they came,
    and a lone surrogate (half an emoji) as ``\\ud83d`` (it failed the whole write, and the
    chat's end with "This is a bug"; a kill -9 run, 2026-11-25)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _on_loop_error(chat: ChatApp) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]],
                                              None]:
    gone: list[OSError] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            # The terminal went away (a window closed over a chat stopped with Ctrl-Z: each
            # redraw after it failed, and the log had three tracebacks of it; 2026-11-25).
            # Said once; the chat ends as at a hang-up, keeping what was not sent.
            if not gone:
                gone.append(exc)
                log.warning("the terminal went away (%s): the chat ends as with /quit, "
                            "keeping what was not sent", exc.strerror)
            chat.quit()
            return
        log.error("event loop: %s", context.get("message"), exc_info=exc)
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            chat.say(internal(exc, log_path()), error=True)

    return handler


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """While the screen is up, anything written to stderr (logging, gRPC's C core) goes to
    the log file instead of scribbling over the screen."""
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot open the chat's log {path}: {e.strerror} (set "
                          "XDG_STATE_HOME to a directory you can write)") from None
    saved = os.dup(2)
    handler = logging.StreamHandler(os.fdopen(os.dup(fd), "a", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers, root.level = [handler], logging.INFO
    sys.stderr.flush()
    os.dup2(fd, 2)
    try:
        yield
    finally:
        # (on a full disk the flush raised, stderr stayed the log, and what was typed and
        # not sent went unprinted and unkept: exit 120, nothing said; 2026-11-24)
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        root.handlers, root.level = old_handlers, old_level
        handler.close()
        with contextlib.suppress(OSError):  # (the handler's close leaves its stream open)
            handler.stream.close()


async def _first_contact(link: Link) -> pb.WhoAmIResponse:
    """Who we are, from the server, tried again for a while if the way there fails
    (``client.first_answer``, a line each time); the link is closed when it fails."""
    try:
        return await first_answer(link, lambda conn: conn.whoami(), warn=to_stderr)
    except BaseException:
        await link.close()
        raise


def room_to_show(typed: str | None, me: str) -> tuple[str | None, str]:
    """The room ``connect --room`` names (as ``commands.room_asked``), or None and what is
    wrong with it when it cannot be one: the rooms of last time open as without it. (`--room
    '#'` asked the server for it, and "cannot join ##" left the chat in no room: a daily
    user's day, 2026-11-25.)"""
    if not typed:
        return None, ""
    asked = commands.room_asked(typed, me)
    if asked.startswith("dm:") or commands.room_name(asked):
        return asked, ""
    return None, (f"--room {visible(typed)!r} is not a room: a room's name is 1-32 of a-z, "
                  "0-9, - and _ (#general), a private room's +name, a DM @bob")


async def run_tui(server: str, room: str | None, *, token: str | None, socket: str,
                  proxy: str, port: int, address: str = "", notify: bool = False) -> int:
    """The chat in this terminal until /quit, Ctrl-D or Ctrl-C, in the rooms open when the
    last one with this server ended, showing ``room`` (by default the one shown then, else
    the first of them, else #general). Raises ClientError when the server cannot be
    reached or refuses us at the start."""
    link = link_for(server, token, socket=socket, port=port, proxy=proxy, address=address)
    me = await _first_contact(link)
    node = link.target.node if link.target else None
    key = openrooms.server_key(server, port, address=address,
                               dns_name=node.dns_name if node else "")
    loop = asyncio.get_running_loop()
    with _stderr_to_log():
        state = log_path().parent
        taken = _take_over(state, key)  # (a damaged file: said in the log)
        last = taken.rooms
        chat = ChatApp(link, me, notify=notify, keep=keepsafe.KeepSafe.open(state, key),
                       inherited=taken.inherited, orphans=taken.orphans)
        old_handler = loop.get_exception_handler()
        loop.set_exception_handler(_on_loop_error(chat))
        # The terminal closing (a window, an ssh connection) hangs up: leave as /quit does,
        # keeping what was not sent (SIGHUP's default ended the process on the spot), and
        # as a service manager's SIGTERM.
        for sig in (signal.SIGHUP, signal.SIGTERM):
            loop.add_signal_handler(sig, chat.quit)
        loop.add_signal_handler(signal.SIGTSTP, chat.suspend)
        loop.add_signal_handler(signal.SIGCONT, chat.resumed)
        try:
            asked, wrong = room_to_show(room, me.identity.login)
            if wrong:  # (on the line above the status bar until a line is typed)
                chat.start_notes["--room"] = wrong
            untold = _unsent_untold()
            if untold is not None:
                chat.start_notes[""] = (f"lines an earlier chat had not sent, or not "
                                        f"confirmed, are in {untold}")
            if chat.keep is None:
                chat.start_notes["keep"] = (f"what you type is kept only when the chat ends "
                                            f"({state / keepsafe.FOLDER}: see {log_path()})")
            chat.restore_drafts(last.drafts)
            if last.drafts:  # (there is text in the input that this chat did not type)
                rooms = ", ".join(chat.conversation_for(r).title for r, _ in last.drafts)
                chat.start_notes["drafts"] = (f"what you had typed comes back in the input "
                                              f"({rooms})")
            chat.reopen(last.rooms, asked or last.shown or next(iter(last.rooms), "general"),
                        back=last.shown)
            chat.keep_safe()  # (the drafts brought back are out of the file of open rooms)
            chat.spawn(chat.poll_unread())
            chat.spawn(chat.keep_safe_every(KEEP_EVERY))
            result = await chat.app.run_async(set_exception_handler=False)
        finally:
            loop.remove_signal_handler(signal.SIGTSTP)
            loop.remove_signal_handler(signal.SIGCONT)
            opened = chat.open_rooms()
            await chat.close()
            saved = openrooms.save(state, key, opened, took=taken.took)
            # Kept whatever ended the screen: a terminal that went away ends it with an
            # I/O error, and what was typed went with it, printed to nowhere (a new user's
            # day, 2026-11-23). SIGHUP and SIGTERM stay ours until it is kept: a closed
            # terminal hangs the chat up twice (the kernel's hangup, then again when the
            # shell that ran it exits), and the second, at its default, ended the process
            # before anything was written (2026-11-24).
            left = chat.unsent(saved)
            kept, not_kept = _keep_unsent(left, key) if left else (None, "")
            if chat.keep is not None:
                # Kept elsewhere now; else the next chat takes it, if it holds what is left
                # now (one a full disk left as it was brought back a draft sent since).
                chat.keep_safe()
                chat.keep.close(remove=not not_kept or bool(chat.keep.failing))
            if chat.orphans is not None and not_kept:  # (left for the next chat)
                chat.orphans.release()
            elif chat.orphans is not None:  # (kept by this exit)
                chat.orphans.forget()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            loop.set_exception_handler(old_handler)
    if left:
        with contextlib.suppress(OSError):
            # ("has not stored these" headed lines that said "it may have been stored",
            # and were: a daily user's run, 2026-11-24)
            print("not sent when you left, or not confirmed (look in the room before you "
                  "send those again)" + (
                      f"; NOT kept in {kept} ({not_kept}): copy them now:" if not_kept else
                      f"; also kept in {kept}:"))
            for line in left:
                print(f"  {line}")
    if chat.left_unstored():
        return EXIT_ERROR  # a wrapper script can tell that something typed was not stored
    return int(result or 0)
