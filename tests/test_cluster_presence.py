"""Presence across a cluster's servers, over the real lab and a real NATS cluster: a person
in a room through two servers at once is in it until they leave it on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats_lab
import pytest
from helpers import collect, join, two_servers, until

from tsnetchat.pb import chat_pb2 as pb

pytestmark = [pytest.mark.tailnet, pytest.mark.cluster]

ALICE, BOB = "alice@tailnet.test", "bob@tailnet.test"


async def test_a_person_also_in_the_room_through_another_server_neither_comes_nor_goes(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Bob in #general through server 2, then also through server 1, then no longer through
    server 1: alice, on server 1, was told he joined (he was in its member list already)
    and that he left, while he was still there (a review, 2026-11-25)."""
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        sees = await join(alice, "general")
        [own] = await collect(sees.call, 1, kind="presence")
        assert (own.kind, own.who.login) == (pb.PRESENCE_KIND_JOINED, ALICE)
        on_two = await join(await two.connect("bob-laptop", two.token(BOB)), "general")
        [came] = await collect(sees.call, 1, kind="presence")  # (told by server 2)
        assert (came.kind, came.who.login) == (pb.PRESENCE_KIND_JOINED, BOB)

        on_one = await join(await one.connect("bob-laptop", one.token(BOB)), "general")
        on_one.cancel()
        await until(lambda: "general" not in one.server.service.hub.rooms_of(BOB),
                    "bob's stream on server 1 ended")
        await alice.send_one("general", "bob, still there?")
        seen = []
        async for ev in sees.call:
            which = ev.WhichOneof("event")
            if which == "presence":
                seen.append((ev.presence.kind, ev.presence.who.login))
            if which in ("message", "batch"):
                break
        assert seen == []  # (nothing about bob, who never left)

        on_two.cancel()  # (and when he leaves on server 2 too, he has left)
        [gone] = await collect(sees.call, 1, kind="presence")
        assert (gone.kind, gone.who.login) == (pb.PRESENCE_KIND_LEFT, BOB)
        assert [m.login for m in gone.members] == [ALICE]
        sees.cancel()
