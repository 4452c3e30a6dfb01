"""Shared fixtures.

* ``chat`` - a real grpc.aio tsnetchat server on a free loopback port with SQLite in a temp
  dir; identities come from FakeTailnet (a stand-in for tailscaled used only for chat logic).
* ``lab`` - the real tailnet lab (headscale + userspace tailscaled), once per session, for
  tests marked ``tailnet``. Without Go they skip loudly; with CI set they fail instead.
* ``nats_cluster`` - a real three-node NATS JetStream cluster (scripts/nats_lab.py), fresh
  for each test marked ``cluster``; the same rule for a missing nats-server.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats_lab  # noqa: E402
import tailnet_lab  # noqa: E402
from fakenet import FakeTailnet  # noqa: E402
from helpers import free_port, issue_recorded, need  # noqa: E402

from tsnetchat.client import Connection, connect  # noqa: E402
from tsnetchat.config import ServerConfig, load_config  # noqa: E402
from tsnetchat.hub import Pacing  # noqa: E402
from tsnetchat.netio import splice  # noqa: E402
from tsnetchat.server import Server  # noqa: E402


@dataclass
class Chat:
    """A running server plus helpers to act as different tailnet users."""

    server: Server
    net: FakeTailnet
    cfg: ServerConfig
    pacing: Pacing | None = None
    conns: list[Connection] = field(default_factory=list)

    def token(self, login: str, rooms: tuple[str, ...] = ("*",), *, admin: bool = False,
              ttl: float = 3600) -> str:
        return issue_recorded(self.server, login, rooms, admin=admin, ttl=ttl)

    async def connect(self, login: str, token: str | None = None, **front: Any) -> Connection:
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
        self.server = Server(cfg, whois=self.net.whois, pacing=self.pacing)
        await self.server.start()


def make_config(tmp: Path, **overrides: Any) -> ServerConfig:
    # Generous rate limits by default; the limit tests set their own.
    flags = {"state_dir": str(tmp / "state"), "listen": "127.0.0.1", "port": free_port(),
             "rate_burst": 1000, "rate_per_second": 1000.0, **overrides}
    return load_config(file=None, env={}, flags=flags)


@pytest.fixture
async def chat(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Chat]:
    marker = request.node.get_closest_marker("server_config")
    overrides = marker.kwargs if marker else {}
    cfg = make_config(tmp_path, **overrides)
    marker = request.node.get_closest_marker("pacing")
    pacing = Pacing(**marker.kwargs) if marker else None
    net = FakeTailnet(server_port=cfg.port)
    server = Server(cfg, whois=net.whois, pacing=pacing)
    await server.start()
    c = Chat(server, net, cfg, pacing)
    try:
        yield c
    finally:
        for conn in c.conns:
            await conn.close()
        await c.server.stop(grace=0.2)
        await net.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server_config(**kw): overrides for the chat fixture")
    config.addinivalue_line("markers", "pacing(**kw): the chat fixture's hub Pacing")


# --- the real lab ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab() -> Iterator[tailnet_lab.Lab]:
    try:
        tailnet_lab.ensure_binaries()
    except tailnet_lab.LabError as e:
        need("the tailnet lab", str(e))
    with tailnet_lab.running_lab() as lab_:
        yield lab_


# --- a real server on the lab's chat-server node ----------------------------------------


class LocalAPIRelay:
    """Forwards a unix socket to a node's LocalAPI; `pause()` makes the LocalAPI vanish for
    whoever uses the relay (the server), while tailnet traffic keeps flowing."""

    def __init__(self, target: str, path: str) -> None:
        self.target, self.path = target, path
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def resume(self) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_unix_connection(self.target)
            except OSError:
                w.close()
                return
            self._writers.update((w, uw))
            await splice((r, w), (ur, uw))

        self._server = await asyncio.start_unix_server(handle, self.path)

    async def pause(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if os.path.exists(self.path):
            os.unlink(self.path)


@dataclass
class LabChat:
    """An in-process server on the lab's chat-server node (real LocalAPI, real WhoIs)."""

    lab: Any
    server: Server
    cfg: ServerConfig
    relay: LocalAPIRelay
    conns: list[Connection] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.cfg.port

    def token(self, login: str, rooms: tuple[str, ...] = ("*",), *, admin: bool = False,
              ttl: float = 3600) -> str:
        return issue_recorded(self.server, login, rooms, admin=admin, ttl=ttl)

    async def connect(self, node: str, token: str, *, mode: str = "proxy") -> Connection:
        n = self.lab.nodes[node]
        conn = await connect("chat-server", token, socket=n.socket, port=self.port,
                             proxy=f"http://{n.http_proxy}" if mode == "proxy" else "")
        self.conns.append(conn)
        return conn

    async def direct(self, token: str) -> Connection:
        conn = await connect("chat-server", token, socket="", address=f"127.0.0.1:{self.port}")
        self.conns.append(conn)
        return conn


@pytest.fixture
async def lab_chat(lab: Any, tmp_path: Path, request: pytest.FixtureRequest
                   ) -> AsyncIterator[LabChat]:
    marker = request.node.get_closest_marker("server_config")
    overrides = marker.kwargs if marker else {}
    relay = LocalAPIRelay(lab.nodes["chat-server"].socket, str(tmp_path / "relay.sock"))
    await relay.resume()
    cfg = load_config(file=None, env={}, flags={
        "state_dir": str(tmp_path / "state"), "socket": relay.path, "port": free_port(),
        "cap_domain": "example.com", "startup_timeout": 20.0, **overrides})
    server = Server(cfg)
    await server.start()
    lc = LabChat(lab, server, cfg, relay)
    try:
        yield lc
    finally:
        for c in lc.conns:
            await c.close()
        await server.stop(grace=0.2)
        await relay.pause()


# --- a real NATS JetStream cluster (tests marked ``cluster``) ------------------------------


@pytest.fixture
def nats_cluster() -> Iterator[nats_lab.NatsCluster]:
    """Three fresh nats-server nodes with JetStream on loopback (under a second to start),
    stopped and removed afterwards; tests may kill, stop and restart nodes."""
    try:
        nats_lab.ensure_binary()
    except nats_lab.NatsLabError as e:
        need("nats-server", str(e))
    with nats_lab.running_cluster() as cluster:
        yield cluster
