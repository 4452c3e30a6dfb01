"""Direct messages name people by login as somebody typed it: the server spells each login
as the one person it knows by it (case-insensitively), and refuses a new conversation with a
login nobody has, instead of storing messages where nobody ever reads them. Over the real
tailnet lab (alice, bob and mallory are real logins on real tailscaled nodes), except for
the pure rule at the end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import LabChat, refused, run_cli

from tsnetchat.client import Connection
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.rooms import Mentions, spelling

ALICE, BOB, MALLORY = "alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"
ALICE_AND_BOB = f"dm:{ALICE},{BOB}"


async def connect(lab_chat: LabChat, login: str, *, admin: bool = False) -> Connection:
    node = f"{login.split('@')[0]}-laptop"
    return await lab_chat.connect(node, lab_chat.token(login, admin=admin))


async def dms_of(conn: Connection) -> list[str]:
    return sorted(r.name for r in (await conn.unread()).rooms if r.direct)


async def cli(lab_chat: LabChat, login: str, *args: str) -> Any:
    """`tsnetchat <args>` from ``login``'s laptop against the lab's server."""
    n = lab_chat.lab.nodes[f"{login.split('@')[0]}-laptop"]
    return await asyncio.to_thread(
        run_cli, *args, "--token", lab_chat.token(login), "--socket", n.socket,
        "--port", str(lab_chat.port), "--proxy", n.http_proxy)


@pytest.mark.tailnet
@pytest.mark.security
async def test_a_direct_message_to_a_login_in_other_capitals_reaches_that_persons_conversation(
        lab_chat: LabChat) -> None:
    # bob has never called this server: the tailnet alone says who he is.
    alice = await connect(lab_chat, ALICE)
    assert await alice.send_one("dm:Bob@Tailnet.Test", "caps") == 1
    bob = await connect(lab_chat, BOB)
    assert [m.text for m in (await bob.history(f"dm:{ALICE}")).messages] == ["caps"]
    assert await bob.send_one("dm:ALICE@TAILNET.TEST", "got it") == 2
    assert await dms_of(alice) == await dms_of(bob) == [ALICE_AND_BOB]
    # The outside tester's command line: it exits 0 and bob reads it.
    out = await cli(lab_chat, ALICE, "dm", "chat-server", "Bob@Tailnet.Test", "caps again")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"sent #3 to {ALICE_AND_BOB}"  # the room it went to
    page = await bob.history(f"dm:{ALICE}")
    assert [m.text for m in page.messages] == ["caps", "got it", "caps again"]
    assert await dms_of(alice) == [ALICE_AND_BOB]


@pytest.mark.tailnet
@pytest.mark.security
async def test_a_direct_message_to_a_login_nobody_has_is_refused_and_stored_nowhere(
        lab_chat: LabChat) -> None:
    alice = await connect(lab_chat, ALICE)
    for room in ("dm:bobb@tailnet.test", f"dm:{BOB},bobb@tailnet.test"):
        e = await refused(alice.send_one(room, "x"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.details() == (
            "nobody with the login 'bobb@tailnet.test' is on the tailnet or has used this "
            "server (or several people have it, in different capitals); check the spelling")
    out = await cli(lab_chat, ALICE, "dm", "chat-server", "bobb@tailnet.test", "x")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "check the spelling" in out.stderr and "Traceback" not in out.stderr
    assert await dms_of(alice) == []
    assert not lab_chat.server.store.rooms()
    # Reading it is refused the same way, as a search naming it is: "no messages" read as
    # a conversation that is empty (a daily user's day, 2026-11-25).
    e = await refused(alice.history("dm:bobb@tailnet.test"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "check the spelling" in e.details()
    out = await cli(lab_chat, ALICE, "history", "chat-server", "--room", "dm:bobb@tailnet.test")
    assert out.returncode == 2 and "nobody with the login 'bobb@tailnet.test'" in out.stderr, (
        out.stdout, out.stderr)


@pytest.mark.tailnet
@pytest.mark.security
async def test_a_conversation_with_someone_who_left_the_tailnet_can_still_be_read_and_written(
        lab_chat: LabChat) -> None:
    """dora is on the tailnet, alice writes to her, and dora's device is removed: the
    conversation stays alice's (and an admin's, with admins_read_dms), under any capitals;
    a new conversation with a login that was never anybody's is still refused."""
    lab, server = lab_chat.lab, lab_chat.server
    await asyncio.to_thread(lab.add_user, "dora")
    await asyncio.to_thread(lab.add_node, "dora-laptop", "dora")
    dora = "dora@tailnet.test"
    room = f"dm:{ALICE},{dora}"
    try:
        alice = await connect(lab_chat, ALICE)
        assert await alice.send_one("dm:Dora@Tailnet.Test", "before") == 1
    finally:
        await asyncio.to_thread(lab.drop_node, "dora-laptop")

    for _ in range(300):  # the server's tailscaled hears of it within a few seconds
        if all(p.login != dora for p in (await server.tailnet.status()).peers):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("dora's device is still in the server's tailnet status")
    assert await alice.send_one(f"dm:{dora}", "after") == 2
    assert await alice.send_one("dm:DORA@tailnet.test", "any capitals") == 3
    texts = [m.text for m in (await alice.history("dm:Dora@Tailnet.Test")).messages]
    assert texts == ["before", "after", "any capitals"]
    assert await dms_of(alice) == [room]
    e = await refused(alice.send_one("dm:dorra@tailnet.test", "x"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    # an admin reading others' conversations reads it too
    server.service.apply(server.service.limits.__class__(
        **{**server.service.limits.__dict__, "admins_read_dms": True}))
    mallory = await connect(lab_chat, MALLORY, admin=True)
    assert [m.text for m in (await mallory.history(room)).messages] == texts


# --- the rule, on its own ------------------------------------------------------------------


@pytest.mark.tailnet
@pytest.mark.security
async def test_a_search_naming_many_spellings_of_new_conversations_asks_tailscaled_once(
        lab_chat: LabChat, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new DM name asked tailscaled for the whole tailnet's status: one Search naming 100
    of them made 100 LocalAPI calls, and 30 such searches took 3.4 s of the server's core (an
    attacker's run, 2026-11-24). tailscaled's real answer, counted on its way to the service
    (the server's own watch of the IPN bus asks too, on its own)."""
    service = lab_chat.server.service
    asked: list[float] = []
    status = service.tailnet.status

    async def counted() -> Any:
        asked.append(asyncio.get_running_loop().time())
        return await status()

    monkeypatch.setattr(service, "tailnet", SimpleNamespace(status=counted))
    bob = await connect(lab_chat, BOB)
    names = [f"dm:{''.join(c.upper() if i >> k & 1 else c for k, c in enumerate('alice'))}"
             f"@tailnet.test" for i in range(32)]  # alice, Alice, aLice ... ALICE
    res = await bob.stub.Search(pb.SearchRequest(query="lunch", rooms=names),
                                metadata=bob.metadata)
    assert not res.messages
    assert len(asked) == 1
    e = await refused(bob.stub.Search(pb.SearchRequest(query="lunch", rooms=["dm:nobody@x"]),
                                      metadata=bob.metadata))  # (still checked, by that answer)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "nobody with the login" in e.details()


@pytest.mark.parametrize(("typed", "like", "meant"), [
    ("bob@x.test", {"bob@x.test"}, "bob@x.test"),
    ("Bob@X.Test", {"bob@x.test"}, "bob@x.test"),
    # GitHub logins keep their capitals: no lowercasing
    ("octocat@github", {"OctoCat@github"}, "OctoCat@github"),
    # typed exactly as one of several: that one
    ("Bob@x.test", {"bob@x.test", "Bob@x.test"}, "Bob@x.test"),
    # several, none exactly: nobody is guessed
    ("BOB@x.test", {"bob@x.test", "Bob@x.test"}, None),
    ("bobb@x.test", set(), None),
])
def test_a_login_is_spelled_as_the_one_person_who_has_it_case_insensitively(
        typed: str, like: set[str], meant: str | None) -> None:
    assert spelling(typed, like) == meant


def test_the_people_registry_finds_logins_in_other_capitals_but_not_names_or_short_logins(
        ) -> None:
    people = Mentions({"OctoCat@github": "Bob Builder", "bob@x.test": "Bob"})
    assert people.logins_like("octocat@GitHub") == {"OctoCat@github"}
    assert people.logins_like("BOB@X.TEST") == {"bob@x.test"}
    assert people.logins_like("bob") == set()  # a display name and short login, no login
    assert people.knows("bob@x.test") and not people.knows("Bob@x.test")
