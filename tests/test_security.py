"""Attacks against the two locks, over the real tailnet lab.

Each case states the attacker's move and the answer the server must give. The server is a
real tsnetchat on the lab's chat-server node; clients are real tailnet peers reaching it
through their own tailscaled (HTTP CONNECT proxy or LocalAPI dial).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import tailnet_lab
from conftest import LabChat
from helpers import free_port, hello_events

from tsnetchat import auth
from tsnetchat.config import load_config
from tsnetchat.errors import ConfigError
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.server import Server

pytestmark = [pytest.mark.tailnet, pytest.mark.security]

ALICE, BOB, MALLORY = "alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"


async def refused(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value


def forge(payload: dict[str, Any], key: bytes, alg: str = "HS256", **header: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=header or None)


def claims(sub: str = ALICE, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": sub, "rooms": ["*"], "admin": False, "jti": "forged", "iat": now, "nbf": now,
            "exp": now + 600, "iss": "tsnetchat", "aud": "tsnetchat"}
    base.update(over)
    return base


def b64(d: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


async def first_of(call: Any, kind: str, timeout: float = 10) -> Any:
    async def loop() -> Any:
        async for ev in call:
            if ev.WhichOneof("event") == kind:
                return getattr(ev, kind)
        return None

    return await asyncio.wait_for(loop(), timeout)


# --- the token lock ---------------------------------------------------------------------


async def test_tailnet_peer_without_token_is_unauthenticated(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("mallory-laptop", "")
    conn.metadata = ()
    e = await refused(conn.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no token" in e.details()


async def test_malformed_token(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", "not.a.jwt")
    e = await refused(conn.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "malformed" in e.details()


async def test_token_signed_with_another_key(lab_chat: LabChat) -> None:
    tok = forge(claims(), b"0" * 64)
    e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "signature" in e.details()


async def test_alg_none_token(lab_chat: LabChat) -> None:
    tok = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "'none'" in e.details()


async def test_algorithm_confusion_is_refused(lab_chat: LabChat) -> None:
    """A token whose header names another algorithm (HS512 with the right key, or an RS256
    header over an HMAC of the key) is refused: the algorithm is pinned, not read."""
    key = lab_chat.cfg.key_path.read_bytes().strip()
    for tok in (forge(claims(), key, "HS512"),
                f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64(claims())}.c2lnbmF0dXJl"):
        e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "must be signed with HS256" in e.details()


async def test_expired_token(lab_chat: LabChat) -> None:
    key = lab_chat.cfg.key_path.read_bytes().strip()
    now = int(time.time())
    tok = forge(claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600), key)
    e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in e.details()


async def test_not_yet_valid_token(lab_chat: LabChat) -> None:
    key = lab_chat.cfg.key_path.read_bytes().strip()
    tok = forge(claims(nbf=int(time.time()) + 3600), key)
    e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid yet" in e.details()


async def test_tampered_payload_fails_the_signature(lab_chat: LabChat) -> None:
    tok = lab_chat.token(BOB, ("general",))
    head, _, sig = tok.split(".")
    tampered = f"{head}.{b64(claims(sub=BOB, rooms=['*'], admin=True))}.{sig}"
    e = await refused((await lab_chat.connect("bob-laptop", tampered)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "signature" in e.details()


async def test_token_for_another_issuer_or_audience(lab_chat: LabChat) -> None:
    key = lab_chat.cfg.key_path.read_bytes().strip()
    for bad in ({"aud": "something-else"}, {"iss": "elsewhere"}):
        tok = forge(claims(**bad), key)
        e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "not issued for" in e.details()


async def test_oversized_token(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", "x" * 5000)
    e = await refused(conn.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "at most 4096" in e.details()


async def test_oversized_metadata_is_refused_by_the_transport(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    e = await refused(conn.stub.WhoAmI(pb.WhoAmIRequest(),
                                       metadata=(*conn.metadata, ("x-junk", "y" * 40_000))))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds" in e.details()
    # ...and the connection still serves a normal call afterwards.
    assert (await conn.whoami()).identity.login == ALICE


async def test_revoked_token_is_refused(lab_chat: LabChat) -> None:
    tok = lab_chat.token(ALICE)
    jti = jwt.decode(tok, options={"verify_signature": False})["jti"]
    assert lab_chat.server.store is not None
    await lab_chat.server.store.revoke(jti)
    await lab_chat.server.check_revocations()
    e = await refused((await lab_chat.connect("alice-laptop", tok)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details()


async def test_revocation_from_the_cli_closes_an_open_stream(lab_chat: LabChat) -> None:
    tok = lab_chat.token(ALICE)
    jti = jwt.decode(tok, options={"verify_signature": False})["jti"]
    conn = await lab_chat.connect("alice-laptop", tok)
    call = conn.stub.Join(hello_events("general"), metadata=conn.metadata)
    await first_of(call, "replay_done")
    cli = Path(sys.executable).with_name("tsnetchat")
    out = subprocess.run([str(cli), "token", "revoke", jti, "--state-dir",
                          str(lab_chat.cfg.state_dir)], capture_output=True, text=True, check=True)
    assert "revoked" in out.stdout
    started = time.monotonic()
    e = await refused(first_of(call, "message", timeout=10))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.details()
    assert time.monotonic() - started < 5


# --- the tailnet lock -------------------------------------------------------------------


async def test_alices_token_from_mallorys_node_is_refused(lab_chat: LabChat) -> None:
    stolen = lab_chat.token(ALICE)
    e = await refused((await lab_chat.connect("mallory-laptop", stolen)).whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "issued to 'alice@tailnet.test'" in e.details() and MALLORY in e.details()
    assert stolen not in e.details()  # never echo secrets


async def test_valid_token_over_plain_loopback_is_refused(lab_chat: LabChat) -> None:
    """A local process that did not come through tailscaled: WhoIs has no match."""
    conn = await lab_chat.direct(lab_chat.token(ALICE))
    e = await refused(conn.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "did not come through tailscaled" in e.details()


async def test_localapi_unavailable_fails_closed(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    assert (await conn.whoami()).identity.login == ALICE
    await lab_chat.relay.pause()
    try:
        e = await refused(conn.whoami())
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot verify your tailnet identity" in e.details()
    finally:
        await lab_chat.relay.resume()
    assert (await conn.whoami()).identity.login == ALICE


async def test_spoofed_sender_field_is_ignored(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    forged = pb.ClientEvent(send=pb.SendMessage(
        text="transfer the money", client_msg_id="f1",
        claimed_sender=pb.Identity(login=ALICE, display_name="Alice", node="alice-laptop")))
    call = conn.stub.Join(hello_events("general", then=[forged]), metadata=conn.metadata)
    sent = await first_of(call, "sent")
    page = await conn.history("general", after=sent.id - 1, limit=1)
    (msg,) = page.messages
    assert msg.sender.login == BOB and msg.sender.node.startswith("bob-laptop.")
    call.cancel()


# --- authorization: token rooms, grants, admin ------------------------------------------


async def test_room_outside_the_token(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE, ("general",)))
    call = conn.stub.Join(hello_events("random"), metadata=conn.metadata)
    e = await refused(first_of(call, "welcome"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not use room 'random'" in e.details()


async def test_room_outside_the_grant(lab_chat: LabChat) -> None:
    # bob's token allows every room; his tailnet grant only general and random.
    conn = await lab_chat.connect("bob-laptop", lab_chat.token(BOB, ("*",), admin=True))
    me = await conn.whoami()
    assert sorted(me.rooms) == ["general", "random"] and me.grant_applied
    assert not me.admin  # the grant does not make bob an admin
    e = await refused(conn.history("ops"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.server_config(require_grant=True)
async def test_grant_removed_from_policy_takes_access_away(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    assert (await conn.whoami()).identity.login == BOB
    lab = lab_chat.lab
    policy = tailnet_lab.default_policy()
    narrowed = copy.deepcopy(policy)
    narrowed["grants"] = [g for g in narrowed["grants"] if g["src"] != ["bob@"]]
    lab.write_policy(narrowed)
    try:
        code = None
        for _ in range(60):
            conn2 = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
            try:
                await conn2.whoami()
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details()
                break
            await asyncio.sleep(0.5)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "no app capability grant" in details
    finally:
        lab.write_policy(policy)


@pytest.mark.server_config(require_grant=True)
async def test_tailnet_peer_without_grant_is_denied_when_grants_are_required(
        lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("mallory-laptop", lab_chat.token(MALLORY))
    e = await refused(conn.whoami())
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_non_admin_cannot_kick_or_revoke(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    e = await refused(conn.stub.Kick(pb.KickRequest(room="general", login=ALICE),
                                     metadata=conn.metadata))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in e.details()
    e = await refused(conn.stub.RevokeToken(pb.RevokeTokenRequest(token_id="x"),
                                            metadata=conn.metadata))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_kicks_a_user_out_of_a_room(lab_chat: LabChat) -> None:
    bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    call = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
    await first_of(call, "replay_done")
    alice = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE, admin=True))
    res = await alice.stub.Kick(pb.KickRequest(room="general", login=BOB),
                                metadata=alice.metadata)
    assert res.streams_closed == 1
    e = await refused(first_of(call, "message"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "removed" in e.details()


async def test_terminal_escape_injection_is_rejected(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    evil = pb.ClientEvent(send=pb.SendMessage(text="hi\x1b[2J\x1b]0;pwned\x07",
                                              client_msg_id="e1"))
    call = conn.stub.Join(hello_events("general", then=[evil]), metadata=conn.metadata)
    err = await first_of(call, "error")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "control character" in err.message and err.client_msg_id == "e1"
    call.cancel()


async def test_localapi_dial_transport_also_passes_both_locks(lab_chat: LabChat) -> None:
    """The LocalAPI-dial path (no proxy) is a tailnet connection like any other."""
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE), mode="localapi")
    assert conn.target is not None and conn.target.mode == "localapi"
    assert (await conn.whoami()).identity.login == ALICE
    stolen = await lab_chat.connect("mallory-laptop", lab_chat.token(ALICE), mode="localapi")
    e = await refused(stolen.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED


def test_secret_key_file_with_open_permissions_refuses_to_start(tmp_path: Path,
                                                               lab: Any) -> None:
    state = tmp_path / "state"
    cfg = load_config(file=None, env={}, flags={
        "state_dir": str(state), "socket": lab.nodes["chat-server"].socket,
        "port": free_port()})
    auth.load_or_create_key(cfg.key_path)
    os.chmod(cfg.key_path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        asyncio.run(Server(cfg).start())
    cli = Path(sys.executable).with_name("tsnetchat")
    proc = subprocess.run([str(cli), "serve", "--state-dir", str(state), "--socket",
                           lab.nodes["chat-server"].socket, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "chmod 600" in proc.stderr
