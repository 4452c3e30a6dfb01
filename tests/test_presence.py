"""Presence that tells the truth (issue 15), over the real tailnet lab: a member whose
connection or tailnet node disappears without saying goodbye leaves, with a "left" event,
and is gone from the room's member list (what /who shows).

Two mechanisms, each proven alone: gRPC keepalive (an HTTP/2 PING nobody answers), and the
tailnet's own word (the control server marks the node offline; gate.tailnet_changed).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from helpers import LabChat, first_of, hello_events

from tsnetchat import server as server_module
from tsnetchat.hub import CloseKind
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.service import LEFT_BECAUSE

pytestmark = [pytest.mark.tailnet]

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"
_names = itertools.count(1)


async def left(watch: Any, login: str, timeout: float = 60) -> pb.Presence:
    """The next "left" presence event of ``login`` on ``watch``."""
    async def loop() -> pb.Presence:
        async for ev in watch:
            if (ev.WhichOneof("event") == "presence" and ev.presence.who.login == login
                    and ev.presence.kind == pb.PRESENCE_KIND_LEFT):
                return ev.presence
        raise AssertionError("alice's stream ended before bob left")

    return await asyncio.wait_for(loop(), timeout)


async def joined(watch: Any, login: str, timeout: float = 30) -> None:
    async def loop() -> None:
        async for ev in watch:
            if (ev.WhichOneof("event") == "presence" and ev.presence.who.login == login
                    and ev.presence.kind == pb.PRESENCE_KIND_JOINED):
                return
        raise AssertionError("alice's stream ended before bob joined")

    await asyncio.wait_for(loop(), timeout)


async def who(lab_chat: LabChat, token: str, room: str) -> list[str]:
    conn = await lab_chat.connect("alice-laptop", token)
    rooms = (await conn.list_rooms()).rooms
    return [m.login for r in rooms if r.name == room for m in r.members]


@pytest.fixture
def bob_phone(lab: Any) -> Iterator[str]:
    """A device of bob's of its own (killed by the test, removed afterwards)."""
    name = f"bob-phone-{os.getpid()}-{next(_names)}"
    lab.add_node(name, "bob")
    try:
        yield name
    finally:
        lab.drop_node(name)


@pytest.fixture
def slow_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server pings silent connections only every ten minutes (so only the tailnet's
    word can end them within the test); request it before ``lab_chat``."""
    monkeypatch.setattr(server_module, "GRPC_OPTIONS", [
        (k, 600_000 if k in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms") else v)
        for k, v in server_module.GRPC_OPTIONS])


@asynccontextmanager
async def alice_watches(lab_chat: LabChat, alice_token: str) -> AsyncIterator[Any]:
    alice = await lab_chat.connect("alice-laptop", alice_token)
    watch = alice.stub.Join(hello_events("general"), metadata=alice.metadata)
    await first_of(watch, "replay_done")
    try:
        yield watch
    finally:
        watch.cancel()


async def test_a_member_whose_tailscaled_is_killed_leaves_with_an_event_and_is_gone_from_who(
        lab: Any, lab_chat: LabChat, bob_phone: str) -> None:
    alice_token = lab_chat.token(ALICE)
    async with alice_watches(lab_chat, alice_token) as watch:
        bob = await lab_chat.connect(bob_phone, lab_chat.token(BOB))
        call = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
        await first_of(call, "replay_done")
        await joined(watch, BOB)
        assert BOB in await who(lab_chat, alice_token, "general")

        lab.kill_tailscaled(lab.nodes[bob_phone])
        presence = await left(watch, BOB)
        assert BOB not in [m.login for m in presence.members]
        assert BOB not in await who(lab_chat, alice_token, "general")
        call.cancel()


async def test_a_device_the_tailnet_says_went_offline_leaves_without_waiting_for_keepalive(
        slow_keepalive: None, lab: Any, lab_chat: LabChat, bob_phone: str) -> None:
    alice_token = lab_chat.token(ALICE)
    async with alice_watches(lab_chat, alice_token) as watch:
        bob = await lab_chat.connect(bob_phone, lab_chat.token(BOB))
        call = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
        await first_of(call, "replay_done")
        await joined(watch, BOB)

        lab.kill_tailscaled(lab.nodes[bob_phone])
        presence = await left(watch, BOB)
        assert presence.reason == LEFT_BECAUSE[CloseKind.UNVERIFIED]
        assert BOB not in await who(lab_chat, alice_token, "general")
        call.cancel()


async def test_a_member_whose_client_stops_answering_leaves_when_keepalive_goes_unanswered(
        lab: Any, lab_chat: LabChat) -> None:
    """bob's client is frozen (SIGSTOP): its TCP connection and its node stay up, but
    nothing answers the server's HTTP/2 PING."""
    alice_token = lab_chat.token(ALICE)
    n = lab.nodes["bob-laptop"]
    async with alice_watches(lab_chat, alice_token) as watch:
        bob = await asyncio.create_subprocess_exec(
            sys.executable, "-c", MEMBER, lab_chat.token(BOB), n.socket, str(lab_chat.port),
            f"http://{n.http_proxy}", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            assert bob.stdout is not None
            line = await asyncio.wait_for(bob.stdout.readline(), 60)
            assert line.strip() == b"in", (await bob.communicate())[1].decode()[-2000:]
            await joined(watch, BOB)
            bob.send_signal(signal.SIGSTOP)
            presence = await left(watch, BOB)
            assert presence.reason != LEFT_BECAUSE[CloseKind.UNVERIFIED]
            assert BOB not in await who(lab_chat, alice_token, "general")
        finally:
            if bob.returncode is None:
                bob.kill()
            await bob.communicate()


# A member of "general" in a process of its own: prints "in" once there, then stays.
MEMBER = """
import asyncio, sys
from tsnetchat.client import connect
from tsnetchat.pb import chat_pb2 as pb

async def main():
    token, socket, port, proxy = sys.argv[1:]
    conn = await connect("chat-server", token, socket=socket, port=int(port), proxy=proxy)
    async def events():
        yield pb.ClientEvent(hello=pb.Hello(room="general"))
        await asyncio.Event().wait()
    # wait_for_ready: a first dial through the node's proxy can fail once ("HTTP proxy
    # handshake ... Endpoint closing", seen in a clean-clone CI run); a client retries it.
    async for ev in conn.stub.Join(events(), metadata=conn.metadata, wait_for_ready=True):
        if ev.WhichOneof("event") == "replay_done":
            print("in", flush=True)

asyncio.run(main())
"""
