"""A stand-in for userspace tailscaled, for tests of pure chat logic only.

It implements ``tsnetchat.tailnet.Tailnet`` (status, whois, watch), so the server starts the
same way as on a real node. Like tailscaled in userspace mode, it accepts a connection on a
per-user front port, re-dials the server on loopback, and remembers the source port of that
re-dial so WhoIs can name the user. It proves nothing about Tailscale; the tailnet tests do
that on the real lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tsnetchat.errors import LocalAPIUnavailable, PeerNotFound, TailnetError
from tsnetchat.netio import splice
from tsnetchat.tailnet import Change, PeerInfo, Status, WhoIs

SELF = PeerInfo(host_name="chat-server", dns_name="chat-server.tailnet.test.",
                ips=("100.64.0.1", "fd7a:115c:a1e0::1"), online=True, last_seen="",
                login="chat@tailnet.test", node_id="server")


class HeldBack:
    """A stream reader whose bytes are handed on only while ``flowing`` is set."""

    def __init__(self, reader: asyncio.StreamReader, flowing: asyncio.Event) -> None:
        self._reader, self._flowing = reader, flowing

    async def read(self, n: int) -> bytes:
        data = await self._reader.read(n)
        await self._flowing.wait()
        return data


@dataclass
class FakeTailnet:
    server_port: int = 0
    by_port: dict[int, WhoIs] = field(default_factory=dict)
    whois_addrs: list[str] = field(default_factory=list)  # every WhoIs asked, in order
    devices: list[WhoIs] = field(default_factory=list)  # each front's, for status()
    _servers: list[asyncio.base_events.Server] = field(default_factory=list)
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)
    answering: bool = True  # False: WhoIs fails as if tailscaled were gone
    # Cleared: WhoIs waits (a stalled tailscaled), asked but not yet answered, until it is set.
    whois_open: asyncio.Event = field(default_factory=asyncio.Event)
    # Cleared: the fronts' connections carry nothing either way (a server stopped with
    # SIGSTOP: its connections stay open, nothing answers), until it is set.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    _changes: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)

    async def status(self) -> Status:
        """Running, with a peer for every device a front was made for (as tailscaled lists
        every node of the tailnet, whether or not it ever talked to us)."""
        peers = tuple(PeerInfo(host_name=w.node_name.split(".")[0], dns_name=w.node_name + ".",
                               ips=w.addresses, online=True, last_seen="", login=w.login,
                               tags=w.tags, node_id=w.node_id)
                      for w in {w.node_id: w for w in self.devices}.values())
        return Status(backend_state="Running", tun=False, self_node=SELF, peers=peers,
                      magic_dns_suffix="tailnet.test", magic_dns_enabled=True)

    async def watch(self) -> AsyncIterator[Change]:
        yield Change(everything=True)
        while True:
            change = await self._changes.get()
            if change is None:
                raise TailnetError("the IPN bus went away")
            yield change

    def announce(self, change: Change) -> None:
        """As if tailscaled announced ``change`` on its IPN bus."""
        self._changes.put_nowait(change)

    def announce_everything(self) -> None:
        self.announce(Change(everything=True))

    def lose_bus(self) -> None:
        """As if the IPN bus connection broke (the server reconnects)."""
        self._changes.put_nowait(None)

    def update(self, login: str, **changes: Any) -> None:
        """Change what WhoIs says about ``login``'s open connections, announcing nothing
        (as tailscaled does for a packet-filter-only update)."""
        for port, who in list(self.by_port.items()):
            if who.login == login:
                self.by_port[port] = dataclasses.replace(who, **changes)

    def __post_init__(self) -> None:
        self.whois_open.set()
        self.flowing.set()

    async def whois(self, addr: str) -> WhoIs:
        if not self.answering:
            raise LocalAPIUnavailable("tailscaled's LocalAPI is not answering (stand-in)")
        self.whois_addrs.append(addr)
        await self.whois_open.wait()
        port = int(addr.rsplit(":", 1)[1])
        who = self.by_port.get(port)
        if who is None:
            raise PeerNotFound("no match for IP:port")
        return who

    async def front(self, login: str, *, tags: tuple[str, ...] = (),
                    cap_map: dict[str, list[object]] | None = None, node: str = "",
                    port: int = 0) -> str:
        """A loopback address that reaches the server (or its ``port``) as ``login``."""
        who = WhoIs(login="tagged-devices" if tags else login,
                    display_name=login.split("@")[0].capitalize(),
                    node_name=node or f"{login.split('@')[0]}-laptop.tailnet.test",
                    node_id=node or f"{login}-laptop",
                    tags=tags, addresses=("100.64.0.9",), cap_map=cap_map or {})
        self.devices.append(who)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", port or self.server_port)
            except OSError:
                w.close()
                return
            source = uw.get_extra_info("sockname")[1]
            self.by_port[source] = who
            self._conns.update((w, uw))
            await splice((HeldBack(r, self.flowing), w),  # type: ignore[arg-type]
                         (HeldBack(ur, self.flowing), uw))
            self.by_port.pop(source, None)
            self._conns.difference_update((w, uw))

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        self._servers.append(srv)
        return f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    def drop_all(self) -> None:
        """Cut every forwarded connection (a network blip)."""
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def close(self) -> None:
        self.drop_all()
        for s in self._servers:
            s.close()
