"""Helpers shared by the test modules (import them from here, never from another test file).

* ``need(what, why)`` - a tool or facility a test cannot run without: skips loudly on a
  laptop, FAILS when ``CI`` is set (nothing is skipped in CI).
* ``fresh_channel_options`` - channel options that give a channel its own TCP connection
  (grpc's Python client otherwise shares one connection between channels to one target).
* chat protocol helpers (``hello_events``, ``send``, ``collect``, ``collect_ids``), token
  issuing (``issue_recorded``), and the real ``tsnetchat serve`` process (``start_daemon``).
* what the fixtures yield: ``Chat`` (a server over FakeTailnet: ``chat_server``,
  ``make_config``) and ``LabChat`` (a server on the lab's chat-server node:
  ``lab_server``), and ``LocalAPIRelay`` (makes the server's LocalAPI vanish while tailnet
  traffic flows).
* changing the lab's tailnet (``apply_policy``, ``policy_changed``) and small waits and
  reads (``until``, ``first_of``, ``refused``, ``token_id``).
* ``tun_node`` - a kernel-TUN tailscaled in a network namespace the test creates;
  ``lab_daemon`` - the real ``tsnetchat serve`` process on chat-server, restartable on one
  port; ``extra_node`` - a person's second device added to the lab.
* ``run_cli`` and ``Tmux`` (a terminal in a tmux server of its own) for the client tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import nats
import nats.js.errors
import pytest
from fakenet import FakeTailnet, HeldBack

from tsnetchat import auth
from tsnetchat.client import Connection, Link, RoomSession, SessionEvent, connect
from tsnetchat.cluster import STREAM
from tsnetchat.config import ServerConfig, load_config
from tsnetchat.errors import PeerNotFound, ServerUnavailable, TailnetError
from tsnetchat.hub import Pacing
from tsnetchat.netio import splice
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.resume import START_GRACE
from tsnetchat.server import Server
from tsnetchat.store import Store
from tsnetchat.tailnet import LocalAPI

if TYPE_CHECKING:  # (scripts/ is on the path in pytest only: tests/fulldisk_child.py)
    import nats_lab

# A channel with these options opens its own TCP connection instead of sharing one with
# every other channel to the same target (grpc's global subchannel pool).
fresh_channel_options: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]


T = TypeVar("T")


def need(what: str, why: str = "") -> None:
    """Fail (CI) or skip loudly (elsewhere) because ``what`` is missing; ``why`` says how to
    get it."""
    msg = f"{what} is unavailable" + (f": {why}" if why else "")
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {msg}", pytrace=False)
    print(f"\n*** SKIPPING: {msg} ***\n", file=sys.stderr)
    pytest.skip(msg)


def need_mount_namespace(why: str) -> None:
    """Skip (fail under CI) unless this process may make a mount namespace of its own."""
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode:
        need("a mount namespace (unshare -m, as root)", why)


def on_tmpfs(disk: Path, size: str, script: str, *, why: str,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the shell ``script`` in a mount namespace of its own, with a ``size`` tmpfs (a
    real small disk, which the script may fill or remount read-only) mounted on ``disk``,
    made here. ``why`` says what the test needs the namespace for."""
    need_mount_namespace(why)
    disk.mkdir()
    return subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} && {script}"],
        capture_output=True, text=True, timeout=timeout)


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

    def reload(self, timeout: float = 30) -> None:
        """SIGHUP, then return once the daemon logs that it reloaded (a fixed second after
        the signal assumed it on time)."""
        said = "reloaded configuration"
        before = self.log.read_text().count(said)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log.read_text().count(said) <= before:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"no reload in {timeout}s:\n{self.log.read_text()}"
            time.sleep(0.1)

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


# --- servers the fixtures yield -------------------------------------------------------


def make_config(tmp: Path, **overrides: Any) -> ServerConfig:
    # Generous rate limits by default; the limit tests set their own.
    flags = {"state_dir": str(tmp / "state"), "listen": "127.0.0.1", "port": free_port(),
             "rate_burst": 1000, "rate_per_second": 1000.0, **overrides}
    return load_config(file=None, env={}, flags=flags)


@dataclass
class Chat:
    """A running server over FakeTailnet, plus helpers to act as different tailnet users."""

    server: Server
    net: FakeTailnet
    cfg: ServerConfig
    pacing: Pacing | None = None
    conns: list[Connection] = field(default_factory=list)

    def token(self, login: str, rooms: tuple[str, ...] = ("*",), *, admin: bool = False,
              ttl: float = 3600) -> str:
        return issue_recorded(self.server, login, rooms, admin=admin, ttl=ttl)

    async def connect(self, login: str, token: str | None = None, **front: Any) -> Connection:
        """A new connection (its own TCP connection) that reaches the server as ``login``."""
        addr = await self.net.front(login, **front)
        conn = await connect("chat-server", token if token is not None else self.token(login),
                             socket="", address=addr)
        self.conns.append(conn)
        return conn

    async def direct(self, token: str) -> Connection:
        """A loopback connection that does not come through the (fake) tailnet."""
        conn = await connect("chat-server", token, socket="",
                             address=f"127.0.0.1:{self.server.ports[0]}")
        self.conns.append(conn)
        return conn

    async def restart(self, **changes: Any) -> None:
        await self.server.stop(grace=0.5)
        cfg = self.cfg if not changes else ServerConfig(**{**self.cfg.__dict__, **changes})
        self.cfg = cfg
        self.server = Server(cfg, tailnet=self.net, pacing=self.pacing)
        await self.server.start()


@contextlib.asynccontextmanager
async def chat_server(tmp: Path, *, pacing: Pacing | None = None,
                      **overrides: Any) -> AsyncIterator[Chat]:
    """A server over FakeTailnet (``make_config(tmp, **overrides)``), stopped afterwards."""
    cfg = make_config(tmp, **overrides)
    net = FakeTailnet(server_port=cfg.port)
    server = Server(cfg, tailnet=net, pacing=pacing)
    await server.start()
    chat = Chat(server, net, cfg, pacing)
    try:
        yield chat
    finally:
        await _close(chat.conns, chat.server)
        await net.close()


async def _close(conns: list[Connection], server: Server) -> None:
    for conn in conns:
        await bounded(conn.close(), "closing a client connection")
    await bounded(server.stop(grace=0.2), "stopping the server")


async def bounded(step: Any, what: str, timeout: float = 30) -> Any:
    """Await ``step``; a hang fails the test naming the step, and where it waited, instead of
    timing it out. (Not ``wait_for``: it waits for a step it cancelled to end, and a step that
    swallowed the cancellation hung the test until pytest-timeout's 180 s.)"""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    where = "\n  ".join(await_chain(task.get_coro()))
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:
        # The loop's end (pytest-asyncio's runner) would wait for it for ever, and
        # pytest-timeout is off once the test has failed: end the run, stacks printed, in 60 s.
        faulthandler.dump_traceback_later(60, exit=True)
        where += "\n(and it ignored its cancellation: the run ends in 60 s)"
    raise AssertionError(f"{what} did not finish in {timeout:g}s; it waited at\n  {where}")


def await_chain(coro: Any) -> list[str]:
    """Where a suspended coroutine waits, through every await down to the innermost one
    (``Task.get_stack`` shows only the outermost frame of a suspended task)."""
    chain = []
    while coro is not None and len(chain) < 40:
        frame = next((getattr(coro, a) for a in ("cr_frame", "ag_frame", "gi_frame")
                      if getattr(coro, a, None) is not None), None)
        if frame is None:
            # an `async for`'s step (async_generator_asend) holds its generator; a future's
            # iterator (FutureIter) its future: follow the one, name the other
            inner = [r for r in gc.get_referents(coro)
                     if inspect.isasyncgen(r) or isinstance(r, asyncio.Future)]
            if inner and inspect.isasyncgen(inner[0]):
                coro = inner[0]
                continue
            chain.append(repr(inner[0] if inner else coro))
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = next((getattr(coro, a) for a in ("cr_await", "ag_await", "gi_yieldfrom")
                     if getattr(coro, a, None) is not None), None)
    return chain


class LocalAPIRelay:
    """Forwards a unix socket to a node's LocalAPI; `pause()` makes the LocalAPI vanish for
    whoever uses the relay (the server), while tailnet traffic keeps flowing; ``answering``
    cleared holds tailscaled's answers back (a stalled tailscaled: asked, not answering)
    until it is set again."""

    def __init__(self, target: str, path: str) -> None:
        self.target, self.path = target, path
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.answering = asyncio.Event()
        self.answering.set()

    async def resume(self) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                try:
                    ur, uw = await asyncio.open_unix_connection(self.target)
                except OSError:
                    w.close()
                    return
                self._writers.update((w, uw))
                await splice((r, w), (HeldBack(ur, self.answering), uw))  # type: ignore[arg-type]
            finally:
                self._handlers.discard(task)

        self._server = await asyncio.start_unix_server(handle, self.path)

    async def pause(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if self._handlers:  # let them see the end (a handler cancelled at exit logs errors)
            await asyncio.wait(set(self._handlers), timeout=2)
        if os.path.exists(self.path):
            os.unlink(self.path)


async def lab_connect(lab: Any, node: str, server: str, port: int, token: str, *,
                      mode: str = "proxy") -> Connection:
    """A new connection (its own TCP connection) from lab node ``node`` to ``server`` (a
    MagicDNS name) over the tailnet. A first dial that finds nothing answering is tried
    again for up to 8 s, as the client does (resume.START_GRACE): in a full CI run on a
    loaded machine (2026-11-23) mallory's proxy once could not reach a server alice and bob
    had just reached, and in another (2026-11-24) alice's proxy answered 500 to the
    channel's first dial, which gRPC only makes at the first call. So the channel is
    dialled here, within the same 8 s; if it is still not ready it is given 8 s more (with
    its node's ``tailscale ping`` in the log), then returned as it is, and the test's first
    call says why. A proxy that took its whole 8 s probe without connecting is given two
    more probes, each after a ``tailscale ping`` from its node whose answer goes to the
    test's log: in full CI runs (2026-11-25, twice) mallory's proxy did not connect to a
    server the others had reached, and passed in every run before and after."""
    n = lab.nodes[node]
    deadline = time.monotonic() + START_GRACE
    probes_left = 2
    while True:
        try:
            conn = await connect(server, token, socket=n.socket, port=port,
                                 proxy=f"http://{n.http_proxy}" if mode == "proxy" else "")
            break
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
        except TailnetError as e:
            if not (probes_left and "did not connect" in str(e)):
                raise
            probes_left -= 1
            print(f"[lab] {e}\n[lab] tailscale ping from {node}: "
                  f"{await _ping(lab, n, server)}", file=sys.stderr, flush=True)
            deadline = time.monotonic() + START_GRACE
    try:
        await asyncio.wait_for(conn.channel.channel_ready(),
                               max(1.0, deadline - time.monotonic()))
    except TimeoutError:  # the same once more, with the path in the log
        print(f"[lab] {node}'s channel to {server} was not ready in time\n"
              f"[lab] tailscale ping from {node}: {await _ping(lab, n, server)}",
              file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.channel.channel_ready(), START_GRACE)
    return conn


async def _ping(lab: Any, n: Any, server: str) -> str:
    """``tailscale ping`` from lab node ``n`` to ``server``: its answer, or why there was
    none."""
    import tailnet_lab

    try:
        out = await asyncio.to_thread(lab.tailscale, n, "ping", "-c", "5", server, timeout=30)
    except (tailnet_lab.LabError, subprocess.TimeoutExpired) as e:
        return str(e)
    return out.strip()


@dataclass
class LabChat:
    """An in-process server on the lab's chat-server node (real LocalAPI, real WhoIs)."""

    lab: Any
    server: Server
    cfg: ServerConfig
    relay: LocalAPIRelay
    conns: list[Connection] = field(default_factory=list)
    node: str = "chat-server"  # the lab node the server runs on

    @property
    def port(self) -> int:
        return self.cfg.port

    def token(self, login: str, rooms: tuple[str, ...] = ("*",), *, admin: bool = False,
              ttl: float = 3600) -> str:
        return issue_recorded(self.server, login, rooms, admin=admin, ttl=ttl)

    async def connect(self, node: str, token: str, *, mode: str = "proxy") -> Connection:
        """A new connection (its own TCP connection) from ``node`` over the tailnet
        (``lab_connect``), closed with the server."""
        conn = await lab_connect(self.lab, node, self.node, self.port, token, mode=mode)
        self.conns.append(conn)
        return conn

    async def refused_at_last(self, node: str, token: str, what: str
                              ) -> tuple[Connection, grpc.aio.AioRpcError]:
        """A new connection from ``node`` each try, within 15 s, until a WhoAmI on it is
        refused (the server learns what makes it refuse a moment after the tailnet or the
        cluster has it): that connection and its refusal. ``what``: said if it never is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            conn = await self.connect(node, token)
            try:
                me = await conn.whoami()
            except grpc.aio.AioRpcError as e:
                return conn, e
            assert loop.time() < deadline, f"{what}: {me}"
            await asyncio.sleep(0.2)

    async def direct(self, token: str) -> Connection:
        conn = await connect("chat-server", token, socket="", address=f"127.0.0.1:{self.port}")
        self.conns.append(conn)
        return conn


@dataclass
class TwoDevices:
    """Bob on a phone added to the lab and on his laptop, each subscribed to #general."""

    phone: Connection
    laptop: Connection
    on_phone: Any
    on_laptop: Any


@contextlib.asynccontextmanager
async def bobs_phone_and_laptop(lab_chat: LabChat) -> AsyncIterator[TwoDevices]:
    """``TwoDevices`` with both streams past their replay; the phone is dropped from the lab
    at the end, whatever the test did to it."""
    lab = lab_chat.lab
    await asyncio.to_thread(lab.add_node, "bob-phone", "bob")
    try:
        token = lab_chat.token("bob@tailnet.test")
        phone = await lab_chat.connect("bob-phone", token)
        laptop = await lab_chat.connect("bob-laptop", token)
        two = TwoDevices(phone, laptop, phone.subscribe("general"), laptop.subscribe("general"))
        await first_of(two.on_phone, "replay_done")
        await first_of(two.on_laptop, "replay_done")
        yield two
    finally:
        await asyncio.to_thread(lab.drop_node, "bob-phone")


@contextlib.asynccontextmanager
async def lab_server(lab: Any, tmp: Path, *, node: str = "chat-server",
                     **overrides: Any) -> AsyncIterator[LabChat]:
    """A server on the lab's chat-server node (or ``node``: chat-server-2 for a cluster's
    second server), its LocalAPI reached through a relay."""
    suffix = "" if node == "chat-server" else f"-{node}"
    relay = LocalAPIRelay(lab.nodes[node].socket, str(tmp / f"relay{suffix}.sock"))
    await relay.resume()
    cfg = load_config(file=None, env={}, flags={
        "state_dir": str(tmp / f"state{suffix}"), "socket": relay.path, "port": free_port(),
        "cap_domain": "example.com", "startup_timeout": 20.0, **overrides})
    api = LocalAPI(cfg.effective_socket(), timeout=cfg.whois_timeout)
    try:
        server = Server(cfg, tailnet=api)
        await server.start()
        lc = LabChat(lab, server, cfg, relay, node=node)
        try:
            yield lc
        finally:
            await _close(lc.conns, server)
    finally:
        await bounded(api.aclose(), "closing the server's LocalAPI client")
        await bounded(relay.pause(), "stopping the LocalAPI relay")


# --- changing the lab's tailnet -----------------------------------------------------------


async def apply_policy(lab: Any, policy: dict[str, Any], timeout: float = 30) -> None:
    """Write headscale's policy and return once chat-server's tailscaled applies it: WhoIs
    there shows each lab user exactly the app grants the policy gives them. (Waiting for
    the next IPN bus notice is not enough: a notice from an earlier change may come first.)"""
    import tailnet_lab

    users = ("alice", "bob", "mallory")
    want = {u: [v for g in policy["grants"] if g.get("src") == [f"{u}@"]
                for v in g.get("app", {}).get(tailnet_lab.CAP_NAME, [])] or None
            for u in users}
    lab.write_policy(policy)
    deadline = time.monotonic() + timeout
    async with LocalAPI(lab.nodes["chat-server"].socket) as api:
        while True:
            try:
                seen = {u: (await _whois_through(lab, api, f"{u}-laptop")).cap_map.get(
                    tailnet_lab.CAP_NAME) for u in users}
            except PeerNotFound as e:  # seen once while the netmap changed (2026-11-22)
                seen = {"not yet": str(e)}
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                # (a lab node's proxy slow to connect, as LabChat.connect's were, 2026-11-25)
                seen = {"not reached": repr(e)}
            if seen == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"chat-server did not apply the policy in {timeout}s: "
                                     f"{seen} != {want}")
            await asyncio.sleep(0.2)


async def _whois_through(lab: Any, api: LocalAPI, node: str) -> Any:
    """WhoIs, on chat-server, of a connection ``node`` opens to it over the tailnet."""
    accepted: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(w.get_extra_info("peername")[:2])
        await r.read()
        w.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    proxy_host, proxy_port = lab.nodes[node].http_proxy.rsplit(":", 1)
    r, w = await asyncio.open_connection(proxy_host, int(proxy_port))
    try:
        w.write(f"CONNECT chat-server:{port} HTTP/1.1\r\nHost: chat-server:{port}\r\n\r\n"
                .encode())
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        host, peer_port = await asyncio.wait_for(accepted.get(), 10)
        return await api.whois(f"{host}:{peer_port}")  # while the connection is open
    finally:
        w.close()
        listener.close()


@contextlib.asynccontextmanager
async def policy_changed(lab: Any, policy: dict[str, Any]) -> AsyncIterator[None]:
    """The lab runs under ``policy`` inside the block, and under its default one again after."""
    import tailnet_lab

    await apply_policy(lab, policy)
    try:
        yield
    finally:
        await apply_policy(lab, tailnet_lab.default_policy())


def policy_granting(src: str, rooms: list[str], *, admin: bool = False) -> dict[str, Any]:
    """The lab's default policy with the grant of ``src`` (e.g. "alice@") narrowed to
    ``rooms`` and ``admin``."""
    import copy

    import tailnet_lab

    policy = copy.deepcopy(tailnet_lab.default_policy())
    for g in policy["grants"]:
        if g["src"] == [src]:
            g["app"] = {tailnet_lab.CAP_NAME: [{"rooms": rooms, "admin": admin}]}
    return policy


def without_grant_of(user: str) -> dict[str, Any]:
    """The lab's default policy without ``user``'s grant (e.g. "bob")."""
    import copy

    import tailnet_lab

    policy = copy.deepcopy(tailnet_lab.default_policy())
    policy["grants"] = [g for g in policy["grants"] if g["src"] != [f"{user}@"]]
    return policy


def token_id(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def until(predicate: Callable[[], bool], what: str = "", timeout: float = 10) -> None:
    """Poll ``predicate()`` until it is true (asserting nothing about how long it took,
    within a generous ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or predicate}")
        await asyncio.sleep(0.02)


async def first_of(call: Any, kind: str, timeout: float = 10) -> Any:
    """The first event of ``kind`` on a stream (None if it ends first)."""
    async def loop() -> Any:
        async for ev in call:
            if ev.WhichOneof("event") == kind:
                return getattr(ev, kind)
        return None

    return await asyncio.wait_for(loop(), timeout)


async def refused(coro: Any) -> Any:
    """The gRPC error ``coro`` ends with (it must end with one)."""
    import grpc

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value


# --- a kernel-TUN tailscaled in a network namespace the test creates -------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@dataclass
class TunNode:
    """A TUN-mode tailscaled in its own network namespace (``exec`` runs a command there)."""

    ns: str
    dir: Path
    socket: str
    procs: list[subprocess.Popen[Any]]
    hostname: str = ""

    def exec(self, *args: str) -> list[str]:
        # The full path: callers may give the command an environment with a narrow PATH.
        return [shutil.which("ip") or "ip", "netns", "exec", self.ns, *args]

    @property
    def etc(self) -> Path:
        """Files here replace /etc's for commands run with ``exec`` (resolv.conf, hosts)."""
        return Path("/etc/netns") / self.ns

    def status(self, tailscale: str) -> dict[str, Any]:
        out = sh(tailscale, f"--socket={self.socket}", "status", "--json")
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def serve(self, d: Path, port: int) -> Iterator[subprocess.Popen[Any]]:
        """`tsnetchat serve` in this node's namespace on ``port``, its state dir and log
        (serve.log) under ``d``, once it has told systemd's notify socket READY=1;
        stopped on the way out."""
        notify_path = str(d / "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(60)
        cli = str(Path(sys.executable).with_name("tsnetchat"))
        server = subprocess.Popen(
            self.exec(cli, "serve", "--state-dir", str(d / "state"), "--socket", self.socket,
                      "--port", str(port)),
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            stdout=open(d / "serve.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        try:
            said = ""
            while "READY=1" not in said:
                said += notify.recv(4096).decode()
            yield server
        finally:
            server.terminate()
            server.wait(timeout=15)
            notify.close()


def tun_possible() -> str:
    """Why a TUN node cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no iproute2 (ip)"
    return ""


@contextlib.contextmanager
def tun_node(lab: Any, d: Path, *, user: str, hostname: str, tag: str,
             subnet: str = "169.254.213") -> Iterator[TunNode]:
    """Start a kernel-TUN tailscaled for ``user`` in a new namespace and join the lab.

    The namespace reaches the host through a veth pair on a link-local ``subnet``.0/30 (checked
    to be unused here: this machine's own eth0 is in 192.0.2.0/24), and the lab's headscale
    through two small forwarders, so that `http://127.0.0.1:<port>` means the same inside and
    outside; DERP rides on that port too. ``tailscale up --accept-dns=false
    --netfilter-mode=off`` so it touches neither resolv.conf nor the firewall. Everything it
    made (namespace, links, /etc/netns/<ns>, processes) is removed on the way out.
    """
    why = tun_possible()
    if why:
        need("a TUN device in a network namespace", why)
    ns, vh, vn = f"tsnc{tag}", f"tsncvh{tag}", f"tsncvn{tag}"
    host_ip, ns_ip = f"{subnet}.1", f"{subnet}.2"
    node = TunNode(ns, d, str(d / "ts.sock"), [], hostname)
    hs_port = int(lab.headscale_url.rsplit(":", 1)[1])
    routes = sh("ip", "-4", "route", "show", "table", "all").stdout
    assert subnet + "." not in routes, f"the test's {subnet}.0/30 is already in use here"
    here = Path(__file__).resolve().parent
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", vh, "type", "veth", "peer", "name", vn)
        sh("ip", "link", "set", vn, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", vh)
        sh("ip", "link", "set", vh, "up")
        sh(*node.exec("ip", "addr", "add", f"{ns_ip}/30", "dev", vn))
        sh(*node.exec("ip", "link", "set", vn, "up"))
        sh(*node.exec("ip", "link", "set", "lo", "up"))
        fwd = [sys.executable, str(here / "tcpfwd.py")]
        for argv in ([*fwd, host_ip, str(hs_port), "127.0.0.1", str(hs_port)],
                     node.exec(*fwd, "127.0.0.1", str(hs_port), host_ip, str(hs_port))):
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            node.procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        (d / "logs").mkdir()
        env = lab.node_env(d)
        node.procs.append(subprocess.Popen(
            node.exec(str(lab.bin.tailscaled), "--tun=tsnctun0", f"--statedir={d}",
                      f"--socket={node.socket}", "--port=0"),
            env=env, stdout=open(d / "tailscaled.log", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115
        for _ in range(100):
            if os.path.exists(node.socket):
                break
            time.sleep(0.1)
        up = subprocess.run(
            node.exec(str(lab.bin.tailscale), f"--socket={node.socket}", "up",
                      f"--login-server={lab.headscale_url}", f"--auth-key={lab.auth_key(user)}",
                      f"--hostname={hostname}", "--accept-dns=false", "--netfilter-mode=off",
                      "--timeout=60s"), env=env, capture_output=True, text=True)
        assert up.returncode == 0, up.stderr + (d / "tailscaled.log").read_text()[-3000:]
        yield node
    finally:
        for p in reversed(node.procs):
            p.kill()
            p.wait()
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", vh, check=False)
        shutil.rmtree(node.etc, ignore_errors=True)


# --- `tsnetchat serve` (a process) on the lab's chat-server node, restartable on one port


@dataclass
class LabDaemon:
    """The real server process on chat-server: same state dir and port across restarts."""

    lab: Any
    state: Path
    port: int
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    proc: subprocess.Popen[str] | None = None
    node: str = "chat-server"  # the lab node whose tailscaled it serves on

    @property
    def log(self) -> Path:
        return self.state.parent / f"serve-{self.port}.log"

    def start(self) -> LabDaemon:
        """Start and wait for READY (sd_notify), so it listens when this returns."""
        sock_path = str(self.state.parent / f"notify-{self.port}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        notify.settimeout(1)
        self.proc = subprocess.Popen(
            [CLI, "serve", "--state-dir", str(self.state), "--socket",
             self.lab.nodes[self.node].socket, "--port", str(self.port), *self.args],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT, text=True,  # noqa: SIM115
            env={**os.environ, "NOTIFY_SOCKET": sock_path, **(self.env or {})})
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(4096):
                        return self
            raise AssertionError(f"server not READY in 60s:\n{self.log.read_text()}")
        finally:
            notify.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM drains (SIGKILL for a crash); waits for the process to end."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        """A server-side command (token issue/list/revoke) on this server's state, with its
        environment (a cluster server's commands need its cluster settings)."""
        out = subprocess.run([CLI, *args, "--state-dir", str(self.state)],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, **(self.env or {})})
        return out.stdout.strip()

    def token(self, login: str, rooms: tuple[str, ...] = (), *extra: str) -> str:
        return self.cli("token", "issue", login, *[a for r in rooms for a in ("--room", r)],
                        *extra)

    def client_args(self, node: str) -> list[str]:
        """CLI options that reach this server from ``node`` through its HTTP proxy."""
        n = self.lab.nodes[node]
        return ["--socket", n.socket, "--port", str(self.port), "--proxy", n.http_proxy]


@contextlib.contextmanager
def lab_daemon(lab: Any, tmp: Path, *args: str, env: dict[str, str] | None = None
               ) -> Iterator[LabDaemon]:
    s = LabDaemon(lab, tmp / "state", free_port(), args, env).start()
    try:
        yield s
    finally:
        s.stop()


def extra_node(lab: Any, name: str, user: str) -> Any:
    """A node added to the lab for the rest of the session (a person's second device), in a
    directory other users may traverse, so an unprivileged client can reach its LocalAPI
    socket (tailscaled makes it 0666 and decides by the caller's uid what it may do)."""
    if name in lab.nodes:
        return lab.nodes[name]
    shared = lab.root / "shared"
    (shared / name).mkdir(parents=True)
    for d in (lab.root, shared, shared / name):
        os.chmod(d, 0o711 if d == lab.root else 0o755)
    return lab.add_node(name, user, node_dir=shared / name)


# --- the client on the command line and in terminals (tmux) -----------------------------


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

    def type_lines(self, lines: Iterable[str], timeout: float = 30) -> None:
        """Types each line and Enter as a person does, each in a read of its own: the line,
        then (once the input's row shows it) Enter, then (once the row no longer shows it,
        the chat having taken it) the next. The chat reads all a terminal has written by
        the time it reads: lines and Enters written at once, or by two ``type`` calls
        while it was busy, read as a paste without its marks, a block of lines that the
        next Enter sends as one message. Each line must fit the input's row."""
        for line in lines:
            self.tmux("send-keys", "-t", self.name, "-l", line)
            self._until_input(lambda row, line=line: row.endswith(line.rstrip()), line,
                              timeout)
            self.keys("Enter")
            self._until_input(lambda row, line=line: not row.endswith(line.rstrip()), line,
                              timeout)

    def _until_input(self, ok: Callable[[str], bool], line: str, timeout: float) -> None:
        """Polls (at 5 ms: a burst is typed faster than the server's rate limit) until
        ``ok`` holds for the input's row, the screen's last row with text."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [r.rstrip() for r in self.screen().splitlines() if r.strip()]
            if ok(rows[-1] if rows else ""):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{line!r} not taken by {self.name}'s input:\n"
                                     f"{self.screen()}")
            time.sleep(0.005)

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


# --- reading a client process's output as it comes ----------------------------------------


class Lines:
    """The lines a process prints on stdout (``err``: stderr), as they come (a thread reads
    them into a queue).

    ``select`` on a pipe cannot be used with Python's buffered readers: one ``readline`` may
    pull two lines into the buffer, and the second then waits for more output that may
    never come.
    """

    def __init__(self, proc: subprocess.Popen[str], *, err: bool = False) -> None:
        out = proc.stderr if err else proc.stdout
        assert out is not None
        self._q: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in out:
                self._q.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 60) -> str:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout:g}s") from None

    def message(self, timeout: float = 60) -> dict[str, Any]:
        """The next message `tail --json` prints (other records, such as the "live"
        marker, are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            record: dict[str, Any] = json.loads(self.next(max(0.1, deadline - time.monotonic())))
            if record.get("type") == "message":
                return record


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


# --- cluster mode: two servers on the lab's two server nodes, one NATS cluster --------------

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"


def cluster_flags(cluster: Any) -> dict[str, Any]:
    """The config of a server on ``cluster`` (a nats_lab.NatsCluster)."""
    return {"cluster": ",".join(cluster.urls), "nats_user": cluster.user,
            "nats_password": cluster.password}


@asynccontextmanager
async def two_servers(lab: Any, tmp: Path, cluster: Any, **overrides: Any
                      ) -> AsyncIterator[tuple[LabChat, LabChat]]:
    """Server 1 on chat-server and server 2 on chat-server-2, both on ``cluster``."""
    flags = {**cluster_flags(cluster), **overrides}
    async with lab_server(lab, tmp, **flags) as one, \
            lab_server(lab, tmp, node="chat-server-2", **flags) as two:
        yield one, two


class Talker:
    """A RoomSession (the client core the chat uses) on ``link``, its events pumped into
    lists: what a person in the chat sees."""

    def __init__(self, link: Link, room: str) -> None:
        self.link = link
        self.session = RoomSession(link, room, max_backoff=1.0)
        self.messages: list[pb.ChatMessage] = []
        self.sent: dict[str, int] = {}  # text -> id
        self.outages: list[float] = []
        self.fatal = ""
        self.connected = asyncio.Event()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for ev in self.session.events():
            if ev.kind == "message" and ev.message is not None:
                self.messages.append(ev.message)
            elif ev.kind == "sent" and ev.outgoing is not None:
                assert ev.outgoing.text not in self.sent, f"{ev.outgoing.text} acked twice"
                self.sent[ev.outgoing.text] = ev.message_id
            elif ev.kind == "fatal":
                self.fatal = ev.text
            elif ev.kind == "state" and self.session.connected:
                self.connected.set()
                if ev.seconds is not None:
                    self.outages.append(ev.seconds)

    def texts(self) -> list[str]:
        return [m.text for m in self.messages]

    async def close(self) -> None:
        await self.session.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.link.close()


async def server_1_killed_mid_conversation(one: Any, alice: Talker, bob: Talker) -> None:
    """alice (joined through server ``one``) and bob (through the other) talk; ``one`` is
    SIGKILLed mid-conversation and both go on typing. Returns once alice is through the other
    server with all 12 messages, each once, in order, the same as bob's (cluster mode)."""
    await bounded(alice.connected.wait(), "alice joining through server 1")
    await bounded(bob.connected.wait(), "bob joining through server 2")
    for i in range(5):
        alice.session.send(f"alice {i}")
    bob.session.send("bob 0")
    await until(lambda: len(bob.messages) == 6 and len(alice.sent) == 5,
                "the first messages reach bob", 30)
    one.stop(signal.SIGKILL)  # mid-conversation
    for i in range(5, 10):  # typed while her server is gone
        alice.session.send(f"alice {i}")
    bob.session.send("bob 1")
    await until(lambda: len(alice.sent) == 10 and len(alice.messages) == 12
                and len(bob.messages) == 12, "the conversation going on", 60)
    assert not alice.fatal, alice.fatal
    assert alice.link.target is not None and alice.link.target.name == "chat-server-2"
    ids = [m.id for m in alice.messages]
    assert ids == list(range(1, 13))  # no gap, nothing twice, in order
    assert [m.id for m in bob.messages] == ids
    assert sorted(alice.texts()) == sorted([f"alice {i}" for i in range(10)] +
                                           ["bob 0", "bob 1"])
    print(f"alice's outage: {alice.outages}")


# --- cluster mode: streams, the stream's content, and what reaches another server --------


class Joined:
    """A Join stream, read up to its replay_done; ``write`` queues another client event."""

    def __init__(self, conn: Connection, room: str, after: int | None,
                 then: list[pb.ClientEvent] | None) -> None:
        self._queue: asyncio.Queue[pb.ClientEvent] = asyncio.Queue()
        for ev in then or []:
            self._queue.put_nowait(ev)
        self.call = conn.stub.Join(self._events(room, after), metadata=conn.metadata)

    async def _events(self, room: str, after: int | None) -> AsyncIterator[pb.ClientEvent]:
        async for ev in hello_events(room, after, hold=asyncio.Event()):
            yield ev
            break
        while True:
            yield await self._queue.get()

    async def write(self, ev: pb.ClientEvent) -> None:
        self._queue.put_nowait(ev)

    def __aiter__(self) -> Any:
        return self.call.__aiter__()

    def cancel(self) -> None:
        self.call.cancel()


async def join(conn: Connection, room: str, after: int | None = None,
               then: list[pb.ClientEvent] | None = None) -> Joined:
    joined = Joined(conn, room, after, then)
    await collect(joined.call, 1, kind="replay_done")
    return joined


def held_calls(obj: Any, monkeypatch: pytest.MonkeyPatch,
               *names: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``obj``'s coroutine methods ``names`` wait (as reads behind busy readers) while
    the first event is not set (it starts set); the second is set when one of them begins.
    The methods themselves then run as they are."""
    go, begun = asyncio.Event(), asyncio.Event()
    go.set()

    def held(call: Any) -> Any:
        async def wait_then(*args: Any, **kwargs: Any) -> Any:
            begun.set()
            await go.wait()
            return await call(*args, **kwargs)
        return wait_then

    for name in names:
        monkeypatch.setattr(obj, name, held(getattr(obj, name)))
    return go, begun


async def ack_or_error(call: Any, cmid: str, timeout: float = 30) -> Any:
    """The Sent or the Error the server answers ``cmid`` with."""
    async def loop() -> Any:
        async for ev in call:
            which = ev.WhichOneof("event")
            acks = [ev.sent] if which == "sent" else ev.batch.sent if which == "batch" else []
            for s in acks:
                if s.client_msg_id == cmid:
                    return s
            if which == "error" and ev.error.client_msg_id == cmid:
                return ev.error
        raise AssertionError("the stream ended")

    return await bounded(loop(), f"the answer to {cmid}", timeout)


async def eventually(get: Callable[[], Awaitable[T]], ok: Callable[[T], bool],
                     what: str, timeout: float = 10) -> T:
    """``await get()`` until ``ok`` holds for its answer (another server applies a change
    a moment after the one that made it answered)."""
    last: list[T] = []

    async def poll() -> bool:
        last[:] = [await get()]
        return ok(last[0])

    deadline = time.monotonic() + timeout
    while not await poll():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what} (last: {last[0]!r})")
        await asyncio.sleep(0.05)
    return last[0]


async def stream_holding(js: Any, text: str) -> list[int]:
    """The sequences of the stream's messages whose bytes contain ``text``."""
    info = await js.stream_info(STREAM)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            if text.encode() in (await js.get_msg(STREAM, seq)).data:
                found.append(seq)
    return found


def file_holds(db: Path, text: str) -> bool:
    wal = db.with_name(db.name + "-wal")
    return text.encode() in db.read_bytes() or (wal.exists() and text.encode() in
                                                 wal.read_bytes())


@contextlib.asynccontextmanager
async def jetstream(cluster: nats_lab.NatsCluster) -> AsyncIterator[Any]:
    """A JetStream context whose requests may take 20 s, not nats-py's 5: a fresh cluster's
    first R3 placement took longer than 5 s in full CI runs (2026-11-22, 2026-11-23)."""
    nc = await nats.connect(servers=cluster.urls, user=cluster.user, password=cluster.password)
    try:
        yield nc.jetstream(timeout=20)
    finally:
        await nc.close()


async def placed(make: Callable[[], Awaitable[T]], what: str, within: float = 60) -> T:
    """``await make()`` (a stream or bucket created on a cluster that may have just started)
    again until it answers or ``within`` s have passed: one such request went unanswered for
    20 s in a full CI run (2026-11-24). Creating what exists with the same settings answers
    with it, so a request that did land is harmless to repeat."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await make()
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError) as e:
            assert time.monotonic() < deadline, f"{what}: not placed in {within:.0f}s: {e!r}"
            await asyncio.sleep(0.25)


async def until_stream_answers(js: Any, subject: str, within: float = 20) -> None:
    """Return once the stream that holds ``subject`` answers publishes: a new R3 stream gets
    "no responders" until its leader is ready (seen under load in full test runs, even
    after stream_info named a leader). The probe expects a subject sequence that cannot be,
    so the stream refuses it and stores nothing."""
    deadline = time.monotonic() + within
    while True:
        try:
            await js.publish(subject, b"", timeout=2, headers={
                "Nats-Expected-Last-Subject-Sequence": "999999"})
        except nats.js.errors.ServiceUnavailableError:
            pass  # (10008: JetStream itself is not ready)
        except nats.js.errors.APIError:
            return  # refused by the stream: it answers
        except nats.errors.Error:
            pass
        assert time.monotonic() < deadline, f"the stream of {subject} does not answer"
        await asyncio.sleep(0.05)


# RoomSession against an in-process server (test_client_session.py, test_backup.py)

def link_as(chat: Chat, login: str, rooms: tuple[str, ...] = ("*",)) -> Link:
    token = chat.token(login, rooms)

    async def dial() -> Any:
        return await chat.connect(login, token)

    return Link(dial, name="chat-server")


class Pump:
    """Runs a session's events in the background and keeps them."""

    def __init__(self, session: RoomSession) -> None:
        self.session = session
        self.events: list[SessionEvent] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for ev in self.session.events():
            self.events.append(ev)
            self.changed.set()

    def kinds(self, kind: str) -> list[SessionEvent]:
        return [e for e in self.events if e.kind == kind]

    async def until(self, check: Any, timeout: float = 30) -> None:
        async def wait() -> None:
            while not check():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def welcomed(self) -> None:
        await self.until(lambda: self.kinds("replay_done"))

    async def close(self) -> None:
        await self.session.close()
        self.task.cancel()


def pump(pumps: list[Pump], session: RoomSession) -> Pump:
    p = Pump(session)
    pumps.append(p)
    return p
