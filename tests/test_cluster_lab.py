"""The lab's second server node (chat-server-2), on the real tailnet.

Cluster mode runs one tsnetchat server behind each of chat-server and chat-server-2. Both
nodes belong to the server identity (user chat), so the policy's grants reach both; each
server asks only its own tailscaled who is calling, and a connection that came through one
node is unknown to the other's WhoIs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats_lab
import pytest
import tailnet_lab
from helpers import ALICE, BOB, two_servers, until

from tsnetchat.client import dm_room
from tsnetchat.errors import PeerNotFound
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.tailnet import LocalAPI

pytestmark = pytest.mark.tailnet
T = TypeVar("T")


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


# A team's day in cluster mode (issues 15 and 20): alice through chat-server, bob through
# chat-server-2, one real three-node NATS cluster. The servers and helpers are the ones of
# tests/test_cluster_mode.py.

async def eventually(read: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str,
                     timeout: float = 30) -> T:
    """Ask ``read()`` again until its answer is ``ok`` (no assertion on how long it took)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await read()
        if ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what} (last: {got!r})")
        await asyncio.sleep(0.1)


@pytest.mark.cluster
async def test_alice_on_server_1_and_bob_on_server_2_share_a_dm_its_history_and_search(
        lab: tailnet_lab.Lab, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob = await two.connect("bob-laptop", two.token(BOB))
        first = await alice.send_one(dm_room(BOB), "the quarterly numbers are in")
        second = await bob.send_one(dm_room(ALICE), "thanks, the numbers look fine")
        assert second == first + 1
        dm = dm_room(ALICE, BOB)
        await until(lambda: one.server.store.last_id(dm) == second, "server 1 applying")
        on_one = await alice.history(dm_room(BOB))
        on_two = await bob.history(dm_room(ALICE))
        assert [(m.id, m.sender.login, m.text) for m in on_one.messages] == [
            (m.id, m.sender.login, m.text) for m in on_two.messages] == [
            (first, ALICE, "the quarterly numbers are in"),
            (second, BOB, "thanks, the numbers look fine")]
        found_one = await alice.search("numbers", newest=True)
        found_two = await bob.search("numbers", newest=True)
        assert [(m.room, m.id) for m in found_one.messages] == [
            (m.room, m.id) for m in found_two.messages] == [(dm, second), (dm, first)]


def unread_in(res: pb.UnreadResponse, room: str) -> tuple[int, int]:
    """(unread, unread mentions) of ``room`` in an Unread answer."""
    return next(((r.unread, r.unread_mentions) for r in res.rooms if r.name == room), (0, 0))


@pytest.mark.cluster
async def test_what_alice_reads_through_server_1_is_read_on_server_2_too(
        lab: tailnet_lab.Lab, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        token = one.token(ALICE)
        alice_one = await one.connect("alice-laptop", token)
        alice_two = await two.connect("alice-laptop", token)
        bob = await two.connect("bob-laptop", two.token(BOB))
        ids = [await bob.send_one("general", f"status {i}") for i in range(3)]
        await until(lambda: one.server.store.last_id("general") == ids[-1], "server 1 applying")
        for alice in (alice_one, alice_two):
            assert unread_in(await alice.unread(), "general") == (3, 0)
        assert await alice_one.mark_read("general", ids[1]) == ids[1]
        await eventually(alice_two.unread, lambda r: unread_in(r, "general") == (1, 0),
                         "alice's unread on server 2 following server 1")
        assert unread_in(await alice_one.unread(), "general") == (1, 0)
        # A position only moves forward, whichever server is told an older one.
        await alice_two.mark_read("general", ids[0])
        await alice_two.mark_read("general", ids[2])
        await eventually(alice_one.unread, lambda r: unread_in(r, "general") == (0, 0),
                         "alice's unread on server 1 following server 2")
        assert unread_in(await alice_two.unread(), "general") == (0, 0)


@pytest.mark.cluster
async def test_a_mention_of_bob_through_server_1_counts_for_bob_on_server_2(
        lab: tailnet_lab.Lab, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob_two = await two.connect("bob-laptop", two.token(BOB))
        # Server 1 learns of bob only from his message in the stream.
        hello = await bob_two.send_one("general", "morning all")
        await until(lambda: one.server.store.last_id("general") == hello, "server 1 applying")
        said = await alice.send_one("general", "@bob can you look at the deploy?")
        await until(lambda: two.server.store.last_id("general") == said, "server 2 applying")
        [mention] = await bob_two.mentions()
        assert (mention.id, mention.sender.login) == (said, ALICE)
        assert BOB in mention.mentions
        bob_one = await one.connect("bob-laptop", one.token(BOB))
        for bob in (bob_one, bob_two):
            assert unread_in(await bob.unread(), "general") == (1, 1)
        await bob_two.mark_read("general", said)
        await eventually(bob_one.unread, lambda r: unread_in(r, "general") == (0, 0),
                         "bob's mention read on server 1 too")
        # an edit through server 1 changes whom the message mentions on server 2 too
        await alice.edit("general", said, "can someone look at the deploy?")
        await eventually(lambda: bob_two.mentions(include_read=True), lambda found: not found,
                         "the edit taking bob's mention away on server 2")
        await alice.edit("general", said, "@bob can you look at the deploy after all?")
        await eventually(lambda: bob_two.mentions(include_read=True),
                         lambda found: [m.id for m in found] == [said],
                         "the edit naming bob again on server 2")


@pytest.mark.cluster
async def test_a_topic_set_through_server_1_is_the_rooms_topic_on_server_2(
        lab: tailnet_lab.Lab, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob = await two.connect("bob-laptop", two.token(BOB))
        set_at = await alice.set_topic("general", "release on friday")
        await until(lambda: two.server.store.last_id("general") == set_at, "server 2 applying")
        rooms = {r.name: r for r in (await bob.list_rooms()).rooms}
        topic = rooms["general"].topic
        assert (topic.text, topic.set_by.login, topic.id) == (
            "release on friday", ALICE, set_at)
