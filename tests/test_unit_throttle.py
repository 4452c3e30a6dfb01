"""Token buckets (tsnetchat.throttle): reconfigurable, and forgetful of idle keys."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import until

from tsnetchat.throttle import Buckets, Coalescer, LogLimiter, TokenBucket


def test_a_reconfigured_bucket_refills_at_the_new_rate_from_now_on() -> None:
    b = TokenBucket(2, 0.001)
    assert b.take() == 0 and b.take() == 0 and b.take() > 100
    b.configure(10, 1e6)  # a SIGHUP raised the rate
    # At most a microsecond to wait (the old rate: 1,000 s). Not "== 0": that needs a
    # microsecond to pass between the two calls, which a fast machine may not give.
    assert b.take() <= 1e-6


def test_buckets_apply_new_numbers_to_existing_keys_and_forget_full_ones() -> None:
    bs = Buckets(1, 0.001)
    assert bs.take("alice") == 0 and bs.take("alice") > 0
    bs.configure(5, 1e6)
    assert bs.take("alice") <= 1e-6  # (see above)
    bs.SWEEP_EVERY = 4
    for i in range(8):
        bs.get(f"idle{i}")
    assert len(bs) < 8  # full (unused) buckets are dropped on a sweep


def test_wait_takes_nothing() -> None:
    bs = Buckets(1, 0.001)
    assert bs.wait("x") == 0 and bs.wait("x") == 0
    bs.take("x")
    assert bs.wait("x") > 0


def test_the_log_limiter_says_how_many_lines_it_dropped_on_the_next_one_it_writes(
        caplog: pytest.LogCaptureFixture) -> None:
    lim = LogLimiter(burst=2, rate=0.001)
    logger = logging.getLogger("tsnetchat.test")
    with caplog.at_level(logging.INFO, logger="tsnetchat.test"):
        written = [lim.log(logger, logging.INFO, "refused %s", i) for i in range(5)]
        lim._bucket.tokens = 1.0  # as if time had passed
        written.append(lim.log(logger, logging.INFO, "refused %s", 5))
        lim._bucket.tokens = 1.0
        written.append(lim.log(logger, logging.INFO, "refused %s", 6))
    assert written == [True, True, False, False, False, True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused 1", "refused 5 (3 more like this not logged)", "refused 6"]


async def test_the_coalescer_holds_what_goes_over_the_bucket_and_lets_out_the_latest() -> None:
    said: list[str] = []
    c: Coalescer[str] = Coalescer(2, 20.0, said.append)
    assert c.offer("mallory", "general", "in") and c.offer("mallory", "general", "out")
    assert not c.offer("mallory", "general", "in")  # over: held ...
    assert not c.offer("mallory", "general", "in again")  # ... and replaced by the latest
    assert not c.offer("mallory", "random", "in+")  # the same person's bucket
    assert c.offer("bob", "general", "bob in")  # another person's is their own
    assert said == ["in", "out", "bob in"] and len(c) == 2
    await until(lambda: len(c) == 0, "two more tokens, one at a time (20 a second)")
    assert sorted(said[3:]) == ["in again", "in+"]


async def test_the_coalescer_lets_a_persons_held_topics_out_in_turn_on_one_timer() -> None:
    """A timer per topic, each trying the bucket again every turn, cost a share of the core
    that grew with the rooms a person opened and closed (an attacker over the lab)."""
    said: list[str] = []
    c: Coalescer[str] = Coalescer(1, 50.0, said.append)
    runs = 0
    release = c._release

    def counted(who: str) -> None:
        nonlocal runs
        runs += 1
        release(who)

    c._release = counted  # type: ignore[method-assign]
    assert c.offer("mallory", "r0", "r0 in")
    for i in range(1, 21):
        assert not c.offer("mallory", f"r{i}", f"r{i} in")
    assert not c.offer("mallory", "r1", "r1 out")  # in r1's place, not after r20
    await until(lambda: len(c) == 0, "20 tokens at 50 a second")
    assert said == ["r0 in", "r1 out", *[f"r{i} in" for i in range(2, 21)]]
    assert runs <= 25, runs  # about one turn each, not one per topic per turn


async def test_what_the_coalescer_holds_can_be_withdrawn_unsaid() -> None:
    """A person who opened a room and left it before their coming was said has nothing to
    say there: held, their coming and then their going stayed, one per room, let out one a
    second (501 held after 576 Joins into new rooms in 10 s; a review, 2026-11-25)."""
    said: list[str] = []
    c: Coalescer[str] = Coalescer(1, 50.0, said.append)
    assert c.offer("mallory", "r0", "r0 in")
    assert not c.offer("mallory", "r1", "r1 in") and not c.offer("mallory", "r2", "r2 in")
    c.withdraw("mallory", "r1")
    c.withdraw("mallory", "r9")  # (nothing held there: nothing to do)
    c.withdraw("bob", "r1")
    assert len(c) == 1
    c.withdraw("mallory", "r2")
    assert len(c) == 0
    await asyncio.sleep(0.1)  # (her timer comes and finds nothing)
    assert said == ["r0 in"]
    assert c.offer("mallory", "r3", "r3 in")  # (her bucket refilled: said at once)
    assert said == ["r0 in", "r3 in"] and len(c) == 0
