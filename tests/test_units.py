"""Pure logic: configuration, peer parsing, encoding, policy, validation, storage rules."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
import weakref
from pathlib import Path
from typing import Any

import pytest

import tsnetchat
from tsnetchat import auth, codec
from tsnetchat.config import ServerConfig, load_config
from tsnetchat.errors import ConfigError, PermissionDenied, StoreError, Unauthenticated
from tsnetchat.hub import Hub, Item, Pacing, Subscriber
from tsnetchat.loop import LoopLoad, freeze_startup_heap, new_event_loop, yield_helper_threads
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.service import _FORBIDDEN, TokenBucket
from tsnetchat.store import Sender, Store, StoredMessage
from tsnetchat.tailnet import WhoIs, format_addr, parse_grpc_peer
from tsnetchat.tokens import find_token, load_store, save_token

# --- public surface -----------------------------------------------------------------------


def test_public_api_is_sorted_and_importable() -> None:
    assert tsnetchat.__all__ == sorted(tsnetchat.__all__)
    for name in tsnetchat.__all__:
        assert hasattr(tsnetchat, name)


# --- configuration ------------------------------------------------------------------------


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("port = 1000\nmax_page = 10\nrate_burst = 7\n")
    cfg = load_config(file=f, env={"TSNETCHAT_PORT": "2000", "TSNETCHAT_MAX_PAGE": "20"},
                      flags={"port": 3000, "rate_burst": None})
    assert (cfg.port, cfg.max_page, cfg.rate_burst) == (3000, 20, 7)
    assert cfg.history_on_join == ServerConfig().history_on_join


@pytest.mark.parametrize("source,expect", [
    ({"flags": {"port": 70000}}, "--port: 70000 is not a TCP port"),
    ({"env": {"TSNETCHAT_PORT": "abc"}}, "TSNETCHAT_PORT: invalid value 'abc'"),
    ({"env": {"TSNETCHAT_REQUIRE_GRANT": "maybe"}}, "expected true or false"),
    ({"flags": {"listen": "0.0.0.0"}}, "--listen: 0.0.0.0 would listen on every interface"),
    ({"flags": {"listen": "::"}}, "would listen on every interface"),
    ({"flags": {"cap_domain": "not a domain"}}, "--cap-domain"),
])
def test_bad_settings_name_where_they_came_from(source: dict[str, dict[str, object]],
                                               expect: str) -> None:
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        load_config(file=None, env=source.get("env", {}),  # type: ignore[arg-type]
                    flags=source.get("flags", {}))


def test_unknown_file_key_and_bad_toml_are_reported(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load_config(file=f, env={})
    f.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(file=f, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.toml", env={})


def test_config_show_masks_secrets() -> None:
    cfg = load_config(file=None, env={"TSNETCHAT_AUTH_KEY": "tskey-auth-secret"})
    assert cfg.masked()["auth_key"] == "********"
    assert "tskey" not in str(cfg.masked())


# --- peers and encoding -------------------------------------------------------------------


@pytest.mark.parametrize("peer,expect", [
    ("ipv4:127.0.0.1:33634", ("127.0.0.1", 33634)),
    ("ipv6:[::1]:56980", ("::1", 56980)),
    ("ipv6:%5B::1%5D:56980", ("::1", 56980)),
    ("ipv6:[fd7a:115c:a1e0::2]:443", ("fd7a:115c:a1e0::2", 443)),
])
def test_grpc_peer_strings_parse(peer: str, expect: tuple[str, int]) -> None:
    assert parse_grpc_peer(peer) == expect
    assert format_addr(*expect).endswith(f":{expect[1]}")


@pytest.mark.parametrize("peer", ["unix:/tmp/x.sock", "ipv4:nope", "ipv6:::1:5", ""])
def test_non_ip_peers_are_rejected(peer: str) -> None:
    with pytest.raises(ValueError):
        parse_grpc_peer(peer)


def _stored(i: int) -> StoredMessage:
    return StoredMessage("r", i, 1000 + i, Sender("a@t", "A", "n"), pb.MESSAGE_KIND_TEXT,
                         "x" * (i * 70), f"c{i}")


def test_hand_packed_frames_equal_protobufs_own_encoding() -> None:
    msgs = [_stored(i) for i in range(1, 5)]
    items = [codec.message_item(m) for m in msgs]
    acks = [codec.sent_item(f"c{i}", i) for i in (1, 2)]
    as_pb = [codec.message_pb(m) for m in msgs]
    assert items[0].frame == pb.ServerEvent(message=as_pb[0]).SerializeToString()
    assert acks[0].frame == pb.ServerEvent(sent=pb.Sent(client_msg_id="c1", id=1)
                                           ).SerializeToString()
    # Interleaved on the wire, parsed into the two repeated fields in their own order.
    (frame,) = codec.pack([items[0], acks[0], items[1], acks[1], items[2], items[3]],
                          batch_acks=True)
    batch = pb.ServerEvent.FromString(frame).batch
    assert list(batch.messages) == as_pb
    assert [(s.client_msg_id, s.id) for s in batch.sent] == [("c1", 1), ("c2", 2)]


def test_acks_get_frames_of_their_own_unless_the_client_asked_for_batched_acks() -> None:
    items = [codec.message_item(_stored(i)) for i in (1, 2)]
    ack = codec.sent_item("c1", 1)
    frames = codec.pack([items[0], ack, items[1]])
    assert [pb.ServerEvent.FromString(f).WhichOneof("event") for f in frames] == [
        "message", "sent", "message"]
    assert codec.pack([ack]) == codec.pack([ack], batch_acks=True) == [ack.frame]


def test_pack_skips_replayed_and_keeps_order() -> None:
    items = [codec.message_item(_stored(i)) for i in (3, 4, 5)]
    presence = codec.event_item(presence=pb.Presence(room="r"))
    frames = codec.pack([items[0], presence, items[1], items[2]], skip_through=3)
    decoded = [pb.ServerEvent.FromString(f) for f in frames]
    assert [d.WhichOneof("event") for d in decoded] == ["presence", "batch"]
    assert [m.id for m in decoded[1].batch.messages] == [4, 5]


def test_text_rule_regex_matches_unicode_categories_everywhere_in_the_bmp() -> None:
    bidi = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    for cp in range(0x10000):
        ch = chr(cp)
        want = ch not in "\n\t" and (unicodedata.category(ch) in ("Cc", "Cs") or ch in bidi)
        assert (_FORBIDDEN.search(ch) is not None) == want, hex(cp)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(3, 1000.0)
    assert [b.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take() > 0


# --- fan-out pacing -------------------------------------------------------------------------
# A long linger and a wide busy window, so what these assert is order, not speed.
SLOW = Pacing(frame_cost=1.0, linger_max=0.05, busy_window=60.0, wake_at=4)


def _item(i: int) -> Item:
    return Item(i, b"m%d" % i, b"")


async def _pending_after_yields(task: asyncio.Task[None]) -> bool:
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


async def test_a_quiet_room_wakes_its_subscribers_at_once() -> None:
    hub = Hub(SLOW)
    sub = Subscriber("r", "a", "t", limit=100)
    hub.add(sub)
    waiting = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    hub.publish("r", _item(1))
    assert not await _pending_after_yields(waiting)
    assert sub.drain(10) == [_item(1)]


async def _busy_room(n: int = 1, hub: Hub | None = None) -> tuple[Hub, list[Subscriber]]:
    """A room whose first message went out at once; the next ones find it busy."""
    hub = hub or Hub(SLOW)
    subs = [Subscriber("r", f"u{i}", "t", limit=100) for i in range(n)]
    for s in subs:
        hub.add(s)
    hub.publish("r", _item(1))
    for s in subs:
        await s.wait()
        s.drain(10)
    return hub, subs


async def test_a_busy_room_holds_messages_so_they_share_one_frame() -> None:
    hub, subs = await _busy_room(3)
    waiting = [asyncio.create_task(s.wait()) for s in subs]
    hub.publish("r", _item(2))  # busy now: held for the room's linger
    hub.publish("r", _item(3))
    assert all([await _pending_after_yields(t) for t in waiting])
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert [s.drain(10) for s in subs] == [[_item(2), _item(3)]] * 3


async def test_a_linger_shorter_than_the_loops_timer_resolution_is_no_linger() -> None:
    hub, [sub] = await _busy_room(hub=Hub(Pacing(frame_cost=1e-4, busy_window=60.0)))
    waiting = asyncio.create_task(sub.wait())
    hub.publish("r", _item(2))  # busy, but 100 us of linger would really be 1 ms or more
    assert not await _pending_after_yields(waiting)


async def test_a_long_queue_is_drained_without_waiting_for_the_linger() -> None:
    hub, [sub] = await _busy_room()
    waiting = asyncio.create_task(sub.wait())
    for i in range(2, SLOW.wake_at + 2):
        hub.publish("r", _item(i))
    assert not await _pending_after_yields(waiting)


async def test_what_one_drain_leaves_behind_is_drained_next_without_waiting() -> None:
    hub = Hub(SLOW)
    sub = Subscriber("r", "a", "t", limit=100)
    hub.add(sub)
    for i in range(3):
        sub.push(_item(i))
    await sub.wait()
    assert sub.drain(2) == [_item(0), _item(1)]
    assert not await _pending_after_yields(asyncio.create_task(sub.wait()))
    assert sub.drain(2) == [_item(2)]


async def test_an_ack_in_a_busy_room_rides_with_the_held_echo_of_its_message() -> None:
    hub, [sub] = await _busy_room()
    waiting = asyncio.create_task(sub.wait())
    hub.publish("r", _item(2))  # held for the room's linger
    hub.reply(sub, Item(0, b"ack"))  # held too: one frame for the echo and its ack
    assert await _pending_after_yields(waiting)
    await asyncio.wait_for(waiting, 10)
    assert [i.id for i in sub.drain(10)] == [2, 0]


async def test_an_ack_in_a_quiet_room_goes_at_once() -> None:
    hub = Hub(SLOW)
    sub = Subscriber("r", "a", "t", limit=100)
    hub.add(sub)
    waiting = asyncio.create_task(sub.wait())
    hub.reply(sub, Item(0, b"ack"))
    assert not await _pending_after_yields(waiting)


def test_the_linger_stretches_only_when_the_event_loop_is_saturated() -> None:
    p = Pacing(frame_cost=25e-6, linger_max=0.005, min_linger=0.001, loaded_from=0.5,
               overload_from=0.85, overload_full=0.97, overload_linger=0.02)
    assert p.linger(10) == p.linger(10, load=0.5) == pytest.approx(250e-6)  # i.e. none
    assert p.linger(10, load=0.6) == p.linger(10, load=0.85) == 0.001  # loaded: a real batch
    assert p.linger(1000, load=0.5) == 0.005  # capped
    assert p.linger(10, load=0.97) == p.linger(10, load=1.0) == pytest.approx(0.02)
    halfway = p.linger(10, load=0.91)
    assert halfway == pytest.approx((0.001 + 0.02) / 2)


async def test_a_saturated_loop_makes_a_busy_room_linger_longer() -> None:
    load = [0.0]
    pacing = Pacing(frame_cost=1e-4, linger_max=0.005, busy_window=60.0, overload_linger=0.3)
    hub, [sub] = await _busy_room(hub=Hub(pacing, load=lambda: load[0]))

    async def held_for(i: int) -> float:
        t = asyncio.get_running_loop().time()
        hub.publish("r", _item(i))
        await asyncio.wait_for(sub.wait(), 10)
        sub.drain(10)
        return asyncio.get_running_loop().time() - t

    assert await held_for(2) < 0.1  # the normal linger: 100 us for one subscriber
    load[0] = 1.0
    assert await held_for(3) >= 0.25  # saturated: the overload linger


def test_the_loop_load_is_low_when_waiting_and_high_when_running_callbacks() -> None:
    async def scenario() -> tuple[float, float]:
        load = LoopLoad(asyncio.get_running_loop(), window=0.02)
        for _ in range(10):  # waiting: the loop sits in select
            await asyncio.sleep(0.02)
            load()
        waiting = load()
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:  # working: callbacks back to back
            time.sleep(0.002)
            await asyncio.sleep(0)
            load()
        return waiting, load()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        waiting, working = runner.run(scenario())
    assert waiting < 0.3
    assert working > 0.8


def test_the_loop_load_counts_cpu_the_other_threads_use_while_the_loop_waits() -> None:
    # With helper threads that yield to the loop (yield_helper_threads), gRPC's threads do
    # their work while the loop sits in select: the loop's own measure reads idle.
    stop = threading.Event()

    def burn() -> None:
        block = b"x" * 1_000_000
        while not stop.is_set():
            hashlib.sha256(block).digest()  # releases the GIL: pure CPU beside the loop

    async def scenario() -> float:
        load = LoopLoad(asyncio.get_running_loop(), window=0.02)
        for _ in range(10):
            await asyncio.sleep(0.02)
            load()
        return load()

    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread, so the loop's share is of one core
    helper = threading.Thread(target=burn)
    helper.start()
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            assert runner.run(scenario()) > 0.8
    finally:
        stop.set()
        helper.join()
        os.sched_setaffinity(0, allowed)


def test_helper_threads_yield_to_the_loop_thread_which_keeps_its_policy() -> None:
    # In a child: the policy applies to every thread of the process it runs in.
    script = """
import os, threading
from tsnetchat.loop import yield_helper_threads
started, stop = threading.Event(), threading.Event()
def helper():
    started.set(); stop.wait()
t = threading.Thread(target=helper); t.start(); started.wait()
changed = yield_helper_threads()
print(changed, os.sched_getscheduler(t.native_id) == os.SCHED_BATCH,
      os.sched_getscheduler(0) == os.SCHED_OTHER)
stop.set(); t.join()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    assert int(out[0]) >= 1
    assert out[1:] == ["True", "True"]


def test_where_the_policy_cannot_be_set_the_server_says_so_and_carries_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def forbidden(*_: Any) -> None:  # as under a seccomp filter without sched_setscheduler
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", forbidden)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        assert yield_helper_threads() == 0
    finally:
        stop.set()
        helper.join()
    assert "helper threads keep their scheduling: [Errno 1] Operation not permitted" \
        in caplog.text


def test_frozen_startup_heap_is_skipped_but_later_garbage_is_still_collected() -> None:
    class Node:
        ref: object = None

    def cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.ref, b.ref = b, a
        return weakref.ref(a)

    before = cycle()  # garbage at startup is collected, not frozen for ever
    try:
        freeze_startup_heap()
        assert before() is None
        assert gc.get_freeze_count() > 1000
        after = cycle()
        gc.collect()
        assert after() is None
    finally:
        gc.unfreeze()


async def test_the_loop_load_reads_zero_on_a_loop_it_cannot_measure() -> None:
    load = LoopLoad(asyncio.get_running_loop(), window=0.0)
    time.sleep(0.01)
    assert load() == 0.0


# --- policy -------------------------------------------------------------------------------


def who(login: str = "alice@t", tags: tuple[str, ...] = (), cap: object = None) -> WhoIs:
    return WhoIs(login=login, display_name="A", node_name="n", node_id="1", tags=tags,
                 addresses=(), cap_map={"example.com/cap/tsnetchat": cap} if cap else {})


def claims(sub: str = "alice@t", rooms: tuple[str, ...] = ("*",), admin: bool = False
           ) -> auth.Claims:
    return auth.Claims(sub, frozenset(rooms), admin, "j", 0, 9)


def test_grants_combine_as_a_union_and_ignore_malformed_values() -> None:
    g = auth.grant_from_capmap({"c": [{"rooms": ["a"]}, {"rooms": ["b"], "admin": True},
                                      "junk", {"rooms": "x"}]}, "c")
    assert g == auth.Grant(frozenset({"a", "b"}), True)
    assert auth.grant_from_capmap({}, "c") is None


@pytest.mark.parametrize("token_rooms,grant_rooms,expect", [
    (("*",), ["general", "ops"], {"general", "ops"}),
    (("general", "ops"), ["*"], {"general", "ops"}),
    (("general", "ops"), ["ops", "random"], {"ops"}),
])
def test_rights_are_token_intersect_grant(token_rooms: tuple[str, ...], grant_rooms: list[str],
                                          expect: set[str]) -> None:
    p = auth.authorize(who(cap=[{"rooms": grant_rooms, "admin": True}]),
                       claims(rooms=token_rooms, admin=True), auth.grant_from_capmap(
                           {"g": [{"rooms": grant_rooms, "admin": True}]}, "g"),
                       require_grant=False)
    assert p.rooms == frozenset(expect) and p.admin and p.grant_applied


def test_empty_intersection_and_missing_required_grant_are_denied() -> None:
    with pytest.raises(PermissionDenied, match="no room in common"):
        auth.authorize(who(), claims(rooms=("a",)), auth.Grant(frozenset({"b"}), False),
                       require_grant=False)
    with pytest.raises(PermissionDenied, match="no app capability grant"):
        auth.authorize(who(), claims(), None, require_grant=True)


def test_tagged_devices_match_by_tag_not_login() -> None:
    bot = who(login="tagged-devices", tags=("tag:bot",))
    assert auth.authorize(bot, claims(sub="tag:bot"), None, require_grant=False).login == "tag:bot"
    with pytest.raises(Unauthenticated):
        auth.authorize(bot, claims(sub="tagged-devices"), None, require_grant=False)


def test_tokens_verify_with_a_fixed_clock() -> None:
    key = b"k" * 64
    tok, _ = auth.issue_token(key, "alice@t", ["general"], ttl_seconds=60, now=1000)
    assert auth.verify_token(key, tok, now=1030).subject == "alice@t"
    with pytest.raises(Unauthenticated, match="expired"):
        auth.verify_token(key, tok, now=2000)
    with pytest.raises(Unauthenticated, match="not valid yet"):
        auth.verify_token(key, tok, now=900)
    with pytest.raises(ConfigError):
        auth.issue_token(key, "alice@t", ["Bad Room"], ttl_seconds=60)


def test_key_file_is_created_private_and_refused_when_open(tmp_path: Path) -> None:
    path = tmp_path / "state" / "jwt.key"
    key = auth.load_or_create_key(path)
    assert len(key) == 64 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert auth.load_or_create_key(path) == key
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.load_or_create_key(path)


# --- client token store ------------------------------------------------------------------


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "tokens.json"
    save_token("Chat-Server.", "saved", store)
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    monkeypatch.delenv("TSNETCHAT_TOKEN", raising=False)
    assert find_token("chat-server", path=store) == "saved"
    monkeypatch.setenv("TSNETCHAT_TOKEN", "env")
    assert find_token("chat-server", path=store) == "env"
    f = tmp_path / "t"
    f.write_text("file\n")
    assert find_token("chat-server", token_file=f, path=store) == "file"
    assert find_token("chat-server", token="flag", token_file=f, path=store) == "flag"
    monkeypatch.delenv("TSNETCHAT_TOKEN")
    with pytest.raises(Unauthenticated, match="no token for other"):
        find_token("other", path=store)
    os.chmod(store, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_store(store)


# --- storage ------------------------------------------------------------------------------


def test_retention_keeps_ids_increasing_and_never_reused(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    a = Sender("a", "A", "n")
    for i in range(10):
        s.append("r", a, 1, f"m{i}", now_ms=1000 * i)
    assert s.prune(keep_count=3, keep_days=0) == 7
    assert [m.id for m in s.after("r", 0, 100)] == [8, 9, 10]
    s.close()
    s = Store(tmp_path / "db")
    assert s.append("r", a, 1, "next")[0].id == 11
    assert s.prune(keep_count=0, keep_days=1, now=10**6) == 3  # m7..m9 are old by then
    s.close()


def test_checkpoints_run_beside_the_writer_and_the_wal_stays_bounded(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    a = Sender("a", "A", "n")
    rounds = 40  # back to back, as a saturated server writes
    one_round = 0
    for i in range(rounds * Store.CHECKPOINT_EVERY):
        s.append("r", a, 1, f"m{i}", f"k{i}")
        if i == Store.CHECKPOINT_EVERY - 2:
            one_round = (tmp_path / "db-wal").stat().st_size  # before any checkpoint
    assert s.checkpointer is not None and s.checkpointer.runs >= 1
    # Without a checkpoint that catches up the WAL would hold all forty rounds of commits.
    assert (tmp_path / "db-wal").stat().st_size < rounds * one_round / 3
    s.close()
    assert [m.id for m in Store(tmp_path / "db").after("r", 3995, 10)] == [3996, 3997, 3998,
                                                                             3999, 4000]


def test_deferred_appends_are_invisible_until_commit_then_call_back_in_order(
        tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    other = sqlite3.connect(tmp_path / "db")  # what a crash would leave behind
    done: list[tuple[int, bool, StoreError | None]] = []
    for i in range(3):
        s.append_later("r", Sender("a", "A", "n"), 1, f"m{i}", f"k{i}",
                       lambda m, dup, err: done.append((m.id, dup, err)))
    s.append_later("r", Sender("a", "A", "n"), 1, "m1", "k1",  # a resend in the same group
                   lambda m, dup, err: done.append((m.id, dup, err)))
    assert done == [] and s.waiting == 4
    assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    s.commit()
    assert done == [(1, False, None), (2, False, None), (3, False, None), (2, True, None)]
    assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 3
    other.close()
    s.close()


def test_any_other_store_call_commits_deferred_appends_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    done: list[int] = []
    s.append_later("r", Sender("a", "A", "n"), 1, "early", "", lambda m, d, e: done.append(m.id))
    assert [m.text for m in s.after("r", 0, 10)] == ["early"]  # committed for the read,
    assert done == [1]  # and the sender was told first
    assert s.append("r", Sender("a", "A", "n"), 1, "next")[0].id == 2
    s.close()


def test_a_failed_group_commit_loses_the_whole_group_and_says_so(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    a = Sender("a", "A", "n")
    s.append("r", a, 1, "kept")
    real = s._db

    class FullDisk:  # the connection, except that COMMIT fails as on a full disk
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    s._db = FullDisk()  # type: ignore[assignment]
    errors: list[str] = []
    for i in range(2):
        s.append_later("r", a, 1, f"lost{i}", "", lambda m, d, e: errors.append(str(e)))
    s.commit()
    assert errors == ["history database error: database or disk is full"] * 2
    s._db = real
    assert s.last_id("r") == 1  # the lost ids were never seen by anyone
    assert [m.text for m in s.after("r", 0, 10)] == ["kept"]
    assert s.append("r", a, 1, "after")[0].id == 2
    s.close()


def test_embedded_auth_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tsnetchat.embedded import find_auth_key

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "authkey").write_text("tskey-from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert find_auth_key(load_config(file=None, env={})) == "tskey-from-systemd"
    f = tmp_path / "k"
    f.write_text("tskey-from-file")
    assert find_auth_key(load_config(file=None, env={}, flags={"auth_key_file": str(f)})) \
        == "tskey-from-file"
    assert find_auth_key(load_config(file=None, env={"TSNETCHAT_AUTH_KEY": "tskey-env"})) \
        == "tskey-env"
    with pytest.raises(ConfigError, match="--auth-key-file"):
        find_auth_key(load_config(file=None, env={}, flags={"auth_key_file": str(tmp_path / "x")}))
