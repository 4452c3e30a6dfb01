"""A server whose tailnet addresses change while calls are made (``Server._maybe_rebind``):
a move that fails is tried again, and the server goes on serving where it was meanwhile.
The new addresses are other loopback ones, over a real in-process server; the whole move over
a real TUN node is tests/test_tun.py's."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from fakenet import SELF
from helpers import chat_server

from tsnetchat.errors import ConfigError
from tsnetchat.tailnet import Status

NEW = "127.0.0.2"
ELSEWHERE = "192.0.2.1"  # TEST-NET-1: never an address of this machine


async def test_a_move_that_cannot_listen_on_one_new_address_is_tried_again_and_listens(
        tmp_path: Path) -> None:
    """The gRPC server built for the new addresses kept the ports it had bound before one
    failed, for good (gRPC lets them go only once a server has run): every later try to
    move there was refused, 'the port is in use', and the server was never served on its
    new address until a restart (a review, 2026-11-25)."""
    async with chat_server(tmp_path, shutdown_grace=0.1) as chat:
        server = chat.server
        before = (list(server.addresses), list(server.ports))
        base = await chat.net.status()

        def moved_to(*ips: str) -> Status:
            return dataclasses.replace(base, backend_state="Running", tun=True,
                                       self_node=dataclasses.replace(SELF, ips=ips))

        with pytest.raises(ConfigError, match=f"{ELSEWHERE} is not an address of this"):
            await server._maybe_rebind(moved_to(NEW, ELSEWHERE))
        assert (server.addresses, server.ports) == before  # (still served where it was)
        assert (await (await chat.connect("alice@tailnet.test")).whoami()).identity.login

        await server._maybe_rebind(moved_to(NEW))  # (tailscaled's next word: tried again)
        assert server.addresses == [NEW]
        _, w = await asyncio.wait_for(asyncio.open_connection(NEW, server.ports[0]), 10)
        w.close()
