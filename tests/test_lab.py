"""The tailnet lab itself, proven on real tailscaled + headscale (issue: the lab).

These are also the ground facts the product relies on: MagicDNS names in status, reaching a
loopback service through a node's proxy, WhoIs naming the real peer, "no match" for a plain
loopback connection, and app-capability grants in CapMap.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator

import pytest
import tailnet_lab

from tsnetchat.errors import PeerNotFound
from tsnetchat.tailnet import LocalAPI, WhoIs

pytestmark = pytest.mark.tailnet


class Echo:
    """A TCP echo service on the server host's loopback that keeps connections open."""

    def __init__(self) -> None:
        self.peers: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Echo:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.peers.put_nowait(w.get_extra_info("peername")[:2])
            while data := await r.read(1024):
                w.write(data)
                await w.drain()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def via_proxy(node: tailnet_lab.Node, host: str, port: int
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP stream to host:port through the node's HTTP CONNECT proxy."""
    ph, pp = node.http_proxy.rsplit(":", 1)
    r, w = await asyncio.open_connection(ph, int(pp))
    w.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    return r, w


@pytest.fixture
async def server_api(lab: tailnet_lab.Lab) -> AsyncIterator[LocalAPI]:
    api = LocalAPI(lab.nodes["chat-server"].socket)
    yield api
    await api.aclose()


async def test_alice_status_lists_chat_server_with_magicdns_name_and_ips(
        lab: tailnet_lab.Lab) -> None:
    async with LocalAPI(lab.nodes["alice-laptop"].socket) as api:
        st = await api.status()
    assert st.running and not st.tun  # userspace networking
    assert st.magic_dns_enabled and st.magic_dns_suffix == tailnet_lab.BASE_DOMAIN
    server = next(p for p in st.peers if p.host_name == "chat-server")
    assert server.dns_name == f"chat-server.{tailnet_lab.BASE_DOMAIN}."
    assert server.short_name == "chat-server"
    assert set(server.ips) == set(lab.nodes["chat-server"].ips)
    assert any(ip.startswith("100.") for ip in server.ips)
    assert any(ip.startswith("fd7a:115c:a1e0:") for ip in server.ips)
    assert server.online and server.login == "chat@tailnet.test"


async def test_echo_on_server_loopback_is_reached_by_short_name_through_alices_proxy(
        lab: tailnet_lab.Lab) -> None:
    async with Echo() as echo:
        r, w = await via_proxy(lab.nodes["alice-laptop"], "chat-server", echo.port)
        w.write(b"hello over the tailnet")
        assert await asyncio.wait_for(r.readexactly(22), 10) == b"hello over the tailnet"
        w.close()


async def _whois_of_proxied(lab: tailnet_lab.Lab, api: LocalAPI, node: str, host: str) -> WhoIs:
    async with Echo() as echo:
        r, w = await via_proxy(lab.nodes[node], host, echo.port)
        w.write(b"x")
        await r.readexactly(1)
        peer_host, peer_port = await asyncio.wait_for(echo.peers.get(), 5)
        assert peer_host == "127.0.0.1"  # userspace tailscaled re-dials on loopback
        who = await api.whois(f"{peer_host}:{peer_port}")  # while the connection is open
        w.close()
        return who


async def test_whois_on_the_accepted_connection_names_alice_and_bob(
        lab: tailnet_lab.Lab, server_api: LocalAPI) -> None:
    alice = await _whois_of_proxied(lab, server_api, "alice-laptop", "chat-server")
    assert alice.login == "alice@tailnet.test" and alice.display_name == "Alice"
    assert alice.node_name == f"alice-laptop.{tailnet_lab.BASE_DOMAIN}"
    assert set(alice.addresses) == set(lab.nodes["alice-laptop"].ips)
    bob = await _whois_of_proxied(lab, server_api, "bob-laptop",
                                  f"chat-server.{tailnet_lab.BASE_DOMAIN}")
    assert bob.login == "bob@tailnet.test"
    # IPv6 tailnet address: delivered to 127.0.0.1 as well, and still attributed.
    v6 = await _whois_of_proxied(lab, server_api, "bob-laptop",
                                 f"[{lab.nodes['chat-server'].ipv6}]")
    assert v6.login == "bob@tailnet.test"


async def test_whois_on_plain_loopback_connection_is_no_match(
        lab: tailnet_lab.Lab, server_api: LocalAPI) -> None:
    async with Echo() as echo:
        _, w = await asyncio.open_connection("127.0.0.1", echo.port)
        host, port = await asyncio.wait_for(echo.peers.get(), 5)
        with pytest.raises(PeerNotFound):
            await server_api.whois(f"{host}:{port}")
        w.close()


async def test_grant_shows_in_capmap_for_the_right_user_only(
        lab: tailnet_lab.Lab, server_api: LocalAPI) -> None:
    cap = tailnet_lab.CAP_NAME
    alice = await _whois_of_proxied(lab, server_api, "alice-laptop", "chat-server")
    bob = await _whois_of_proxied(lab, server_api, "bob-laptop", "chat-server")
    mallory = await _whois_of_proxied(lab, server_api, "mallory-laptop", "chat-server")
    assert alice.cap_map[cap] == [{"rooms": ["general", "random", "ops"], "admin": True}]
    assert bob.cap_map[cap] == [{"rooms": ["general", "random"], "admin": False}]
    assert cap not in mallory.cap_map


async def test_policy_change_takes_effect_in_whois(
        lab: tailnet_lab.Lab, server_api: LocalAPI) -> None:
    policy = tailnet_lab.default_policy()
    narrowed = copy.deepcopy(policy)
    narrowed["grants"] = [g for g in narrowed["grants"] if g["src"] != ["bob@"]]
    lab.write_policy(narrowed)
    try:
        for _ in range(60):
            bob = await _whois_of_proxied(lab, server_api, "bob-laptop", "chat-server")
            if tailnet_lab.CAP_NAME not in bob.cap_map:
                break
            await asyncio.sleep(0.5)
        assert tailnet_lab.CAP_NAME not in bob.cap_map
    finally:
        lab.write_policy(policy)
        await lab_grant_restored(lab, server_api)


async def lab_grant_restored(lab: tailnet_lab.Lab, api: LocalAPI) -> None:
    for _ in range(60):
        bob = await _whois_of_proxied(lab, api, "bob-laptop", "chat-server")
        if tailnet_lab.CAP_NAME in bob.cap_map:
            return
        await asyncio.sleep(0.5)
    raise AssertionError("grant not restored")


def test_lab_came_up_fast_enough_with_cached_binaries(lab: tailnet_lab.Lab) -> None:
    # Recorded for the note; generous bound so a loaded CI machine does not flap.
    print(f"lab startup: {lab.startup_seconds:.1f}s")
    assert lab.startup_seconds < 60
