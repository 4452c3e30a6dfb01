"""The lab's second server node (chat-server-2), on the real tailnet.

Cluster mode runs one tsnetchat server behind each of chat-server and chat-server-2. Both
nodes belong to the server identity (user chat), so the policy's grants reach both; each
server asks only its own tailscaled who is calling, and a connection that came through one
node is unknown to the other's WhoIs.
"""

from __future__ import annotations

import asyncio

import pytest
import tailnet_lab

from tsnetchat.errors import PeerNotFound
from tsnetchat.tailnet import LocalAPI

pytestmark = pytest.mark.tailnet


async def test_chat_server_2_is_a_second_node_of_the_server_identity(
        lab: tailnet_lab.Lab) -> None:
    one, two = lab.nodes["chat-server"], lab.nodes["chat-server-2"]
    assert one.login == two.login == "chat@tailnet.test"
    assert not set(one.ips) & set(two.ips)
    async with LocalAPI(lab.nodes["alice-laptop"].socket) as api:
        st = await api.status()
    seen = {p.host_name: p for p in st.peers}
    assert seen["chat-server-2"].online
    assert seen["chat-server-2"].dns_name == f"chat-server-2.{tailnet_lab.BASE_DOMAIN}."


async def test_only_the_node_a_connection_came_through_knows_who_is_calling(
        lab: tailnet_lab.Lab) -> None:
    accepted: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.put_nowait(w.get_extra_info("peername")[:2])
        await r.read(1)
        w.close()

    service = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = service.sockets[0].getsockname()[1]
    proxy_host, proxy_port = lab.nodes["alice-laptop"].http_proxy.rsplit(":", 1)
    r, w = await asyncio.open_connection(proxy_host, int(proxy_port))
    try:
        w.write(f"CONNECT chat-server-2:{port} HTTP/1.1\r\nHost: chat-server-2:{port}\r\n\r\n"
                .encode())
        assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)).startswith(
            b"HTTP/1.1 200")
        host, peer_port = await asyncio.wait_for(accepted.get(), 10)
        async with LocalAPI(lab.nodes["chat-server-2"].socket) as two:
            who = await two.whois(f"{host}:{peer_port}")
        assert who.login == "alice@tailnet.test"
        assert who.cap_map[tailnet_lab.CAP_NAME] == [
            {"rooms": ["general", "random", "ops"], "admin": True}]
        async with LocalAPI(lab.nodes["chat-server"].socket) as one:
            with pytest.raises(PeerNotFound):
                await one.whois(f"{host}:{peer_port}")
    finally:
        w.close()
        service.close()
