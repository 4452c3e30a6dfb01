"""Attacks against the two locks, over the real tailnet lab.

Each case states the attacker's move and the answer the server must give. The server is a
real tsnetchat on the lab's chat-server node; clients are real tailnet peers reaching it
through their own tailscaled (HTTP CONNECT proxy or LocalAPI dial).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from helpers import (
    CLI,
    LabChat,
    collect,
    first_of,
    free_port,
    fresh_channel_options,
    hello_events,
    lab_server,
    policy_changed,
    refused,
    start_daemon,
    without_grant_of,
)

from tsnetchat import auth, render
from tsnetchat.config import load_config
from tsnetchat.errors import ConfigError
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.server import Server
from tsnetchat.tailnet import LocalAPI

pytestmark = [pytest.mark.tailnet, pytest.mark.security]

ALICE, BOB, MALLORY = "alice@tailnet.test", "bob@tailnet.test", "mallory@tailnet.test"


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
async def test_a_new_connection_after_the_grant_is_removed_is_refused(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
    assert (await conn.whoami()).identity.login == BOB
    narrowed = without_grant_of("bob")
    async with policy_changed(lab_chat.lab, narrowed):  # returns once chat-server has it
        fresh = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
        e = await refused(fresh.whoami())
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no app capability grant" in e.details()


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
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"kicked out of 'general' by {ALICE}" in e.details()


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

    async def start() -> None:
        async with LocalAPI(cfg.effective_socket()) as api:
            await Server(cfg, tailnet=api).start()

    with pytest.raises(ConfigError, match="readable by others"):
        asyncio.run(start())
    cli = Path(sys.executable).with_name("tsnetchat")
    proc = subprocess.run([str(cli), "serve", "--state-dir", str(state), "--socket",
                           lab.nodes["chat-server"].socket, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "chmod 600" in proc.stderr


# --- every refusal is cheap and quiet -----------------------------------------------------


async def test_crafted_token_headers_from_a_peer_without_the_key_are_refused_in_words(
        lab_chat: LabChat, caplog: pytest.LogCaptureFixture) -> None:
    """The attack: unsigned tokens whose headers PyJWT chokes on (``crit``, an integer
    ``kid``) used to end in UNKNOWN with Python's exception text and a 2 KB traceback in the
    journal per call. Now: the token lock refuses them, in words, and nothing is logged
    with a traceback."""
    caplog.set_level(logging.DEBUG)
    conn = await lab_chat.connect("mallory-laptop", "")
    nested = base64.urlsafe_b64encode(b"[" * 2500).rstrip(b"=").decode()
    for tok, why in [*((f"{b64(header)}.{b64(claims())}.c2lnbmF0dXJl", "header has fields")
                       for header in ({"alg": "HS256", "crit": ["exp"]}, {"alg": "HS256", "kid": 5},
                                      {"alg": "HS256", "kid": {"url": "x"}},
                                      {"alg": "HS256", "b64": False})),
                     (f"{nested}.{b64(claims())}.c2ln", "malformed")]:
        e = await refused(conn.stub.WhoAmI(pb.WhoAmIRequest(),
                                           metadata=(("authorization", f"Bearer {tok}"),)))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        assert e.details().startswith("token lock:") and why in e.details()
    assert not [r for r in caplog.records if r.exc_info] and "Traceback" not in caplog.text


async def test_tokens_signed_with_the_real_key_but_off_the_contract_are_refused(
        lab_chat: LabChat) -> None:
    """Signed with the server's own key (a bug in another issuer, or an insider), but with
    headers or claims tsnetchat never issues: refused, on the strict side."""
    key = lab_chat.cfg.key_path.read_bytes().strip()
    no_rooms = claims()
    del no_rooms["rooms"]
    cases = [(forge(claims(), key, kid="key-1"), "header has fields"),
             (forge(claims(), key, jku="http://evil.example/keys"), "header has fields"),
             (forge(no_rooms, key), "lacks the 'rooms' claim"),
             (forge(claims(exp=str(int(time.time()) + 600)), key), "'exp' claim is not a time"),
             (forge(claims(exp=2**63 + 5), key), "'exp' claim is not a time")]
    for tok, why in cases:
        conn = await lab_chat.connect("alice-laptop", tok)
        e = await refused(conn.whoami())
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.details(), e.details()


async def test_a_flood_of_junk_tokens_is_refused_without_whois_and_soon_unread(
        lab_chat: LabChat, caplog: pytest.LogCaptureFixture) -> None:
    """The attack: thousands of refused calls per second from one peer, each a log line and
    (for junk JWTs) a WhoIs. Now the cheap checks come first (no WhoIs for a bad token),
    the connection's refusal budget runs out (the rest are refused unread), and the log
    gets a few lines, not one per call."""
    from tsnetchat.gate import CONN_REFUSALS

    caplog.set_level(logging.INFO, "tsnetchat")
    gate = lab_chat.server.gate
    gate.hold = 0.0  # (300 calls one after the other: the hold has its own test below)
    whois_before = gate.whois_calls
    conn = await lab_chat.connect("mallory-laptop", "")
    codes = []
    started = time.monotonic()
    for i in range(300):
        junk = forge(claims(jti=f"junk{i}"), b"not the key" * 4)
        try:
            await conn.stub.WhoAmI(pb.WhoAmIRequest(),
                                   metadata=(("authorization", f"Bearer {junk}"),))
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
    took = time.monotonic() - started
    assert gate.whois_calls == whois_before
    assert set(codes[:5]) == {grpc.StatusCode.UNAUTHENTICATED}
    # Read past the budget: the burst, then what it refilled while the calls went on.
    burst, per_second = CONN_REFUSALS
    read = burst + math.ceil(took * per_second) + 1
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= len(codes) - read, took
    lines = [r for r in caplog.records if r.name == "tsnetchat.gate"]
    assert len(lines) <= max(25, read + 5), (len(lines), took)  # (a line for each one read)


async def test_a_device_flooding_junk_tokens_waits_for_its_refusals_while_alice_chats(
        lab_chat: LabChat) -> None:
    """The attack: one device floods the server with calls it refuses at once, on many
    connections with many calls in flight each; gRPC serves calls in the order they arrive,
    so everyone else's waited behind them (p99 0.7-1.0 s over the lab, 2026-11-25). Now
    once a connection's refusal budget is spent, each of its calls is answered only after
    ``Gate.hold``: mallory's calls wait on her own connections, her connections stay open,
    and alice, on her own device, chats meanwhile."""
    gate = lab_chat.server.gate
    conns = [await lab_chat.connect("mallory-laptop", "junk") for _ in range(4)]
    answers: list[tuple[grpc.StatusCode, float]] = []
    stop = asyncio.Event()

    async def flood(conn: Any) -> None:
        while not stop.is_set():
            started = time.monotonic()
            e = await refused(conn.whoami(timeout=gate.hold + 10))
            answers.append((e.code(), time.monotonic() - started))

    began = time.monotonic()
    flooding = [asyncio.create_task(flood(c)) for c in conns for _ in range(8)]
    call = None
    try:
        alice = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
        call = alice.stub.Join(hello_events("general"), metadata=alice.metadata)
        heard = asyncio.create_task(collect(call, 3, timeout=60))
        sent = [await alice.send_one("general", f"during the flood {i}") for i in range(3)]
        assert [m.id for m in await heard] == sent
        assert (await alice.whoami()).identity.login == ALICE
        await asyncio.sleep(max(0.0, began + gate.hold + 1 - time.monotonic()))
    finally:
        stop.set()
        await asyncio.gather(*flooding, return_exceptions=True)
        if call is not None:
            call.cancel()
    codes = {c for c, _ in answers}
    assert codes == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # (and no UNAVAILABLE: her connections were not closed)
    held = [took for c, took in answers if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert held and min(held) >= gate.hold * 0.99, sorted(held)[:5]


async def test_a_stolen_token_tried_over_many_connections_runs_out_the_devices_budget(
        lab_chat: LabChat) -> None:
    """A new connection per try resets nothing: once mallory's device has collected its
    refusals, its new connections are refused unread after one WhoIs each."""
    from tsnetchat.gate import NODE_REFUSALS

    lab_chat.server.gate.hold = 0.0  # (40 tries one after the other; the hold is tested below)
    stolen = lab_chat.token(ALICE)
    codes = []
    started = time.monotonic()
    for _ in range(40):
        conn = await lab_chat.connect("mallory-laptop", stolen)
        codes.append((await refused(conn.whoami())).code())
        await conn.close()
    took = time.monotonic() - started
    assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    # Read past the budget: the burst, then what it refilled while the tries went on. (The
    # last try's code alone depended on the timing: in a CI run on a slow machine,
    # 2026-11-23, it came just after a refill and was read.)
    burst, per_second = NODE_REFUSALS
    read = codes.count(grpc.StatusCode.UNAUTHENTICATED)
    assert read <= burst + math.ceil(took * per_second) + 1, (read, took)
    # ...while alice, on her own device, is not affected.
    mine = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    assert (await mine.whoami()).identity.login == ALICE


@pytest.mark.server_config(call_burst=2, call_rate=0.01)
async def test_a_person_calling_past_their_rate_is_soon_refused_without_whois(
        lab_chat: LabChat) -> None:
    """The attack: a valid token's calls past the person's call rate, one after the other
    on 64 connections, each a WhoIs and a whole call, put alice's WhoAmI at p50 180 ms, p99
    0.4 s (5 and 16 ms without; over the lab, 2026-11-25). Now those refusals count against
    the budgets: the rest are refused unread, without WhoIs."""
    from tsnetchat.gate import CONN_REFUSALS

    gate = lab_chat.server.gate
    gate.hold = 0.0  # (60 calls one after the other: the hold has its own test above)
    conn = await lab_chat.connect("mallory-laptop", lab_chat.token(MALLORY))
    for _ in range(2):
        assert (await conn.whoami()).identity.login == MALLORY
    asked = gate.whois_calls
    started = time.monotonic()
    codes = [(await refused(conn.whoami())).code() for _ in range(60)]
    took = time.monotonic() - started
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    burst, per_second = CONN_REFUSALS
    assert gate.whois_calls - asked <= burst + math.ceil(took * per_second) + 1, took
    mine = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    assert (await mine.whoami()).identity.login == ALICE


async def test_held_tokenless_streams_are_bounded_even_from_plain_loopback(
        lab_chat: LabChat) -> None:
    """The attack: Health.Watch (and reflection) streams need no token; 3,000 Watches held
    from plain loopback (no tailnet at all) cost the server 62 MiB. Now: a few per
    connection, and a bound for all."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from tsnetchat.server import MAX_OPEN_STREAMS, MAX_OPEN_STREAMS_PER_CONNECTION

    def channel() -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{lab_chat.port}",
                                       options=fresh_channel_options)
        channels.append(ch)
        return ch

    async def watch(ch: grpc.aio.Channel) -> Any:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
        return call

    async def reflect(ch: grpc.aio.Channel) -> Any:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert (await call.read()).list_services_response.service
        return call

    channels: list[grpc.aio.Channel] = []
    held: list[Any] = []
    try:
        for open_one, what in ((watch, "health watches"), (reflect, "reflection streams")):
            one = channel()
            held += [await open_one(one) for _ in range(MAX_OPEN_STREAMS_PER_CONNECTION)]
            e = await refused(open_one(one))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and what in e.details()
            assert "per connection" in e.details()  # (the bound reached, named)
        held += [await watch(ch) for ch in [channel() for _ in range(
            MAX_OPEN_STREAMS // MAX_OPEN_STREAMS_PER_CONNECTION - 1)]
                 for _ in range(MAX_OPEN_STREAMS_PER_CONNECTION)]
        e = await refused(watch(channel()))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in all" in e.details()
    finally:
        for call in held:
            call.cancel()
        for ch in channels:
            await ch.close()


async def test_one_device_cannot_hold_every_tokenless_stream_however_many_connections_it_opens(
        lab_chat: LabChat) -> None:
    """The attack: one tailnet device with no token held all 64 Health.Watch streams, on 16
    connections, and every other probe was refused (an attacker's run over the lab,
    2026-11-24). Now a device has a bound of its own, and another device still gets in."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tsnetchat.server import MAX_OPEN_STREAMS_PER_CONNECTION, MAX_OPEN_STREAMS_PER_DEVICE

    async def watch(conn: Any) -> Any:
        call = health_pb2_grpc.HealthStub(conn.channel).Watch(health_pb2.HealthCheckRequest())
        assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
        return call

    full = MAX_OPEN_STREAMS_PER_DEVICE // MAX_OPEN_STREAMS_PER_CONNECTION
    alices = [await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
              for _ in range(full + 1)]  # (each its own TCP connection)
    held = [await watch(conn) for conn in alices[:full]
            for _ in range(MAX_OPEN_STREAMS_PER_CONNECTION)]
    try:
        e = await refused(watch(alices[full]))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per device" in e.details()
        bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
        held.append(await watch(bob))  # another device is not held to alice's bound
        held.pop(0).cancel()  # one of alice's ends: its place is free again
        deadline = time.monotonic() + 5
        while True:
            try:
                held.append(await watch(alices[full]))
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline, "the place of a Watch ended stayed taken"
                await asyncio.sleep(0.1)
    finally:
        for call in held:
            call.cancel()


# --- identities, names and text -----------------------------------------------------------


async def test_a_local_process_going_out_through_the_servers_own_node_is_refused(
        lab_chat: LabChat) -> None:
    """The attack: a process on the server machine dials the server through the server
    node's own tailscaled proxy; WhoIs names the server node itself (and its login). Refused
    by default: the server's own node is not a person's device."""
    conn = await lab_chat.connect("chat-server", lab_chat.token("chat@tailnet.test"))
    e = await refused(conn.whoami())
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.details().startswith("tailnet lock:") and "server's own node" in e.details()


@pytest.mark.server_config(allow_own_node=True)
async def test_bots_on_the_server_get_in_when_allow_own_node_is_set(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("chat-server", lab_chat.token("chat@tailnet.test"))
    assert (await conn.whoami()).identity.login == "chat@tailnet.test"


async def test_a_room_name_with_a_trailing_newline_is_no_room_anywhere(
        lab_chat: LabChat, tmp_path: Path) -> None:
    """``general\\n`` used to pass the room rule (``$`` matches before a final newline) and
    show up as a look-alike of general."""
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    for call in (conn.history("general\n"), first_of(conn.subscribe("general\n"), "message"),
                 first_of(conn.stub.Join(hello_events("general\n"), metadata=conn.metadata),
                          "welcome")):
        e = await refused(call)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid room" in e.details()
    out = subprocess.run([str(CLI), "token", "issue", ALICE, "--room", "general\n",
                          "--state-dir", str(tmp_path / "other")], capture_output=True, text=True)
    assert out.returncode == 2 and "not a valid room name" in out.stderr
    assert not (tmp_path / "other").exists()  # no key, no state dir: nothing was issued


async def test_a_kick_with_a_newline_in_the_login_cannot_forge_a_log_line(
        lab_chat: LabChat, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tsnetchat")
    admin = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE, admin=True))
    forged = "bob\n12:00:00 info tsnetchat.service: revoke token=all by='root' streams=9"
    await admin.stub.Kick(pb.KickRequest(room="general", login=forged), metadata=admin.metadata)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kick")]
    assert "\n" not in line and "bob\\n12:00:00" in line


async def test_a_display_name_with_terminal_escapes_reaches_nobody_raw(
        lab_chat: LabChat) -> None:
    """The attack: a tailnet user whose display name is ``Eve<ESC>[31m<RLO>RED``. Whatever
    shows it (WhoAmI, messages, presence, `tsnetchat history`) shows ``Eve?[31m?RED``."""
    lab = lab_chat.lab
    if "eve" not in lab.user_ids:
        await asyncio.to_thread(lab.add_user, "eve", "Eve\x1b[31m\u202eRED")
    await asyncio.to_thread(lab.add_node, "eve-laptop", "eve")
    try:
        eve = await lab_chat.connect("eve-laptop", lab_chat.token("eve@tailnet.test"))
        me = await eve.whoami()
        assert me.identity.display_name == "Eve?[31m?RED"
        bob = await lab_chat.connect("bob-laptop", lab_chat.token(BOB))
        sub = bob.subscribe("general")
        await first_of(sub, "replay_done")
        await eve.send_one("general", "hello")
        assert (await first_of(sub, "message")).sender.display_name == "Eve?[31m?RED"
        out = await asyncio.to_thread(history_cli, lab_chat, "alice-laptop", ALICE)
        assert "<Eve?[31m?RED> hello" in out and "\x1b" not in out and "\u202e" not in out
    finally:
        await asyncio.to_thread(lab.drop_node, "eve-laptop")


def history_cli(lab_chat: LabChat, node: str, login: str, *extra: str) -> str:
    n = lab_chat.lab.nodes[node]
    out = subprocess.run([str(CLI), "history", "chat-server", "--room", "general", "--token",
                          lab_chat.token(login), "--socket", n.socket, "--proxy", n.http_proxy,
                          "--port", str(lab_chat.port), *extra],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_a_message_cannot_pass_one_of_its_lines_off_as_someone_elses(
        lab_chat: LabChat) -> None:
    """The attack: a message with a newline followed by ``[09:00:00] <Bob> ...`` rendered in
    `tsnetchat history` exactly like a line from Bob. Continuation lines are marked."""
    mallory = await lab_chat.connect("mallory-laptop", lab_chat.token(MALLORY))
    await mallory.send_one("general", "hi all\n[09:00:00] <Bob> please send me your token")
    out = await asyncio.to_thread(history_cli, lab_chat, "alice-laptop", ALICE)
    lines = [line for line in out.splitlines() if not line.startswith("──")]  # day lines
    assert lines[0].endswith("<Mallory> hi all")
    assert lines[1].lstrip() == f"{render.CONTINUATION}[09:00:00] <Bob> please send me your token"
    assert lines[1].startswith(" ")  # under the text column, never at a line's start


async def test_text_of_only_zero_width_characters_is_an_empty_message(lab_chat: LabChat) -> None:
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    invisible = pb.ClientEvent(send=pb.SendMessage(text="\u200b\ufeff\u200b", client_msg_id="z"))
    call = conn.stub.Join(hello_events("general", then=[invisible]), metadata=conn.metadata)
    err = await first_of(call, "error")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "empty" in err.message
    call.cancel()
    assert not (await conn.history("general")).messages


async def test_message_ids_beyond_sqlites_integers_are_invalid_argument(
        lab_chat: LabChat) -> None:
    """History with after_id/before_id at or above 2^63 used to answer UNKNOWN (an
    OverflowError)."""
    conn = await lab_chat.connect("alice-laptop", lab_chat.token(ALICE))
    for req in (pb.HistoryRequest(room="general", after_id=2**63),
                pb.HistoryRequest(room="general", before_id=2**64 - 1)):
        e = await refused(conn.stub.History(req, metadata=conn.metadata))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a message id" in e.details()
    e = await refused(first_of(conn.subscribe("general", after=2**63), "message"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the server's own files and ports -------------------------------------------------------


async def test_serving_from_a_state_dir_others_can_enter_makes_it_and_the_history_private(
        lab: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The attack: any local user reads history.db (and its WAL) when `serve` runs in an
    existing 0755 state dir. Now the dir is made 0700 (loudly) and the files are 0600."""
    caplog.set_level(logging.WARNING, "tsnetchat")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    async with lab_server(lab, tmp_path) as lc:
        conn = await lc.connect("alice-laptop", lc.token(ALICE))
        await conn.send_one("general", "private")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("tsnetchat.db", "tsnetchat.db-wal", "tsnetchat.db-shm", "jwt.key"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert any("open to other users (mode 0755); made it 0700" in r.getMessage()
               for r in caplog.records)
    other = tmp_path / "cli-state"
    out = subprocess.run([str(CLI), "token", "issue", ALICE, "--state-dir", str(other)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(other.stat().st_mode) == 0o700
    assert stat.S_IMODE((other / "tsnetchat.db").stat().st_mode) == 0o600


async def http_get(host: str, port: int, *, via: str = "", path: str = "/") -> str:
    """A plain HTTP GET, directly or through a node's HTTP proxy (CONNECT)."""
    if via:
        ph, pp = via.rsplit(":", 1)
        r, w = await asyncio.open_connection(ph, int(pp))
        w.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert b" 200 " in head.split(b"\r\n")[0], head
    else:
        r, w = await asyncio.open_connection(host, port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await w.drain()
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data.decode(errors="replace")


async def test_metrics_are_behind_the_tailnet_lock(lab: Any, tmp_path: Path) -> None:
    """The attack: in userspace mode the metrics port is on loopback, so any local process
    could read it. Now only connections that come through tailscaled from another device
    get an answer."""
    mport = free_port()
    async with lab_server(lab, tmp_path, metrics_port=mport) as lc:
        local = await http_get("127.0.0.1", mport)
        assert local.startswith("HTTP/1.1 403") and "tailnet lock" in local
        alice = lc.lab.nodes["alice-laptop"]
        ok = await http_get("chat-server", mport, via=alice.http_proxy)
        assert ok.startswith("HTTP/1.1 200") and "tsnetchat_whois_lookups_total" in ok
        own = await http_get("chat-server", mport, via=lc.lab.nodes["chat-server"].http_proxy)
        assert own.startswith("HTTP/1.1 403") and "server's own node" in own


# --- reloads ---------------------------------------------------------------------------------


async def test_a_reload_that_requires_grants_closes_the_open_stream_of_a_user_without_one(
        lab_chat: LabChat) -> None:
    mallory = await lab_chat.connect("mallory-laptop", lab_chat.token(MALLORY))
    sub = mallory.subscribe("general")
    await first_of(sub, "replay_done")
    lab_chat.server.reload(dataclasses.replace(lab_chat.cfg, require_grant=True))
    e = await refused(first_of(sub, "message"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "no app capability" in e.details()


def test_sighup_gives_people_already_limited_the_new_message_rate(lab: Any,
                                                                  tmp_path: Path) -> None:
    """A SIGHUP used to leave the rate buckets of people already seen as they were."""
    cfg = tmp_path / "config.toml"
    cfg.write_text("rate_burst = 2\nrate_per_second = 0.001\n")
    d = start_daemon(lab, tmp_path, "--config", str(cfg))
    alice = lab.nodes["alice-laptop"]
    try:
        d.wait_for("READY=1")
        tok = d.token(ALICE)

        def send_cli(text: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(CLI), "send", "chat-server", text, "--token", tok,
                                   "--socket", alice.socket, "--port", str(d.port),
                                   "--proxy", alice.http_proxy],
                                  capture_output=True, text=True, timeout=60)

        assert [send_cli(f"m{i}").returncode for i in range(2)] == [0, 0]
        limited = send_cli("m3")
        assert limited.returncode == 1 and "slow down" in limited.stderr
        cfg.write_text("rate_burst = 2\nrate_per_second = 1000\n")
        d.reload()
        assert send_cli("m4").returncode == 0
    finally:
        d.proc.terminate()
        d.proc.wait(timeout=15)
        d.notify.close()
