"""What only an admin may do, over a real in-process server: a caller without admin rights
(a token without them, or one whose tailnet grant withholds them) is refused every admin
call, PERMISSION_DENIED naming what it needs, and nothing changes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from helpers import Chat, refused, token_id

from tsnetchat.client import Connection
from tsnetchat.pb import chat_pb2 as pb

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"
CAP = "example.com/cap/tsnetchat"
NEEDS = "this needs admin rights (token admin claim and tailnet grant)"


async def not_an_admin(chat: Chat, how: str) -> Connection:
    if how == "token":
        return await chat.connect(BOB)
    return await chat.connect(BOB, chat.token(BOB, admin=True),
                              cap_map={CAP: [{"rooms": ["*"], "admin": False}]})


@pytest.mark.parametrize("how", ["token", "grant"])
async def test_a_caller_without_admin_rights_is_refused_every_admin_call_and_changes_nothing(
        chat: Chat, how: str) -> None:
    admin = await chat.connect("root@tailnet.test",
                               chat.token("root@tailnet.test", admin=True))
    alices = chat.token(ALICE)
    alice = await chat.connect(ALICE, alices)
    await alice.whoami()
    await admin.create_room("+ops", [ALICE])
    bob = await not_an_admin(chat, how)
    assert not (await bob.whoami()).admin
    calls: list[Any] = [
        bob.create_room("+mine", [BOB]), bob.set_room_members("+ops", add=[BOB]),
        bob.kick("general", ALICE),
        bob.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(alices)),
                             metadata=bob.metadata, timeout=10)]
    for call in calls:
        e = await refused(call)
        assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, NEEDS)
    assert (await alice.whoami()).identity.login == ALICE  # not revoked
    assert chat.server.store.private_rooms() == {"+ops": frozenset({ALICE})}
