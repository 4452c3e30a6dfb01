"""A device's tailnet identity changed by the tailnet's admin while its person chats, over
the real lab: the server must decide the open streams again on the new identity."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import grpc
import pytest
import tailnet_lab
from helpers import LabChat, apply_policy, bobs_phone_and_laptop, first_of, refused, until

pytestmark = [pytest.mark.tailnet, pytest.mark.security]

BOB = "bob@tailnet.test"
KIOSK = "tag:kiosk"


def node_id(lab: Any, name: str) -> str:
    for n in json.loads(lab.headscale("nodes", "list", "-o", "json")):
        if name in (n.get("given_name"), n.get("name")):
            return str(n["id"])
    raise AssertionError(f"headscale has no node {name!r}")


async def test_a_device_tagged_while_its_person_chats_loses_the_streams_of_their_token(
        lab_chat: LabChat, caplog: pytest.LogCaptureFixture) -> None:
    """The tailnet admin tags bob's phone (a kiosk now): it is no longer bob's device, and
    tagged devices do not log in. Bob's stream on it is closed (the two locks disagree), his
    token is refused there from then on, and his laptop goes on; a token for the tag works
    on the phone."""
    lab, server = lab_chat.lab, lab_chat.server
    policy = copy.deepcopy(tailnet_lab.default_policy())
    policy["tagOwners"] = {KIOSK: ["bob@"]}
    await apply_policy(lab, policy)
    try:
        async with bobs_phone_and_laptop(lab_chat) as bob:
            caplog.set_level(logging.INFO, "tsnetchat.gate")
            await asyncio.to_thread(lab.headscale, "nodes", "tag", "-i",
                                    node_id(lab, "bob-phone"), "-t", KIOSK)
            await until(lambda: server.hub.counts()[1] == 1, timeout=15,
                        what="the server closed the phone's stream")
            assert any("the two locks disagree" in r.getMessage() for r in caplog.records)
            e = await refused(bob.phone.whoami())
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "the two locks disagree" in e.details() and KIOSK in e.details()
            await bob.laptop.send_one("general", "the laptop still works")
            assert (await first_of(bob.on_laptop, "message")).text == "the laptop still works"
            kiosk = await lab_chat.connect("bob-phone", lab_chat.token(KIOSK))
            assert (await kiosk.whoami()).identity.login == KIOSK
    finally:
        await apply_policy(lab, tailnet_lab.default_policy())


async def test_a_device_logged_out_by_the_tailnets_admin_loses_its_streams(
        lab_chat: LabChat) -> None:
    """The tailnet admin expires bob's phone (`headscale nodes expire`): the phone must log
    in again before it is on the tailnet, so its stream is closed meanwhile; the laptop
    goes on."""
    lab, server = lab_chat.lab, lab_chat.server
    async with bobs_phone_and_laptop(lab_chat) as bob:
        await asyncio.to_thread(lab.headscale, "nodes", "expire", "-i",
                                node_id(lab, "bob-phone"))
        await until(lambda: server.hub.counts()[1] == 1, timeout=15,
                    what="the server closed the phone's stream")
        await bob.laptop.send_one("general", "the laptop still works")
        assert (await first_of(bob.on_laptop, "message")).text == "the laptop still works"
