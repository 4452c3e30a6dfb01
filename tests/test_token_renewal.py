"""A stored login token's renewal refused (tokens.Renewal), against a real in-process
server whose identities come from FakeTailnet: a token revoked ends at once, and is believed
ended for ``tokens.DEAD_FOR``; a token whose grant went away is refused renewal but works
until it expires."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import Chat

from tsnetchat.client import Connection
from tsnetchat.discovery import ServerNode
from tsnetchat.errors import Unauthenticated
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.tokens import Entry, Renewal, TokenStore

CAP = "example.com/cap/tsnetchat"
ALICE = "alice@tailnet.test"
GRANT = {CAP: [{"rooms": ["general"], "admin": False}]}
SERVER = ServerNode(short_name="chat-server", dns_name="chat-server.tailnet.test",
                    ips=("100.64.0.1",), node_id="server")


async def logged_in(chat: Chat, tmp_path: Path) -> tuple[TokenStore, Entry]:
    """alice's token from Login, kept in a token store of her own, as `tsnetchat login`
    keeps it."""
    door = await chat.connect(ALICE, token="", cap_map=GRANT)
    res = await door.stub.Login(pb.LoginRequest(), timeout=10)
    store = TokenStore(tmp_path / "tokens.json")
    entry = Entry(node_id="server", name="chat-server.tailnet.test", ips=["100.64.0.1"],
                  token=res.token, token_id=res.token_id, source="login",
                  received=time.time(), lifetime=float(res.expires_unix - res.issued_unix))
    store.put(entry)
    return store, entry


async def renewal_over(chat: Chat, store: TokenStore, **front: object) -> tuple[Renewal,
                                                                               Connection]:
    r = Renewal.for_server(SERVER, "chat-server", store)
    return r, await chat.connect(ALICE, token=r.token, **front)  # type: ignore[arg-type]


@pytest.mark.server_config(enroll="grant")
async def test_a_renewal_refused_for_a_revoked_token_ends_it_at_once_and_for_a_while(
        chat: Chat, tmp_path: Path) -> None:
    store, entry = await logged_in(chat, tmp_path)
    admin = await chat.connect("root@tailnet.test", chat.token("root@tailnet.test", admin=True))
    await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=entry.token_id),
                                 metadata=admin.metadata, timeout=10)
    r, conn = await renewal_over(chat, store, cap_map=GRANT)
    with pytest.raises(Unauthenticated, match="chat-server refused to renew your token: "):
        await r.renew(conn)
    (kept,), _ = store.read()
    assert kept.dead and "revoked" in kept.refused
    with pytest.raises(Unauthenticated, match="refused to renew"):  # (not asked again)
        Renewal.for_server(SERVER, "chat-server", store)


@pytest.mark.server_config(enroll="grant")
async def test_a_renewal_refused_for_a_grant_gone_leaves_the_token_to_work_until_it_expires(
        chat: Chat, tmp_path: Path) -> None:
    store, entry = await logged_in(chat, tmp_path)
    r, conn = await renewal_over(chat, store)  # (no grant now)
    await r.renew(conn)  # said in the log; nothing raised
    (kept,), _ = store.read()
    assert not kept.dead and "no access to tsnetchat" in kept.refused
    assert not kept.renewable()
    again = Renewal.for_server(SERVER, "chat-server", store)
    assert again.token == entry.token
