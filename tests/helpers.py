"""Helpers shared by the test modules (import them from here, never from another test file).

* ``need(what, why)`` - a tool or facility a test cannot run without: skips loudly on a
  laptop, FAILS when ``CI`` is set (nothing is skipped in CI).
* ``fresh_channel_options`` - channel options that give a channel its own TCP connection
  (grpc's Python client otherwise shares one connection between channels to one target).
* chat protocol helpers (``hello_events``, ``send``, ``collect``, ``collect_ids``), token
  issuing (``issue_recorded``), and the real ``tsnetchat serve`` process (``start_daemon``).
* ``ServerProc`` (a restartable `tsnetchat serve` on the lab's chat-server node),
  ``run_cli`` and ``Tmux`` (a terminal in a tmux server of its own) for the client tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsnetchat import auth
from tsnetchat.client import RoomSession
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.server import Server

# A channel with these options opens its own TCP connection instead of sharing one with
# every other channel to the same target (grpc's global subchannel pool).
fresh_channel_options: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]


def need(what: str, why: str = "") -> None:
    """Fail (CI) or skip loudly (elsewhere) because ``what`` is missing; ``why`` says how to
    get it."""
    msg = f"{what} is unavailable" + (f": {why}" if why else "")
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {msg}", pytrace=False)
    print(f"\n*** SKIPPING: {msg} ***\n", file=sys.stderr)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def issue_recorded(server: Server, login: str, rooms: tuple[str, ...], *, admin: bool,
                   ttl: float) -> str:
    """Sign a token with the server's key and record it, as `tsnetchat token issue` does."""
    key = server.cfg.key_path.read_bytes().strip()
    tok, claims = auth.issue_token(key, login, rooms, admin=admin, ttl_seconds=ttl)
    assert server.store is not None
    server.store.record_token(claims.to_row())
    return tok


async def hello_events(room: str, after: int | None = None,
                       then: list[pb.ClientEvent] | None = None,
                       hold: asyncio.Event | None = None,
                       batch_acks: bool = False) -> AsyncIterator[pb.ClientEvent]:
    h = pb.Hello(room=room, batch_acks=batch_acks)
    if after is not None:
        h.after_id = after
    yield pb.ClientEvent(hello=h)
    for ev in then or []:
        yield ev
    await (hold or asyncio.Event()).wait()


def send(text: str, cmid: str = "") -> pb.ClientEvent:
    return pb.ClientEvent(send=pb.SendMessage(text=text, kind=pb.MESSAGE_KIND_TEXT,
                                              client_msg_id=cmid))


async def collect(call: Any, n: int, *, kind: str = "message", timeout: float = 10) -> list[Any]:
    """Read events until n of `kind` (batches unpacked) have arrived."""
    got: list[Any] = []

    async def loop() -> None:
        async for ev in call:
            which = ev.WhichOneof("event")
            if kind == "message" and which == "message":
                got.append(ev.message)
            elif kind == "message" and which == "batch":
                got.extend(ev.batch.messages)
            elif which == kind:
                got.append(getattr(ev, which))
            if len(got) >= n:
                return

    await asyncio.wait_for(loop(), timeout)
    return got


def collect_ids(session: RoomSession, seen: list[int], n: int) -> asyncio.Task[None]:
    """A task that appends the ids of a RoomSession's messages to ``seen`` until it has n."""
    async def consume() -> None:
        async for ev in session.events():
            if ev.kind == "message":
                seen.append(ev.message.id)
            if len(seen) >= n:
                return

    return asyncio.create_task(consume())



# --- the real `tsnetchat serve` process -------------------------------------------------

CLI = str(Path(sys.executable).with_name("tsnetchat"))


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    state: Path
    port: int
    notify: socket.socket
    log: Path

    def token(self, login: str, *, admin: bool = False) -> str:
        out = subprocess.run([CLI, "token", "issue", login, "--state-dir", str(self.state),
                              *(["--admin"] if admin else [])],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def notifications(self, timeout: float) -> list[str]:
        self.notify.settimeout(timeout)
        msgs = []
        try:
            while True:
                msgs.extend(self.notify.recv(4096).decode().splitlines())
                self.notify.settimeout(0.05)
        except (TimeoutError, BlockingIOError):
            pass
        return msgs

    def wait_for(self, line: str, timeout: float = 30) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += self.notifications(0.5)
            if any(s.startswith(line) for s in seen):
                return seen
            assert self.proc.poll() is None, self.log.read_text()
        raise AssertionError(f"no {line} in {seen}; log:\n{self.log.read_text()}")


def start_daemon(lab: Any, tmp: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> Daemon:
    state = tmp / "state"
    port = free_port()
    sock_path = str(tmp / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [CLI, "serve", "--state-dir", str(state), "--socket", lab.nodes["chat-server"].socket,
         "--port", str(port), *extra],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,  # noqa: SIM115
        env={**os.environ, "NOTIFY_SOCKET": sock_path, **(env or {})})
    return Daemon(proc, state, port, notify, log)




# --- `tsnetchat serve` on the lab's chat-server node, and terminals in tmux ----------------


@dataclass
class ServerProc:
    """`tsnetchat serve` on the lab's chat-server node, restartable on the same state and
    port. ``env`` adds settings (TSNETCHAT_RATE_BURST=...)."""

    lab: Any
    state: Path
    port: int
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.state.parent / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [CLI, "serve", "--state-dir", str(self.state), "--socket",
             self.lab.nodes["chat-server"].socket, "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run(["ss", "-ltnH", f"sport = :{self.port}"], capture_output=True,
                              text=True).stdout.strip():
                return
            assert self.proc.poll() is None
            time.sleep(0.1)
        raise AssertionError("server did not listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def token(self, login: str, rooms: tuple[str, ...] = ()) -> str:
        return subprocess.run([CLI, "token", "issue", login, "--state-dir", str(self.state),
                               *[a for r in rooms for a in ("--room", r)]],
                              capture_output=True, text=True, check=True).stdout.strip()

    def client_args(self, node: str) -> list[str]:
        n = self.lab.nodes[node]
        return ["--socket", n.socket, "--port", str(self.port), "--proxy", n.http_proxy]


def run_cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, **kw)


def shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


class Tmux:
    """A terminal running ``cmd`` in a tmux server of its own (its own socket, so nothing
    is shared with other tmux users on the machine). When ``cmd`` ends the pane shows
    ``EXITED <code>``; every bell is counted (tmux's alert-bell hook)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], *,
                 width: int = 120, height: int = 50) -> None:
        self.name = name
        self.socket = f"tsnetchat-{name}"
        self.bells = Path(tempfile.mkdtemp(prefix="tsnetchat-tmux-")) / "bells"
        self.bells.touch()
        exports = " ".join(f"{k}={shell_quote(v)}" for k, v in env.items())
        command = " ".join(shell_quote(c) for c in cmd)
        self.tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height),
                  f"env {exports} {command}; echo EXITED $?; sleep 60")
        self.tmux("set-option", "-t", name, "monitor-bell", "on")
        self.tmux("set-option", "-t", name, "bell-action", "any")
        self.tmux("set-hook", "-t", name, "alert-bell",
                  f"run-shell 'echo bell >> {self.bells}'")
        self.socket_path = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True).stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)
        if enter:
            self.keys("Enter")

    def keys(self, *keys: str) -> None:
        """Named keys: Enter, C-j, M-2, PageUp, ..."""
        self.tmux("send-keys", "-t", self.name, *keys)

    def screen(self, *, colours: bool = False, scrollback: bool = False) -> str:
        """What the terminal shows (``scrollback``: and what scrolled off above it)."""
        return self.tmux("capture-pane", "-p", *(["-e"] if colours else []),
                         *(["-S", "-"] if scrollback else []), "-t", self.name)

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.screen()
            if re.search(pattern, s):
                return s
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not on {self.name}'s screen:\n{self.screen()}")

    def bell_count(self) -> int:
        return len(self.bells.read_text().splitlines())

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        shutil.rmtree(self.bells.parent, ignore_errors=True)
        with contextlib.suppress(OSError):  # tmux leaves its socket file behind
            os.unlink(self.socket_path)
