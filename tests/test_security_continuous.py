"""The two locks hold for the whole life of a connection, over the real tailnet lab.

The shipped client keeps one connection (and streams on it) open all day. Each case opens
streams, then changes an input of the decision while they stay open: the token (revoked,
expired, its key rotated), the tailnet (the policy's grants, a device removed). What was
taken away must go, within about a second of tailscaled knowing; what was not must stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import threading
import time
from typing import Any

import grpc
import pytest
from helpers import (
    CLI,
    LabChat,
    apply_policy,
    bobs_phone_and_laptop,
    first_of,
    held_calls,
    hello_events,
    policy_changed,
    policy_granting,
    refused,
    send,
    token_id,
    until,
    without_grant_of,
)

from tsnetchat import auth
from tsnetchat.pb import chat_pb2 as pb

pytestmark = [pytest.mark.tailnet, pytest.mark.security]

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"


def cli(*args: str) -> str:
    out = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


# --- the token ------------------------------------------------------------------------


async def test_a_join_revoked_before_its_hello_gets_no_welcome_and_stores_nothing(
        lab_chat: LabChat) -> None:
    """The attack: open a Join, send no hello, have the token revoked, send the hello later.
    The Join is admitted (and revocable) before its hello: it ends, nothing is stored."""
    tok = lab_chat.token(ALICE)
    conn = await lab_chat.connect("alice-laptop", tok)
    call = conn.stub.Join(metadata=conn.metadata)
    await until(lambda: lab_chat.server.gate.leases() == 1, what="the Join is admitted")
    cli("token", "revoke", token_id(tok), "--state-dir", str(lab_chat.cfg.state_dir))
    # (the server's revocation poll ends it; a fixed 2.5 s assumed the poll on time)
    await until(lambda: lab_chat.server.gate.leases() == 0, what="the revoked Join ends")
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(pb.ClientEvent(hello=pb.Hello(room="general")))
        await call.write(send("sneaked in after revocation", "s1"))
    e = await refused(first_of(call, "welcome"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details()
    reader = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    assert not (await reader.history("general")).messages


@pytest.mark.server_config(whois_timeout=20.0)
async def test_a_token_revoked_while_tailscaled_is_slow_to_say_who_calls_ends_that_call(
        lab_chat: LabChat) -> None:
    """The attack: open a Subscribe on a new connection while the server's tailscaled is
    slow to answer WhoIs, and have the token revoked meanwhile. The revocation acted on the
    streams held, and this one was admitted afterwards on its check from before: it stayed
    open 26 s after the revocation, and got what was posted (an attacker's run, 2026-11-24)."""
    gate = lab_chat.server.gate
    tok = lab_chat.token(BOB)
    bob = await lab_chat.connect("bob-laptop", tok)  # (dialled; no call yet: no WhoIs)
    asked = gate.whois_calls
    lab_chat.relay.answering.clear()  # tailscaled asked, not answering
    try:
        sub = bob.subscribe("general")
        await until(lambda: gate.whois_calls > asked, what="the server asking who calls")
        cli("token", "revoke", token_id(tok), "--state-dir", str(lab_chat.cfg.state_dir))
        assert await lab_chat.server.check_revocations() == 0  # (its poll, at once)
    finally:
        lab_chat.relay.answering.set()
    e = await refused(first_of(sub, "replay_done", timeout=15))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details()


async def test_a_search_or_history_under_way_when_its_token_is_revoked_answers_nothing(
        lab_chat: LabChat, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack: a Search or History whose read is still under way (the store's readers
    busy, as behind slow searches) when the token is revoked. The revocation failed the
    call's lease, but the handler answered with what it read anyway: the messages went out
    after the revocation (an attacker's run, 2026-11-25). The call is refused instead."""
    store = lab_chat.server.service.store
    bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    await bob.send_one("general", "secret heron")
    go, reading = held_calls(store, monkeypatch, "search", "before")
    for name, ask in (("Search", lambda c: c.search("heron")),
                      ("History", lambda c: c.history("general"))):
        tok = lab_chat.token(BOB)
        conn = await lab_chat.connect("bob-laptop", tok)
        go.clear()
        reading.clear()
        call = asyncio.ensure_future(ask(conn))
        await asyncio.wait_for(reading.wait(), 15)
        lab_chat.server.service.apply_revocations([token_id(tok)])
        go.set()
        e = await refused(call)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details(), name


async def test_revoking_a_token_closes_the_subscribe_open_with_it(lab_chat: LabChat) -> None:
    bob_token = lab_chat.token(BOB)
    bob = await lab_chat.connect("bob-laptop", bob_token)
    sub = bob.subscribe("general")
    await first_of(sub, "replay_done")
    admin = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE, admin=True))
    res = await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(bob_token)),
                                       metadata=admin.metadata)
    assert res.streams_closed == 1
    e = await refused(first_of(sub, "message"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.details().startswith("token lock:") and "revoked" in e.details()


async def test_a_join_ends_when_its_token_expires_though_it_keeps_sending(
        lab_chat: LabChat) -> None:
    """The attack: open a Join with a token about to expire and keep sending. The stream is
    closed once the token is past its expiry (plus the clock leeway); nothing sent later is
    stored."""
    tok = lab_chat.token(ALICE, ttl=3)
    expires = auth.verify_token(lab_chat.cfg.key_path.read_bytes().strip(), tok).expires_at
    conn = await lab_chat.connect("alice-laptop", tok)
    stop = asyncio.Event()

    async def keep_sending() -> Any:
        yield pb.ClientEvent(hello=pb.Hello(room="general"))
        i = 0
        while not stop.is_set():
            i += 1
            yield send(f"still here {i}", f"k{i}")
            await asyncio.sleep(0.5)

    call = conn.stub.Join(keep_sending(), metadata=conn.metadata)
    assert await first_of(call, "welcome") is not None
    e = await refused(first_of(call, "never", timeout=30))
    stop.set()
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in e.details()
    assert time.time() >= expires + auth.LEEWAY
    reader = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    stored = (await reader.history("general")).messages
    assert stored and all(m.sent_unix_ms / 1000 <= expires + auth.LEEWAY + 0.5 for m in stored)


async def test_rotating_the_key_closes_streams_of_old_tokens_and_new_tokens_work(
        lab_chat: LabChat) -> None:
    old = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    sub = old.subscribe("general")
    await first_of(sub, "replay_done")
    out = cli("token", "rotate-key", "--state-dir", str(lab_chat.cfg.state_dir))
    assert "every token issued before is now refused" in out
    e = await refused(first_of(sub, "message"))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.details().startswith("token lock:") and "signature" in e.details()
    e = await refused(old.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    new = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    assert (await new.whoami()).identity.login == ALICE


# --- the tailnet ----------------------------------------------------------------------


@pytest.mark.server_config(require_grant=True)
async def test_bob_loses_his_grant_and_with_it_his_open_streams_and_every_call(
        lab_chat: LabChat) -> None:
    """The attack: keep a connection with streams open, so the identity decided at first is
    reused, and go on after the tailnet admin removed the grant. Everything is refused."""
    bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    sub = bob.subscribe("general")
    join = bob.stub.Join(hello_events("random"), metadata=bob.metadata)
    await first_of(sub, "replay_done")
    await first_of(join, "replay_done")
    async with policy_changed(lab_chat.lab, without_grant_of("bob")):
        for stream in (sub, join):
            e = await refused(first_of(stream, "message", timeout=15))
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "no app capability grant" in e.details()
        for call in (bob.whoami(), bob.history("general")):
            e = await refused(call)
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        e = await refused(first_of(bob.stub.Join(hello_events("general"),
                                                 metadata=bob.metadata), "welcome"))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.server_config(enroll="grant")
async def test_a_login_token_stops_with_its_grant_and_never_gets_back_what_the_grant_took(
        lab_chat: LabChat) -> None:
    """Without require_grant, a token from `Login` whose grant was removed had its full
    rights back (admin, every room it was issued with) for the rest of its 7 days: an
    attacker's run, 2026-11-23."""
    anon = await lab_chat.connect("alice-laptop", "no.token.yet")
    got = await anon.stub.Login(pb.LoginRequest(), timeout=10)
    assert got.admin and "ops" in got.rooms
    alice = await lab_chat.connect("alice-laptop", got.token)
    general = alice.subscribe("general")
    await first_of(general, "replay_done")
    async with policy_changed(lab_chat.lab, without_grant_of("alice")):
        e = await refused(first_of(general, "message", timeout=15))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "lasts only as long as the grant" in e.details()
        for call in (alice.whoami(), alice.history("ops"),
                     alice.stub.CreateRoom(pb.CreateRoomRequest(room="+takeover",
                                                                members=[ALICE]),
                                           metadata=alice.metadata, timeout=10)):
            e = await refused(call)
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_alice_loses_admin_and_a_room_while_her_other_subscribe_stays_open(
        lab_chat: LabChat) -> None:
    """Narrowed rights take away only what was taken: the stream in the room she lost closes,
    admin calls are refused on the same connection, the stream in a room she keeps goes on."""
    alice = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE, admin=True))
    kept, lost = alice.subscribe("random"), alice.subscribe("ops")
    await first_of(kept, "replay_done")
    await first_of(lost, "replay_done")
    assert (await alice.whoami()).admin
    narrowed = policy_granting("alice@", ["general", "random"])
    async with policy_changed(lab_chat.lab, narrowed):
        e = await refused(first_of(lost, "message", timeout=15))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "policy changed" in e.details() and "'ops'" in e.details()
        e = await refused(alice.stub.RevokeToken(pb.RevokeTokenRequest(token_id="x"),
                                                 metadata=alice.metadata))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in e.details()
        e = await refused(alice.history("ops"))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        me = await alice.whoami()
        assert not me.admin and sorted(me.rooms) == ["general", "random"]
        bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
        await bob.send_one("random", "still here")
        msg = await first_of(kept, "message")
        assert msg.text == "still here"


async def test_a_grant_narrowed_while_the_server_stalled_closes_the_join_its_chat_keeps_open(
        lab_chat: LabChat) -> None:
    """The server stalls (a stopped process, a swap storm) while the admin narrows bob's
    grant; once it runs again, a call on the same connection (a chat's ListRooms) asked
    WhoIs first and took the connection's "ask again" for itself, and the chat's Join went
    on sending into the room for 75 s (a daily user's run, 2026-11-24)."""
    import tailnet_lab

    bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    join = bob.stub.Join(hello_events("random"), metadata=bob.metadata)
    await first_of(join, "replay_done")
    narrowed = policy_granting("bob@", ["general"])
    changing = threading.Thread(
        target=lambda: asyncio.run(apply_policy(lab_chat.lab, narrowed)))
    try:
        changing.start()
        changing.join(60)  # the whole change with this event loop (the server's) stopped
        me = await bob.whoami()  # the chat's next call on that connection, at once
        assert list(me.rooms) == ["general"]
        e = await refused(first_of(join, "message", timeout=15))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'random'" in e.details()
    finally:
        await apply_policy(lab_chat.lab, tailnet_lab.default_policy())


async def test_a_device_removed_from_the_tailnet_loses_its_streams_and_its_owners_others_not(
        lab_chat: LabChat, caplog: pytest.LogCaptureFixture) -> None:
    """The tailnet admin removes bob's phone. Its stream is closed by the server at once (the
    phone itself may hear of it only when its connection times out: it is no longer on the
    tailnet); bob's laptop goes on."""
    lab, server = lab_chat.lab, lab_chat.server
    async with bobs_phone_and_laptop(lab_chat) as bob:
        assert server.hub.counts()[1] == 2
        caplog.set_level(logging.INFO, "tsnetchat.gate")
        await asyncio.to_thread(lab.remove_node, "bob-phone")
        await until(lambda: server.hub.counts()[1] == 1, timeout=15,
                    what="the server closed the phone's stream")
        assert any("bob-phone" in r.getMessage() and "tailnet lock" in r.getMessage()
                   for r in caplog.records)
        await bob.laptop.send_one("general", "the laptop still works")
        assert (await first_of(bob.on_laptop, "message")).text == "the laptop still works"
