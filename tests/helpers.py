"""Helpers shared by the test modules (import them from here, never from another test file).

* ``need(what, why)`` - a tool or facility a test cannot run without: skips loudly on a
  laptop, FAILS when ``CI`` is set (nothing is skipped in CI).
* ``fresh_channel_options`` - channel options that give a channel its own TCP connection
  (grpc's Python client otherwise shares one connection between channels to one target).
* chat protocol helpers (``hello_events``, ``send``, ``collect``, ``collect_ids``), token
  issuing (``issue_recorded``), and the real ``tsnetchat serve`` process (``start_daemon``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsnetchat import auth
from tsnetchat.client import RoomSession
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.server import Server
from tsnetchat.store import Store

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
    """Sign a token with the server's key and record it, as `tsnetchat token issue` does
    (from a connection of its own, beside the running server)."""
    key = server.cfg.key_path.read_bytes().strip()
    tok, claims = auth.issue_token(key, login, rooms, admin=admin, ttl_seconds=ttl)
    store = Store(server.cfg.db_path)
    try:
        store.record_token(claims.to_row())
    finally:
        store.close()
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




# --- another process holding the history database's write lock --------------------------

_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
print("released", flush=True)
"""


class WriteLock:
    """A process that holds SQLite's write lock on a database until ``release()``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.held = True

    async def release(self) -> None:
        if not self.held:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        assert await self.proc.stdout.readline() == b"released\n"
        await self.proc.wait()
        self.held = False


@asynccontextmanager
async def write_lock_held(db: Path) -> AsyncIterator[WriteLock]:
    """Another process holds the write lock on ``db`` (as `sqlite3` in a shell, a backup
    tool, or a stalled disk would) until released, or until the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD_LOCK, str(db), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"locked\n"
    lock = WriteLock(proc)
    try:
        yield lock
    finally:
        if lock.held:
            await lock.release()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Wait (without asserting anything about time) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)
