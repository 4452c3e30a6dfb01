"""The token lock's edges: the clock's leeway is exactly ``auth.LEEWAY``, on each claim."""

from __future__ import annotations

import jwt
import pytest

from tsnetchat import auth
from tsnetchat.errors import Unauthenticated

KEY = b"k" * 64


def signed(**claims: object) -> str:
    """A token as tsnetchat issues it, with ``claims`` put in its place (signed with KEY)."""
    body: dict[str, object] = {"sub": "alice@t", "rooms": ["general"], "admin": False,
                               "jti": "j1", "iat": 1000, "nbf": 1000, "exp": 2000,
                               "iss": "tsnetchat", "aud": "tsnetchat", **claims}
    return jwt.encode(body, KEY, algorithm="HS256")


def test_a_token_works_until_its_expiry_plus_the_leeway_and_not_a_second_longer() -> None:
    tok = signed(exp=2000)
    assert auth.verify_token(KEY, tok, now=2000 + auth.LEEWAY).subject == "alice@t"
    with pytest.raises(Unauthenticated, match="has expired"):
        auth.verify_token(KEY, tok, now=2000 + auth.LEEWAY + 1)


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_issued_or_valid_from_past_the_leeway_in_the_future_is_refused(
        claim: str) -> None:
    """Each of the two is a lock of its own: a token signed with a clock far ahead (or
    made to be used later) is refused though the other claim is in the past."""
    tok = signed(exp=9000, **{"iat": 500, "nbf": 500, claim: 1000 + auth.LEEWAY + 1})
    with pytest.raises(Unauthenticated, match="not valid yet"):
        auth.verify_token(KEY, tok, now=1000)
    ok = signed(exp=9000, **{"iat": 500, "nbf": 500, claim: 1000 + auth.LEEWAY})
    assert auth.verify_token(KEY, ok, now=1000).token_id == "j1"


@pytest.mark.parametrize("said", ["true", "false", 1, ["yes"], {"admin": True}])
def test_a_grant_gives_admin_only_for_json_true_not_for_what_reads_as_true(said: object) -> None:
    """A policy written by hand ("admin": "false", "admin": 1) must fail closed: the
    admin right of a grant is JSON true and nothing else."""
    grant = auth.grant_from_capmap({"c": [{"rooms": ["general"], "admin": said}]}, "c")
    assert grant == auth.Grant(frozenset({"general"}), admin=False)
