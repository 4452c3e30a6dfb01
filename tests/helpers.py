"""Helpers shared by the test modules (import them from here, never from another test file).

* ``need(what, why)`` - a tool or facility a test cannot run without: skips loudly on a
  laptop, FAILS when ``CI`` is set (nothing is skipped in CI).
* ``fresh_channel_options`` - channel options that give a channel its own TCP connection
  (grpc's Python client otherwise shares one connection between channels to one target).
* chat protocol helpers (``hello_events``, ``send``, ``collect``, ``collect_ids``), token
  issuing (``issue_recorded``), and the real ``tsnetchat serve`` process (``start_daemon``,
  and ``lab_server``, restartable on one port).
* ``tun_node`` - a kernel-TUN tailscaled in a network namespace the test creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
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
        import json

        out = sh(tailscale, f"--socket={self.socket}", "status", "--json")
        return json.loads(out.stdout)  # type: ignore[no-any-return]


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


# --- `tsnetchat serve` on the lab's chat-server node, restartable on one port ---------------


@dataclass
class LabServer:
    """The real server process on chat-server: same state dir and port across restarts."""

    lab: Any
    state: Path
    port: int
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    proc: subprocess.Popen[str] | None = None

    @property
    def log(self) -> Path:
        return self.state.parent / f"serve-{self.port}.log"

    def start(self) -> LabServer:
        """Start and wait for READY (sd_notify), so it listens when this returns."""
        sock_path = str(self.state.parent / f"notify-{self.port}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        notify.settimeout(1)
        self.proc = subprocess.Popen(
            [CLI, "serve", "--state-dir", str(self.state), "--socket",
             self.lab.nodes["chat-server"].socket, "--port", str(self.port), *self.args],
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        """A server-side command (token issue/list/revoke) on this server's state."""
        out = subprocess.run([CLI, *args, "--state-dir", str(self.state)],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def token(self, login: str, *extra: str) -> str:
        return self.cli("token", "issue", login, *extra)


@contextlib.contextmanager
def lab_server(lab: Any, tmp: Path, *args: str, env: dict[str, str] | None = None
               ) -> Iterator[LabServer]:
    s = LabServer(lab, tmp / "state", free_port(), args, env).start()
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
