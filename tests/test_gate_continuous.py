"""Authorization that holds for the life of a stream, where nothing else on the tailnet
moves: a real in-process server over FakeTailnet, whose IPN bus says nothing unless told.
(A gate that never decided leases again on a new key passed the lab's rotate-key test
too, test_security_continuous.py: something else there decided them again; 2026-11-25.)"""

from __future__ import annotations

import grpc
import pytest
from fakenet import FakeTailnet
from helpers import Chat, first_of, refused

from tsnetchat import auth
from tsnetchat.errors import Unauthenticated
from tsnetchat.gate import Gate, Policy
from tsnetchat.tailnet import WhoIs


async def test_a_rotated_key_ends_the_open_streams_of_tokens_signed_with_the_old_one(
        chat: Chat) -> None:
    old = await chat.connect("alice@t")
    sub = old.subscribe("general")
    await first_of(sub, "replay_done")
    auth.rotate_key(chat.cfg.key_path)  # as `tsnetchat token rotate-key` does
    e = await refused(first_of(sub, "message", timeout=15))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (e.details() or "").startswith("token lock: ") and "signature" in (e.details() or "")
    new = await chat.connect("alice@t")
    assert (await new.whoami()).identity.login == "alice@t"


async def test_a_port_that_another_device_reuses_is_asked_whois_again_not_taken_from_before(
        ) -> None:
    """The identity of a connection is forgotten with its last call: the same address and
    port, used again by another device's connection, is that device's. (Were it kept, the
    port reused by mallory's device would carry alice's identity, and her stolen token would
    pass both locks: a mutant that kept it passed every in-process test, 2026-11-25.)"""
    key = b"k" * 64
    net = FakeTailnet()
    gate = Gate(net, Policy(key=key, cap_name="example.com/cap/tsnetchat",
                            require_grant=False))
    alices, _ = auth.issue_token(key, "alice@t", ["*"], ttl_seconds=600)
    peer, port = "ipv4:127.0.0.1:40000", 40000

    def device(login: str) -> WhoIs:
        return WhoIs(login=login, display_name=login, node_name=f"{login}-laptop",
                     node_id=f"{login}-laptop", tags=(), addresses=("100.64.0.9",))

    net.by_port[port] = device("alice@t")
    async with gate.admit(peer, [("authorization", f"Bearer {alices}")], "WhoAmI") as lease:
        assert lease.principal.login == "alice@t"
    assert gate.connection_count() == 0
    net.by_port[port] = device("mallory@t")  # (the port, free again, is mallory's now)
    with pytest.raises(Unauthenticated, match="the two locks disagree"):
        async with gate.admit(peer, [("authorization", f"Bearer {alices}")], "WhoAmI"):
            pass
