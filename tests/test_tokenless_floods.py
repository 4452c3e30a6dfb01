"""Floods of calls that need no token (Health.Check, reflection): a device may not make them
fast enough to slow other people's calls. In-process, over FakeTailnet; the numbers that
motivated each bound are over the lab (bench/refusal_flood.py)."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import Chat

from tsnetchat.server import CHECKS

SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_health_checks_past_a_connections_budget_wait_for_the_hold_while_others_are_not(
        chat: Chat) -> None:
    """Health.Check needs no token, and was answered at once however often it came: 2,819
    a second on 64 connections put alice's WhoAmI at p99 39 ms instead of 7 (over the lab,
    2026-11-25). A probe's few Checks are answered at once; a connection
    past its budget waits ``Gate.hold`` for each answer, and other connections do not."""
    chat.server.gate.hold = 3600.0  # (never answered while this test runs)
    mallory = await chat.connect("mallory@t", token="")
    check = health_pb2_grpc.HealthStub(mallory.channel).Check
    for _ in range(CHECKS[0]):
        assert (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING
    held = asyncio.ensure_future(check(health_pb2.HealthCheckRequest()))
    alice = await chat.connect("alice@t", token="")
    probe = health_pb2_grpc.HealthStub(alice.channel).Check
    for _ in range(3):
        assert (await probe(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING
    done, _ = await asyncio.wait({held}, timeout=1.0)
    assert not done, "a Check past the connection's budget was answered at once"
    held.cancel()
