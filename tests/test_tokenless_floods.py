"""Floods of calls that need no token (Health.Check, reflection): a device may not make them
fast enough to slow other people's calls. In-process, over FakeTailnet; the numbers that
motivated each bound are over the lab (bench/refusal_flood.py)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import Chat, refused

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


async def test_a_reflection_stream_that_asks_too_fast_is_ended_after_the_hold(
        chat: Chat) -> None:
    """Reflection needs no token, and a stream was answered as fast as it asked: 8 streams
    pumping file_containing_symbol had 7,425 answers a second and put alice's WhoAmI at p99
    360 ms instead of 36 (an attacker's run over the lab, 2026-11-25). A tool's few requests
    are answered at once; a stream past its pace is ended, after ``Gate.hold``, saying why,
    and other streams are answered meanwhile."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    chat.server.reflection.pace = (4, 1 / 3600)  # (no more after the burst in this test)
    chat.server.gate.hold = 3600.0  # (never answered while this test runs)
    ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="tsnetchat.v1.Chat")
    mallory = await chat.connect("mallory@t", token="")
    pumped = reflection_pb2_grpc.ServerReflectionStub(mallory.channel).ServerReflectionInfo()
    for _ in range(5):
        await pumped.write(ask)
    for _ in range(4):
        assert (await asyncio.wait_for(pumped.read(), 10)).file_descriptor_response
    fifth = asyncio.ensure_future(pumped.read())
    alice = await chat.connect("alice@t", token="")
    tool = reflection_pb2_grpc.ServerReflectionStub(alice.channel).ServerReflectionInfo()
    await tool.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    assert (await asyncio.wait_for(tool.read(), 10)).list_services_response.service
    done, _ = await asyncio.wait({fifth}, timeout=1.0)
    assert not done, "a request past the stream's pace was answered at once"
    pumped.cancel()
    tool.cancel()
    chat.server.gate.hold = 0.0  # (a new stream, ended at once)
    again = reflection_pb2_grpc.ServerReflectionStub(mallory.channel).ServerReflectionInfo()
    for _ in range(5):
        await again.write(ask)
    for _ in range(4):
        assert (await asyncio.wait_for(again.read(), 10)).file_descriptor_response
    e = await refused(again.read())
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many reflection requests on one stream" in e.details()
