"""The two locks' pure policy: tokens, grants, keys."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from tsnetchat import auth
from tsnetchat.errors import ConfigError, PermissionDenied, Unauthenticated
from tsnetchat.tailnet import WhoIs

# --- policy -------------------------------------------------------------------------------


def who(login: str = "alice@t", tags: tuple[str, ...] = (), cap: object = None) -> WhoIs:
    return WhoIs(login=login, display_name="A", node_name="n", node_id="1", tags=tags,
                 addresses=(), cap_map={"example.com/cap/tsnetchat": cap} if cap else {})


def claims(sub: str = "alice@t", rooms: tuple[str, ...] = ("*",), admin: bool = False,
           jti: str = "j") -> auth.Claims:
    return auth.Claims(sub, frozenset(rooms), admin, jti, 0, 9)


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


def test_a_login_token_whose_grant_is_gone_gets_no_more_than_a_login_without_a_grant(
        ) -> None:
    sized = claims(rooms=("general", "ops"), admin=True, jti=auth.LOGIN_ID_PREFIX + "1")
    narrowed = auth.authorize(who(), sized, auth.Grant(frozenset({"general"}), False),
                              require_grant=False)
    assert (narrowed.rooms, narrowed.admin) == (frozenset({"general"}), False)
    # enroll = grant (or off): the token lasted as long as its grant
    with pytest.raises(PermissionDenied, match="lasts only as long as the grant"):
        auth.authorize(who(), sized, None, require_grant=False)
    # enroll = any: its rooms, as a login without a grant, and never admin
    p = auth.authorize(who(), sized, None, require_grant=False, logins_need_grant=False)
    assert (p.rooms, p.admin) == (frozenset({"general", "ops"}), False)
    # an admin's token is as it was: the grant narrows it only where there is one
    issued = auth.authorize(who(), claims(admin=True), None, require_grant=False)
    assert issued.admin and issued.rooms == frozenset({"*"})


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


def test_only_the_call_that_made_the_key_says_it_did(tmp_path: Path) -> None:
    """A server whose start fails removes a key only if it made it (server.Server)."""
    path = tmp_path / "state" / "jwt.key"
    assert auth.create_key(path) is True
    made = path.read_bytes()
    assert auth.create_key(path) is False and path.read_bytes() == made
    assert sorted(p.name for p in path.parent.iterdir()) == ["jwt.key"]  # nothing aside


# --- tokens: strict, and nothing a client sends raises anything else -------------------


def _b64(d: object) -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def _b64_raw(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"sub": "alice@t", "rooms": ["general"], "admin": False,
                               "jti": "j1", "iat": 1000, "nbf": 1000, "exp": 2000,
                               "iss": "tsnetchat", "aud": "tsnetchat"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("header", [
    {"alg": "HS256", "crit": ["exp"]}, {"alg": "HS256", "kid": 5}, {"alg": "HS256", "kid": "k"},
    {"alg": "HS256", "jku": "http://evil/"}, {"alg": "HS256", "typ": "JWS"},
    {"alg": "HS256", "b64": False}, {"alg": ["HS256"]}, {"alg": None}, [1, 2], "x", 5,
])
def test_any_header_but_ours_is_refused_in_words(header: object) -> None:
    import jwt

    key = b"k" * 64
    body = _b64(_claims())
    signing = f"{_b64(header)}.{body}"
    sig = jwt.utils.base64url_encode(  # a valid HMAC over what was sent
        hmac.new(key, signing.encode(), "sha256").digest()).decode()
    with pytest.raises(Unauthenticated, match=r"^token lock: "):
        auth.verify_token(key, f"{signing}.{sig}", now=1500)


@pytest.mark.parametrize("over,why", [
    ({"rooms": None}, "lacks the 'rooms'"), ({"admin": None}, "lacks the 'admin'"),
    ({"exp": "2000"}, "'exp' claim is not a time"), ({"exp": 2**63 + 5}, "not a time"),
    ({"iat": 1.5}, "'iat' claim is not a time"), ({"exp": True}, "not a time"),
    ({"rooms": "general"}, "rooms claim"), ({"rooms": []}, "rooms claim"),
    ({"rooms": ["general\n"]}, "rooms claim"), ({"admin": 1}, "admin claim"),
    ({"sub": "eve\x1b[31m"}, "subject"), ({"sub": 5}, "subject"), ({"jti": 5}, "token's id"),
    ({"jti": "x" * 65}, "token's id"), ({"aud": ["tsnetchat"]}, "not issued for"),
    ({"extra": 1}, "claims tsnetchat does not issue"),
])
def test_claims_off_the_contract_are_refused_though_signed_with_the_real_key(
        over: dict[str, object], why: str) -> None:
    import jwt

    key = b"k" * 64
    tok = jwt.encode(_claims(**over), key, algorithm="HS256")
    with pytest.raises(Unauthenticated, match=why.replace("(", r"\(")):
        auth.verify_token(key, tok, now=1500)


@pytest.mark.parametrize("token", ["", ".", "..", "a.b.c", "x" * 4096, "é.é.é", "=.=.=",
                                   f"{_b64({'alg': 'HS256'})}.bm90IGpzb24.x",
                                   f"{_b64({'alg': 'HS256'})}.{_b64([1])}.x",
                                   f"{_b64_raw(b'[' * 2500)}.e30.x",
                                   f"{_b64({'alg': 'HS256'})}.{_b64_raw(b'{' * 2500)}.x"])
def test_garbage_tokens_raise_only_unauthenticated(token: str) -> None:
    with pytest.raises(Unauthenticated, match=r"^token lock: "):
        auth.verify_token(b"k" * 64, token, now=1500)


def test_a_token_as_issued_verifies_and_says_what_it_carries() -> None:
    key = b"k" * 64
    tok, issued = auth.issue_token(key, "tag:bot", ["general", "ops"], admin=True,
                                   ttl_seconds=60, now=1000)
    assert auth.verify_token(key, tok, now=1000) == issued


def test_rotating_the_key_refuses_tokens_signed_with_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "jwt.key"
    old = auth.load_or_create_key(path)
    tok, _ = auth.issue_token(old, "alice@t", [], ttl_seconds=60)
    auth.rotate_key(path)
    new = auth.load_or_create_key(path)
    assert new != old and oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Unauthenticated, match="signature"):
        auth.verify_token(new, tok)


@pytest.mark.parametrize(("token_id", "advice"), [
    ("login-0123abcd", "run `tsnetchat login` for a new one"),
    ("0123abcd", "ask an admin for a new one"),
])
def test_an_expired_token_says_where_a_new_one_comes_from(token_id: str, advice: str) -> None:
    """A person whose token came from `tsnetchat login` was told to ask an admin."""
    key = b"k" * 64
    tok, _ = auth.issue_token(key, "alice@tailnet.test", [], ttl_seconds=60, now=1_000_000,
                              token_id=token_id)
    with pytest.raises(Unauthenticated) as e:
        auth.verify_token(key, tok, now=1_000_000 + 3600)
    assert "has expired" in str(e.value) and advice in str(e.value)
