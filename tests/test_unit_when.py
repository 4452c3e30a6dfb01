"""`search --since/--until`: dates, times ago, or milliseconds (tsnetchat.commands.when_ms).
Only milliseconds since the epoch were taken: `--since 2026-11-24` was "Input should be a
valid integer" (a newcomer, 2026-11-24)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from helpers import run_cli

from tsnetchat.commands import when_ms

NOW = 1_795_540_000.5  # 2026-11-24T16:26:40.5Z


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


@pytest.fixture
def in_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_milliseconds_since_the_epoch_are_taken_as_they_were() -> None:
    assert when_ms("1700000000000", NOW) == 1_700_000_000_000
    assert when_ms(" 1 ", NOW) == 1


def test_eight_digits_are_a_date_as_iso_8601_writes_it_without_dashes(in_tokyo: None) -> None:
    assert when_ms("20261124", NOW) == when_ms("2026-11-24", NOW)


@pytest.mark.parametrize("text", ["0", "1960-01-01", "999999999w", "1970-01-01T00:00Z"])
def test_a_time_at_or_before_1970_is_refused_not_taken_for_no_bound(text: str) -> None:
    """0 means "not given": the search had no bound at all (a review, 2026-11-24)."""
    with pytest.raises(ValueError, match="is not after 1970"):
        when_ms(text, NOW)


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("2h", 7200), ("2 H", 7200),
                                          ("3d", 259_200), ("1w", 604_800)])
def test_a_time_ago_counts_back_from_now(text: str, seconds: int) -> None:
    assert when_ms(text, NOW) == int((NOW - seconds) * 1000)


def test_a_time_that_names_its_zone_is_that_moment_anywhere(in_tokyo: None) -> None:
    assert when_ms("2026-11-24T09:30Z", NOW) == ms(2026, 11, 24, 9, 30)
    assert when_ms("2026-11-24T09:30+01:00", NOW) == ms(2026, 11, 24, 8, 30)


def test_a_date_or_time_without_a_zone_is_this_machines_local_time(in_tokyo: None) -> None:
    assert when_ms("2026-11-24", NOW) == ms(2026, 11, 23, 15, 0)  # midnight in Tokyo
    assert when_ms("2026-11-24T09:00", NOW) == ms(2026, 11, 24, 0, 0)
    assert when_ms("2026-11-24 09:00", NOW) == ms(2026, 11, 24, 0, 0)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "5 fortnights", "-2h", "",
                                  "0001-01-01", "²³"])
def test_anything_else_is_refused_naming_the_forms_it_may_take(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time: give a date or time \(2026-11-24"):
        when_ms(text, NOW)


def test_search_refuses_a_bad_time_before_dialling_and_names_the_flag() -> None:
    out = run_cli("search", "chat-server", "deploy", "--since", "yesterday")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--since: 'yesterday' is not a time" in " ".join(out.stderr.split()), out.stderr
    out = run_cli("search", "chat-server", "deploy", "--until", "99999-01-01")
    assert out.returncode == 2 and "--until: '99999-01-01' is not a time" in " ".join(
        out.stderr.split()), out.stderr


def test_a_local_time_past_the_last_one_python_knows_is_refused_in_words(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In New York, 9999-12-31T23:59 is past year 9999 in UTC: "unexpected OverflowError
    ... This is a bug" (a review, 2026-11-24)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        with pytest.raises(ValueError, match="is not a time"):
            when_ms("9999-12-31T23:59", NOW)
    finally:
        monkeypatch.undo()
        time.tzset()
