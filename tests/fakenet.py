"""A stand-in for userspace tailscaled, for tests of pure chat logic only.

Like tailscaled in userspace mode, it accepts a connection on a per-user front port,
re-dials the server on loopback, and remembers the source port of that re-dial so WhoIs can
name the user. It proves nothing about Tailscale; the tailnet tests do that on the real lab.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from tsnetchat.errors import PeerNotFound
from tsnetchat.netio import splice
from tsnetchat.tailnet import WhoIs


@dataclass
class FakeTailnet:
    server_port: int = 0
    fronts: dict[str, int] = field(default_factory=dict)
    by_port: dict[int, WhoIs] = field(default_factory=dict)
    _servers: list[asyncio.base_events.Server] = field(default_factory=list)
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)

    async def whois(self, addr: str) -> WhoIs:
        port = int(addr.rsplit(":", 1)[1])
        who = self.by_port.get(port)
        if who is None:
            raise PeerNotFound("no match for IP:port")
        return who

    async def front(self, login: str, *, tags: tuple[str, ...] = (),
                    cap_map: dict[str, list[object]] | None = None, node: str = "") -> str:
        """A loopback address that reaches the server as ``login``."""
        who = WhoIs(login="tagged-devices" if tags else login,
                    display_name=login.split("@")[0].capitalize(),
                    node_name=node or f"{login.split('@')[0]}-laptop.tailnet.test", node_id="n",
                    tags=tags, addresses=("100.64.0.9",), cap_map=cap_map or {})

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.server_port)
            except OSError:
                w.close()
                return
            port = uw.get_extra_info("sockname")[1]
            self.by_port[port] = who
            self._conns.update((w, uw))
            await splice((r, w), (ur, uw))
            self.by_port.pop(port, None)
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
