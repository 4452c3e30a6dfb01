"""The client's sending and resuming logic without gRPC: the outbox, the pacer, the cursor,
the stream state machine, and the error boundary's classification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tsnetchat import clientcmds
from tsnetchat.client import Link
from tsnetchat.clienterrors import ClientError, from_status, refusal, retry_hint, translate
from tsnetchat.errors import RESUME_HINT, LocalAPIUnavailable, PeerNotFound, TailnetNotReady
from tsnetchat.outbox import Outbox, Pacer, State, split_text, utf8_len, with_newlines
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.resume import (
    FROM_NOW,
    SAME_TOKEN_FIRST,
    SAME_TOKEN_MOST,
    Cursor,
    Phase,
    StreamState,
    worst,
)

TEXT = 1

# --- the outbox ---------------------------------------------------------------------------


def test_a_submitted_message_stays_pending_until_acknowledged() -> None:
    box = Outbox()
    a = box.add("a", TEXT)
    assert box.pending == [a] and a.state is State.QUEUED
    assert box.head() is a
    box.sending(a)
    assert box.pending == [a] and a.state is State.SENDING
    assert box.acked(a.client_msg_id) is a
    assert box.pending == [] and len(box) == 0


def test_one_message_is_in_flight_at_a_time_so_order_is_kept() -> None:
    box = Outbox()
    a, b, c = (box.add(t, TEXT) for t in "abc")
    assert box.head() is a
    box.sending(a)
    assert box.head() is None  # b waits for a's answer
    box.refused(a.client_msg_id, for_good=False, not_before=5.0)
    assert box.head() is a and a.not_before == 5.0  # a "slow down" keeps a first
    box.sending(a)
    box.acked(a.client_msg_id)
    assert box.head() is b
    box.sending(b)
    box.acked(b.client_msg_id)
    assert box.head() is c


def test_a_message_refused_for_good_keeps_its_text_and_does_not_block_the_rest() -> None:
    box = Outbox()
    a, b = box.add("x" * 5000, TEXT), box.add("b", TEXT)
    box.sending(a)
    box.refused(a.client_msg_id, for_good=True, reason="too long")
    assert a.state is State.FAILED and a.error == "too long" and a.text == "x" * 5000
    assert box.failed == [a] and box.pending == [b]
    assert box.head() is b
    box.sending(b)
    box.acked(b.client_msg_id)
    assert box.failed == [a]  # still there, for editing or /retry
    key = a.client_msg_id
    assert box.retry() == [a]
    assert a.state is State.QUEUED and a.error == "" and a.client_msg_id != key
    box.refused(a.client_msg_id, for_good=True, reason="again")
    box.discard(a)
    assert len(box) == 0


def test_a_drop_resends_what_was_in_flight_first_with_the_same_key() -> None:
    box = Outbox()
    a = box.add("a", TEXT)
    box.add("b", TEXT)
    box.sending(a)
    key = a.client_msg_id
    box.disconnected()
    assert box.head() is a and a.client_msg_id == key and a.attempts == 1
    box.sending(a)
    assert a.attempts == 2
    assert [o.text for o in box.pending] == ["a", "b"]


def test_an_unknown_acknowledgement_changes_nothing() -> None:
    box = Outbox()
    a = box.add("a", TEXT)
    assert box.acked("not-ours") is None
    assert box.refused("not-ours", for_good=True) is None
    assert box.pending == [a]


# --- pacing -------------------------------------------------------------------------------


def test_the_pacer_sends_a_burst_then_stays_below_the_servers_rate() -> None:
    p = Pacer(burst=20, rate=5.0)
    now = 100.0
    sent_at = []
    while len(sent_at) < 50:
        wait = p.delay(now)
        if wait:
            now += wait
            continue
        p.take(now)
        sent_at.append(now)
    # The server's bucket (20, 5/s) would accept every one of these, with room to spare.
    tokens, last = 20.0, sent_at[0]
    for t in sent_at:
        tokens = min(20.0, tokens + (t - last) * 5.0)
        last = t
        assert tokens >= 1, t
        tokens -= 1
    assert sent_at[18] == 100.0 and sent_at[19] > 100.0  # a burst of 19, then paced
    assert sent_at[-1] - sent_at[19] == pytest.approx(30 / 4.5)


def test_a_rate_refusal_holds_every_send_until_the_servers_hint() -> None:
    p = Pacer(burst=20, rate=5.0)
    assert p.delay(0.0) == 0
    p.refused(0.0, 1.5)
    assert p.delay(0.0) == pytest.approx(1.5)
    assert p.delay(1.0) == pytest.approx(0.5)
    assert p.delay(1.5) == 0  # refilled enough by then
    p.take(1.5)


def test_an_advertised_limit_replaces_the_defaults_without_refunding_tokens() -> None:
    p = Pacer()
    for _ in range(19):
        p.take(0.0)
    p.configure(100, 50.0)
    assert p.burst == 99 and p.rate == pytest.approx(45.0)
    assert p.delay(0.0) > 0  # what was spent stays spent


def test_a_long_paste_is_split_between_lines_then_words_within_the_limit() -> None:
    text = "\n".join(f"line {i} " + "word " * 30 for i in range(40))
    parts = split_text(text, 1000)
    assert all(utf8_len(p) <= 1000 for p in parts)
    assert len(parts) == 7 and "\n".join(parts) == text  # whole lines, none cut
    one_line = "é" * 3000  # 6000 bytes, no spaces
    cut = split_text(one_line, 4096)
    assert [utf8_len(p) for p in cut] == [4096, 1904] and "".join(cut) == one_line
    words = " ".join(["abcdefghi"] * 100)
    assert all(not p.startswith(" ") and utf8_len(p) <= 95 for p in split_text(words, 95))
    assert " ".join(split_text(words, 95)) == words


def test_a_paste_cut_between_characters_never_parts_an_accent_a_joined_emoji_or_a_flag(
        ) -> None:
    """An accent cut from its letter began the next message, drawn on nothing (a new user's
    day, 2026-11-24)."""
    for text, limit in (("e\u0301" * 3000, 4096), ("\U0001F1EB\U0001F1F7" * 1000, 4100),
                        ("\U0001F469\u200d\U0001F4BB" * 1000, 4097),
                        ("\U0001F44B\U0001F3FD" * 1000, 4100),
                        ("\u2615\ufe0f" * 2000, 4101),  # a variation selector
                        ("\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074"
                         "\U000E007F" * 300, 4100),  # a subdivision flag's tags
                        ("\u1100\u1161\u11a8" * 2000, 4100),  # Korean, decomposed
                        ("\u0915\u094d\u200c" * 1000, 4101)):  # a virama, a ZWNJ
        parts = split_text(text, limit)
        assert "".join(parts) == text and len(parts) > 1
        assert all(utf8_len(p) <= limit for p in parts)
        assert all(p[0] == text[0] for p in parts), [p[:2] for p in parts]
    only_accents = "\u0301" * 3000  # nothing to keep them with: cut where they fit
    assert [utf8_len(p) for p in split_text(only_accents, 4096)] == [4096, 1904]


# --- the cursor -----------------------------------------------------------------------------


@dataclass
class Msg:
    id: int


def test_the_cursor_shows_each_message_once_in_order_across_replays() -> None:
    c = Cursor()
    assert c.resume_after() is None  # first join: the server's backlog
    assert [m.id for m in c.accept([Msg(1), Msg(2), Msg(3)])] == [1, 2, 3]
    assert c.resume_after() == 3
    # After a reconnect the server replays from 3; anything at or below is not shown again.
    assert [m.id for m in c.accept([Msg(2), Msg(3), Msg(4)])] == [4]


def test_from_now_starts_after_the_rooms_newest_message() -> None:
    c = Cursor(from_now=True)
    assert c.resume_after() == FROM_NOW
    c.replay_done(41)
    assert c.resume_after() == 41
    assert [m.id for m in c.accept([Msg(42)])] == [42]
    assert Cursor(7, from_now=True).resume_after() == 7  # an explicit start wins


def test_a_start_past_the_end_is_told_apart_from_a_history_that_went_back() -> None:
    typed = Cursor(100000)  # tail --after 100000, in a room whose newest message is 9
    assert typed.check_history("h1", 1, 9) == ("there is no message 100000 to start after: "
                                                "the server's history ends at message 9")
    assert typed.last_id is None  # the room from what the server has
    shown = Cursor()
    shown.check_history("h1", 1, 0)
    shown.accept([Msg(1), Msg(2), Msg(12)])
    assert shown.check_history("", 0, 9) == (
        "the server's history ends at message 9, before the last one shown here (12): it was "
        "restored or replaced")


# --- the stream state machine ---------------------------------------------------------------


def retryable(msg: str = "down", **kw: object) -> ClientError:
    return ClientError(msg, retryable=True, **kw)  # type: ignore[arg-type]


def test_a_fail_fast_stream_fails_on_its_first_error_whatever_it_is() -> None:
    s = StreamState()
    assert s.lost(retryable(), 0.0, 0.5) is None
    assert s.phase is Phase.FAILED and str(s.error) == "down"


def unreachable(msg: str = "cannot reach chat-server") -> ClientError:
    return ClientError(msg, retryable=True, transport=True)


def test_a_fail_fast_stream_tries_again_on_the_way_to_the_server_until_its_grace_ends() -> None:
    s = StreamState(grace=8.0)
    assert s.lost(unreachable(), 100.0, 0.5) == 0.5
    assert s.phase is Phase.RECONNECTING
    assert s.lost(unreachable(), 101.0, 0.5) == 1.0
    assert s.lost(unreachable(), 103.0, 0.5) == 2.0
    # The backoff (4 s) would overrun the grace: the last attempt starts as it ends.
    assert s.lost(unreachable(), 106.5, 0.5) == pytest.approx(1.5)
    assert s.phase is Phase.RECONNECTING
    # That one failed too, 8 s after the first failure: over, with its reason.
    assert s.lost(unreachable("still down"), 108.2, 0.5) is None
    assert s.phase is Phase.FAILED and str(s.error) == "still down"


def test_within_its_grace_a_fail_fast_stream_still_takes_a_refusal_as_final() -> None:
    s = StreamState(grace=8.0)
    assert s.lost(unreachable(), 0.0, 0.5) is not None
    assert s.lost(retryable("the server is shutting down"), 1.0, 0.5) is None  # an answer
    s = StreamState(grace=8.0)
    assert s.lost(ClientError("token revoked", retryable=False, transport=True), 0.0, 0.5) is None
    assert s.phase is Phase.FAILED


def test_once_connected_the_way_to_the_server_failing_is_never_final_but_a_refusal_is(
        ) -> None:
    """This machine's tailscaled down for 6 s: discovery said "cannot find 'chat-server' on
    the tailnet" (not retryable: a typo before the first connection) and the room closed."""
    s = StreamState(grace=8.0)
    s.connected(0.0)
    gone = ClientError("cannot find 'chat-server' on the tailnet", retryable=False,
                       transport=True)
    for t in (10.0, 11.0, 13.0, 30.0):
        assert s.lost(gone, t, 0.5) is not None and s.phase is Phase.RECONNECTING
    assert s.lost(ClientError("token revoked", retryable=False), 31.0, 0.5) is None
    assert s.phase is Phase.FAILED


def test_a_stream_waiting_for_a_new_token_says_so_and_reports_the_outage_when_back() -> None:
    s = StreamState()
    s.connected(0.0)
    revoked = ClientError("token lock: revoked", retryable=False)
    assert s.lost(revoked, 10.0, 0.5) is None  # (final, unless something may mend it)
    s.waiting(ClientError("token lock: revoked (this chat carries on ...)", retryable=False),
              10.0)
    assert s.phase is Phase.WAITING
    assert s.describe(11.0).startswith("waiting (this token tried again in 9s): token lock")
    assert worst([s, StreamState()]) is s
    s.connecting()
    assert s.connected(40.0) == pytest.approx(30.0)


def test_a_stream_waiting_for_a_token_tries_the_same_one_again_ever_less_often_saying_it_once(
        ) -> None:
    s = StreamState()
    s.connected(0.0)
    wrong_key = ClientError("token lock: the signature does not match", retryable=False)
    waits, said = [], []
    for i in range(8):
        s.connecting()
        said.append(s.waiting(wrong_key, 10.0 + i))
        waits.append(s.retry_at - (10.0 + i))
    assert waits == [min(SAME_TOKEN_MOST, SAME_TOKEN_FIRST * 2**i) for i in range(8)]
    assert waits[0] < waits[1] < waits[2] and waits[-2] == waits[-1] == SAME_TOKEN_MOST
    assert said == [True] + [False] * 7  # said once
    assert s.waiting(ClientError("token lock: revoked", retryable=False), 20.0)  # news
    s.connecting()
    s.connected(30.0)
    assert s.waiting(wrong_key, 40.0) and s.retry_at == 40.0 + SAME_TOKEN_FIRST  # a new outage


def test_a_first_success_after_failed_attempts_is_not_reported_as_a_reconnect() -> None:
    s = StreamState(grace=8.0)
    s.lost(unreachable(), 0.0, 0.5)
    assert s.connected(2.0) is None  # nothing was lost before the first success
    s.lost(unreachable(), 10.0, 0.5)
    assert s.connected(13.0) == pytest.approx(3.0)


def test_reconnecting_backs_off_with_a_countdown_and_resets_on_success() -> None:
    s = StreamState(first=0.5, max_backoff=5.0)
    s.connected(0.0)
    delays = [s.lost(retryable(), 10.0, 0.5) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert s.phase is Phase.RECONNECTING and s.attempts == 6
    assert s.countdown(12.0) == pytest.approx(3.0)
    assert s.describe(12.0) == "reconnecting in 3s: down"
    s.connecting()
    assert s.describe(13.0) == "reconnecting now: down"  # the attempt is under way
    assert s.connected(25.0) == pytest.approx(15.0)  # the outage it ended
    assert s.phase is Phase.CONNECTED and s.attempts == 0 and s.error is None
    assert s.lost(retryable(), 30.0, 0.0) == 0.25  # jitter: half to one and a half


def test_a_refusal_after_being_connected_is_final_and_a_hint_is_respected() -> None:
    s = StreamState()
    s.connected(0.0)
    assert s.lost(retryable("slow", retry_after=7.0), 1.0, 0.0) == 7.0
    assert s.lost(ClientError("token revoked", retryable=False), 2.0, 0.0) is None
    assert s.phase is Phase.FAILED and s.describe(2.0) == "failed: token revoked"
    s.close()
    assert s.lost(retryable(), 3.0, 0.0) is None and s.phase is Phase.CLOSED


def test_the_status_bar_speaks_of_the_worst_stream() -> None:
    ok, down = StreamState(), StreamState()
    ok.connected(0.0)
    down.connected(0.0)
    down.lost(retryable(), 1.0, 0.0)
    assert worst([ok, down]) is down and worst([ok]) is ok and worst([]) is None


# --- the error boundary ---------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    name: str = "chat-server"
    port: int = 50051
    mode: str = "proxy"


@pytest.mark.parametrize("details", [
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:59493: HTTP "
    "proxy returned response code 500",
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:100.64.0.1:50051: "
    "Connection refused",
    "Socket closed",
])
def test_nothing_listening_on_the_port_is_said_plainly(details: str) -> None:
    e = from_status(grpc.StatusCode.UNAVAILABLE, details, Where(mode="direct"))
    assert str(e) == ("chat-server is on the tailnet but nothing answers on port 50051: is "
                      "`tsnetchat serve` running there?")
    assert e.retryable and e.transport and e.exit_code == 7


def test_grpc_aio_losing_the_status_of_a_stream_that_just_ended_counts_as_a_broken_connection(
        ) -> None:
    e = from_status(grpc.StatusCode.INTERNAL, "Internal error from Core", Where())
    assert e.retryable and e.transport and "Core" not in str(e)


def test_a_keepalive_ping_unanswered_is_a_broken_connection_not_the_servers_words() -> None:
    """`tail` stopped for 22 s printed "connection lost: ping timeout; reconnecting": gRPC
    core's words for its own PING, taken for the server's (a daily user's day, 2026-11-25)."""
    e = from_status(grpc.StatusCode.UNAVAILABLE, "ping timeout", Where())
    assert str(e) == "cannot reach chat-server on port 50051: the connection failed or broke"
    assert e.retryable and e.transport


def test_the_local_proxy_refusing_is_blamed_on_the_local_tailscaled() -> None:
    e = from_status(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last "
                    "error: UNAVAILABLE: ipv4:127.0.0.1:1055: Connection refused", Where(),
                    proxy="127.0.0.1:1055")
    assert "this machine's tailscaled proxy (127.0.0.1:1055)" in str(e) and e.retryable


@pytest.mark.parametrize(("code", "exit_code", "retry"), [
    (grpc.StatusCode.UNAUTHENTICATED, 5, False),
    (grpc.StatusCode.PERMISSION_DENIED, 6, False),
    (grpc.StatusCode.INVALID_ARGUMENT, 2, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 1, True),
    (grpc.StatusCode.UNAVAILABLE, 7, True),
])
def test_the_servers_own_words_are_kept_with_an_exit_code(code: grpc.StatusCode,
                                                          exit_code: int, retry: bool) -> None:
    e = from_status(code, "token lock: expired; ask for a new one", Where())
    assert str(e) == "token lock: expired; ask for a new one"
    assert (e.exit_code, e.retryable, e.transport) == (exit_code, retry, False)
    assert "StatusCode" not in str(e) and code.name not in str(e)


def test_a_closing_servers_hint_for_client_code_is_not_shown_to_people() -> None:
    # (tsnetchat resumes by itself: `tail` printed "...; reconnect and resume after your last
    # message id; reconnecting", an instruction its reader could not follow.)
    e = from_status(grpc.StatusCode.UNAVAILABLE, "server shutting down" + RESUME_HINT, Where())
    assert str(e) == "server shutting down" and e.retryable


def test_a_damaged_servers_history_is_said_as_it_is_and_not_waited_for() -> None:
    # (it read as "the server does not answer", exit 7: an operator's run, 2026-11-24)
    said = "the history database /var/lib/tsnetchat/tsnetchat.db is damaged (...)"
    e = from_status(grpc.StatusCode.DATA_LOSS, said, Where())
    assert (str(e), e.retryable, e.exit_code) == (said, False, 1)
    r = refusal(grpc.StatusCode.DATA_LOSS.value[0], said)
    assert (str(r), r.retryable) == (said, False)


def test_tailnet_errors_say_whether_waiting_helps() -> None:
    assert translate(LocalAPIUnavailable("no tailscaled")).retryable
    assert translate(TailnetNotReady("starting")).retryable
    gone = translate(PeerNotFound("no peer named 'x'; did you mean chat-server?"))
    assert not gone.retryable and gone.exit_code == 4 and "did you mean" in str(gone)


def test_anything_else_becomes_one_plain_line() -> None:
    e = translate(RuntimeError("aclose(): asynchronous generator is already running\nmore"))
    assert str(e) == ("internal error in the client (RuntimeError: aclose(): asynchronous "
                      "generator is already running)")
    assert "\n" not in str(e)


def test_a_rate_refusal_means_wait_and_a_bad_message_means_failed() -> None:
    slow = refusal(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "slow down: at most 5 "
                   "messages/s (bursts of 20); this one was not sent, retry in 0.4s")
    assert slow.retryable and slow.retry_after == pytest.approx(0.4)
    lost = refusal(grpc.StatusCode.UNAVAILABLE.value[0], "disk full; send it again", 1000)
    assert lost.retryable and lost.retry_after == 1.0  # the event's own retry_after_ms
    bad = refusal(grpc.StatusCode.INVALID_ARGUMENT.value[0], "message is 5000 bytes")
    assert not bad.retryable and str(bad) == "message is 5000 bytes"
    assert retry_hint("nothing here") == 0.0


# --- one-shot changes tried again ------------------------------------------------------------


class _Breaking:
    """A connection whose first topic change lands on the server and then breaks on the way
    back (what a blip does to a call): the person's retry must carry the same id."""

    target = None
    metadata = ()

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def set_topic(self, room: str, topic: str, timeout: float = 15, *,
                        client_msg_id: str = "") -> int:
        self.seen.append(client_msg_id)
        if len(self.seen) == 1:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "Socket closed")
        return 7

    async def close(self) -> None:
        pass


async def test_a_topic_change_tried_again_after_a_break_carries_the_same_client_msg_id() -> None:
    seen: list[str] = []
    warned: list[str] = []

    async def dial() -> Any:
        return _Breaking(seen)

    link = Link(dial, name="chat-server")
    out = await clientcmds.change(link, "general", "topic", text="t", json_out=True,
                                  warn=warned.append)
    assert out == '{"id": 7, "room": "general"}'
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0]  # stored once by the server
    assert len(warned) == 1 and warned[0].startswith("cannot reach chat-server yet: trying again")


# --- history: the last N messages ----------------------------------------------------------


class PagedHistory:
    """A room's items by id, served newest first below ``before`` as the server does (a page
    holds at most ``max_page``)."""

    def __init__(self, kinds: str, max_page: int = 200) -> None:
        k = {"m": pb.MESSAGE_KIND_TEXT, "e": pb.MESSAGE_KIND_EDIT,
             "d": pb.MESSAGE_KIND_DELETE, "t": pb.MESSAGE_KIND_TOPIC}
        self.items = [pb.ChatMessage(id=i, kind=k[c]) for i, c in enumerate(kinds, 1)]
        self.max_page = max_page
        self.calls = 0

    async def history(self, room: str, *, before: int | None = None,
                      limit: int = 0) -> pb.HistoryResponse:
        self.calls += 1
        below = [m for m in self.items if before is None or m.id < before]
        n = min(limit, self.max_page)
        page = below[-n:]
        return pb.HistoryResponse(messages=page, more=len(below) > len(page))


@pytest.mark.parametrize("kinds,limit,ids", [
    ("mmmmmeedm", 5, [2, 3, 4, 5, 6, 7, 8, 9]),  # the edits take no place of a message
    ("mmeeeeeeee", 2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),  # a second page for the first two
    ("mtm", 5, [1, 2, 3]),  # fewer than asked: all of them
    ("", 3, []),
])
async def test_history_prints_the_last_n_messages_with_the_changes_among_them(
        kinds: str, limit: int, ids: list[int]) -> None:
    room = PagedHistory(kinds, max_page=3)
    got = await clientcmds.last_messages(room, "general", before=None,  # type: ignore[arg-type]
                                         limit=limit)
    assert [m.id for m in got] == ids


def test_line_and_paragraph_separators_are_sent_as_the_newlines_they_mean() -> None:
    """The server refuses them (a line break where honoured: a line that passes for someone
    else's); copied text has them, and a person means a new line."""
    assert with_newlines("one\u2028two\u2029three") == "one\ntwo\nthree"
    assert with_newlines("crlf one\r\ncrlf two\rmac") == "crlf one\ncrlf two\nmac"


def test_the_newest_message_is_the_one_added_last_while_it_is_still_in_the_outbox() -> None:
    """/edit and /delete refuse to reach past one's newest message only while that one is
    the refused one: an older refusal with stored messages since is not in the way."""
    box = Outbox()
    bad = box.add("ring \x07", pb.MESSAGE_KIND_TEXT)
    box.refused(bad.client_msg_id, for_good=True, reason="control character")
    assert box.newest is bad and bad.state is State.FAILED
    fine = box.add("fine", pb.MESSAGE_KIND_TEXT)
    assert box.newest is fine
    box.acked(fine.client_msg_id)
    assert box.newest is None and box.failed == [bad]


def test_the_status_line_says_the_first_line_of_a_reason_that_lists_what_was_tried() -> None:
    """Discovery's failure goes on with each way it tried; the status bar showed its first
    line and a dangling "tried, in order:" (a kill -9 run, 2026-11-24)."""
    s = StreamState(first=0.5, max_backoff=5.0)
    s.connected(0.0)
    s.lost(ClientError("cannot find chat-server: tailscaled is not running\ntried, in order:\n"
                       "  MagicDNS: no answer", retryable=True, transport=True), 10.0, 0.5)
    assert s.describe(10.0) == ("reconnecting in 0s: cannot find chat-server: tailscaled is "
                                "not running")


def test_a_grpc_error_reaching_the_command_line_goes_through_the_boundary(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`tsnetchat login` lets the stub's error through (tokens.login); the command line
    printed gRPC core's words and the status name ("... Connection refused (UNAVAILABLE)")."""
    from tsnetchat.cli import fail

    raw = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        details="failed to connect to all addresses; last error: UNAVAILABLE: "
                "ipv4:100.64.0.1:50051: Connection refused")
    assert fail(raw).exit_code == 7
    said = capsys.readouterr().err
    assert "nothing answers" in said and "is `tsnetchat serve` running there?" in said
    assert "UNAVAILABLE" not in said and "ipv4" not in said
