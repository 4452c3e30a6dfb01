"""A reader that loses the right to read a room gets nothing more, even while its stream is
still replaying history (an in-process server; the locks themselves are proven over the lab
in test_security_continuous.py).

The attack: Subscribe from the start of a long history and read slowly, so that the server's
replay waits on flow control for as long as the room keeps being written. The replay used to
run on to the end of the history whatever happened meanwhile: a reader whose token was
revoked, or who was removed from a private room, got every message stored after that
(1,316 of them in 27 s in the attack's own run, 2026-11-23).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from helpers import Chat, ack_or_error, bounded, join, refused, send, token_id

from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.pb import chat_pb2_grpc

pytestmark = [pytest.mark.security]

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"
BACKLOG = 1000  # of 3,500 bytes: far more than the flow-control window lets through


@pytest.mark.server_config(rate_burst=BACKLOG + 100, rate_per_second=1000.0)
@pytest.mark.parametrize("taken_away", ["token revoked", "removed from the room"])
async def test_a_reader_still_in_its_replay_gets_nothing_stored_after_losing_the_room(
        chat: Chat, taken_away: str) -> None:
    alice = await chat.connect(ALICE, chat.token(ALICE, admin=True))
    bob_at = await chat.net.front(BOB)  # bob's device, on the tailnet: he can be a member
    room = "general" if taken_away == "token revoked" else "+ops"
    if room == "+ops":
        await alice.create_room(room, [ALICE, BOB])
    text = "x" * 3_500
    writer = await join(alice, room, then=[send(f"before {i} {text}", f"b{i}")
                                           for i in range(BACKLOG)])
    await ack_or_error(writer.call, f"b{BACKLOG - 1}", timeout=60)
    bob_token = chat.token(BOB)
    # A channel of its own, with a fixed flow-control window (no BDP probing, which would
    # grow it): a reader that does not read soon holds the server's writes.
    channel = grpc.aio.insecure_channel(bob_at, options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)])
    try:
        stub = chat_pb2_grpc.ChatStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(room=room, after_id=0),
                              metadata=(("authorization", f"Bearer {bob_token}"),))
        events = call.__aiter__()
        assert (await events.__anext__()).WhichOneof("event") == "batch"
        await asyncio.sleep(1)  # bob reads no more: the replay stops on flow control
        (reader,) = [s for s in chat.server.hub._rooms[room].subs if s.login == BOB]
        assert reader.replayed_to < BACKLOG, "the replay finished: the attack was not set up"
        if taken_away == "token revoked":
            res = await alice.stub.RevokeToken(
                pb.RevokeTokenRequest(token_id=token_id(bob_token)), metadata=alice.metadata)
            assert res.streams_closed == 1
        else:
            await alice.set_room_members(room, remove=[BOB])
        for i in range(5):
            await writer.write(send(f"after {i}", f"a{i}"))
        await ack_or_error(writer.call, "a4")
        got: list[str] = []

        async def read_slowly() -> None:
            async for ev in events:
                got.extend(m.text for m in ev.batch.messages)
                await asyncio.sleep(0.01)

        e = await refused(bounded(read_slowly(), "bob's stream ending", 30))
        expected = ((grpc.StatusCode.UNAUTHENTICATED, "revoked")
                    if taken_away == "token revoked" else
                    (grpc.StatusCode.PERMISSION_DENIED, "+ops"))
        assert (e.code(), expected[1] in e.details()) == (expected[0], True), e.details()
        assert not [t for t in got if t.startswith("after")]
        assert len(got) < BACKLOG  # and the rest of the replay was cut off, too
    finally:
        await channel.close()
