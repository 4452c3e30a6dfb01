"""The two locks' pure policy: tokens, grants, keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsnetchat import auth
from tsnetchat.errors import ConfigError, PermissionDenied, Unauthenticated
from tsnetchat.tailnet import WhoIs

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
