"""Mentions (tsnetchat.rooms.Mentions): who a text names, as the ledger stores it; and a
DM's name (rooms.dm_room)."""

from __future__ import annotations

import random

import pytest

from tsnetchat.errors import InvalidInput
from tsnetchat.rooms import Mentions, dm_room

PEOPLE = {"alice@example.com": "Alice Smith", "bob@example.com": "Bob",
          "tag:build@example.com": "", "o'neil@example.com": "Kim O'Neil"}


def test_a_person_is_mentioned_by_login_short_login_or_display_name_in_any_case() -> None:
    m = Mentions(PEOPLE)
    assert m.find("ask @alice") == ("alice@example.com",)
    assert m.find("ALICE@EXAMPLE.COM, see this") == ("alice@example.com",)
    assert m.find("thanks alice smith and BOB.") == ("alice@example.com", "bob@example.com")
    assert m.find("kim o'neil?") == ("o'neil@example.com",)
    assert m.find("tag:build@example.com failed") == ("tag:build@example.com",)


def test_a_name_inside_a_longer_word_or_address_is_not_a_mention() -> None:
    m = Mentions(PEOPLE)
    for text in ("alices", "malice", "alice.b@example.com", "bob-the-builder", "bob@other",
                 "xbob", "nobody here", ""):
        assert m.find(text) == (), text


def test_texts_decided_without_the_pattern_are_decided_as_the_pattern_would() -> None:
    """Most texts are decided from their words alone; a non-ASCII name makes every text go
    through the pattern: both must agree, whatever the text."""
    rng = random.Random(19)
    fast = Mentions(PEOPLE)
    slow = Mentions({**PEOPLE, "zoe@example.com": "Zoë"})
    pieces = ["alice", "Alice", "@bob", "bob", "smith", "example.com", "o'neil", "kim", ".",
              ",", "-", "@", "b", "tag:build", "x", " ", " ", " ", "é", "\n", "Bob."]
    for _ in range(3000):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 8)))
        assert fast.find(text) == tuple(x for x in slow.find(text) if x != "zoe@example.com"), text
    assert slow.find("hi zoë") == ("zoe@example.com",)


def test_a_direct_conversation_with_only_oneself_is_refused_naming_oneself() -> None:
    """It said "needs somebody else: dm:bob@example.com" to `tsnetchat dm <own login>`."""
    with pytest.raises(InvalidInput, match=r"^a direct conversation needs somebody other than "
                                           r"you \(alice@x\.test\): name them by their login$"):
        dm_room("alice@x.test", "dm:alice@x.test", 8)
    assert dm_room("bob@x.test", "dm:alice@x.test", 8) == "dm:alice@x.test,bob@x.test"
