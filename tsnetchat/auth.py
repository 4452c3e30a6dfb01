"""The two locks: signed tokens (PyJWT) and tailnet identity (WhoIs), and the policy that
combines them with tailnet grants.

Everything here is pure or file-local: no gRPC, no sockets. The servicer calls
``Authenticator.check`` with the token string and the WhoIs answer of the connection.

Contracts:

* ``load_or_create_key`` creates a 256-bit key with mode 0600 and refuses (ConfigError) to use
  a key file that group or others can read.
* Tokens are HS256 only (pinned on decode), and carry: sub, rooms, admin, exp, iat, nbf, jti,
  iss, aud. A token with any other algorithm, header or missing claim is refused.
* ``authorize`` is a pure function of (identity, claims, grant, require_grant).
"""

from __future__ import annotations

import os
import secrets
import stat
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from .config import ROOM_RE
from .errors import ConfigError, PermissionDenied, Unauthenticated
from .tailnet import WhoIs

ALGORITHM = "HS256"
ISSUER = "tsnetchat"
AUDIENCE = "tsnetchat"
ALL_ROOMS = "*"
MAX_TOKEN_BYTES = 4096


def load_or_create_key(path: Path) -> bytes:
    """Return the signing key, creating it (0600) on first use.

    Raises ConfigError when the file is readable by group/others or is too short.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32).hex().encode())
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"the token signing key {path} is readable by others (mode {mode:04o}); anyone who "
            f"reads it can mint tokens. Fix it with `chmod 600 {path}` (and consider rotating it "
            "by deleting it, which invalidates every issued token)."
        )
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise ConfigError(f"the token signing key {path} is too short; delete it to regenerate")
    return key


@dataclass(frozen=True)
class Claims:
    subject: str
    rooms: frozenset[str]
    admin: bool
    token_id: str
    issued_at: int
    expires_at: int

    def to_row(self) -> dict[str, Any]:
        return {"jti": self.token_id, "sub": self.subject, "rooms": ",".join(sorted(self.rooms)),
                "admin": int(self.admin), "iat": self.issued_at, "exp": self.expires_at}


def validate_subject(subject: str) -> None:
    if not subject or len(subject) > 256 or any(c.isspace() for c in subject):
        raise ConfigError(f"invalid token subject {subject!r}: use a tailnet login "
                          "(alice@example.com) or a tag (tag:bot)")


def issue_token(key: bytes, subject: str, rooms: Iterable[str], *, admin: bool = False,
                ttl_seconds: float, now: float | None = None,
                token_id: str | None = None) -> tuple[str, Claims]:
    """Sign a token for ``subject`` (a tailnet login, or ``tag:x`` for tagged devices).

    ``token_id`` reuses an id (a renewal: revoking the id ends every copy); default a new one.
    """
    validate_subject(subject)
    room_set = frozenset(rooms) or frozenset({ALL_ROOMS})
    for r in room_set:
        if r != ALL_ROOMS and not ROOM_RE.match(r):
            raise ConfigError(f"invalid room name {r!r} in token")
    now_i = int(time.time() if now is None else now)
    claims = Claims(subject=subject, rooms=room_set, admin=admin,
                    token_id=token_id or uuid.uuid4().hex,
                    issued_at=now_i, expires_at=now_i + int(ttl_seconds))
    payload = {
        "sub": subject, "rooms": sorted(room_set), "admin": admin, "jti": claims.token_id,
        "iat": now_i, "nbf": now_i, "exp": claims.expires_at, "iss": ISSUER, "aud": AUDIENCE,
    }
    return jwt.encode(payload, key, algorithm=ALGORITHM), claims


def verify_token(key: bytes, token: str, *, now: float | None = None) -> Claims:
    """Decode and check a token. Raises Unauthenticated with a reason a person understands."""
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated(f"token lock: the token is {len(token)} bytes; tokens are at most "
                              f"{MAX_TOKEN_BYTES}")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise Unauthenticated("token lock: the token is not a JWT (malformed)") from None
    if header.get("alg") != ALGORITHM:
        raise Unauthenticated(
            f"token lock: tokens must be signed with {ALGORITHM}, this one says "
            f"{header.get('alg')!r}")
    required = ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]
    # With an explicit `now` (tests), time checks are done below against it instead.
    options: Any = {"require": required}
    if now is not None:
        options.update(verify_exp=False, verify_nbf=False, verify_iat=False)
    try:
        payload = jwt.decode(token, key, algorithms=[ALGORITHM], audience=AUDIENCE,
                             issuer=ISSUER, options=options, leeway=5)
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token lock: the token has expired; ask an admin for a new one "
                              "(tsnetchat token issue)") from None
    except jwt.ImmatureSignatureError:
        raise Unauthenticated("token lock: the token is not valid yet (nbf in the future; "
                              "check the clocks)") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated("token lock: the token's signature does not match this server's "
                              "key (issued by another server, or altered)") from None
    except jwt.MissingRequiredClaimError as e:
        raise Unauthenticated(f"token lock: the token lacks the {e.claim!r} claim") from None
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
        raise Unauthenticated("token lock: the token was not issued for tsnetchat") from None
    except jwt.InvalidTokenError as e:
        raise Unauthenticated(f"token lock: invalid token ({type(e).__name__})") from None
    if now is not None:  # deterministic checks for tests
        if payload["exp"] < now - 5:
            raise Unauthenticated("token lock: the token has expired")
        if payload["nbf"] > now + 5:
            raise Unauthenticated("token lock: the token is not valid yet")
    rooms = payload.get("rooms", [ALL_ROOMS])
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise Unauthenticated("token lock: the token's rooms claim is not a list of names")
    if not isinstance(payload.get("admin", False), bool):
        raise Unauthenticated("token lock: the token's admin claim is not true/false")
    return Claims(subject=str(payload["sub"]), rooms=frozenset(rooms),
                  admin=bool(payload.get("admin", False)), token_id=str(payload["jti"]),
                  issued_at=int(payload["iat"]), expires_at=int(payload["exp"]))


@dataclass(frozen=True)
class Grant:
    """What the tailnet policy's app capability allows (union of all matching grants)."""

    rooms: frozenset[str]
    admin: bool


def grant_from_capmap(cap_map: Mapping[str, list[Any]], cap_name: str) -> Grant | None:
    """Combine every grant value for ``cap_name``. None when the policy grants nothing.

    Each value looks like ``{"rooms": ["general"], "admin": false}``; ``"rooms": ["*"]`` is
    every room. Values of another shape contribute nothing (fail closed).
    """
    values = cap_map.get(cap_name)
    if values is None:
        return None
    rooms: set[str] = set()
    admin = False
    for v in values:
        if not isinstance(v, dict):
            continue
        rs = v.get("rooms", [])
        if isinstance(rs, list):
            rooms.update(r for r in rs if isinstance(r, str))
        admin = admin or v.get("admin") is True
    return Grant(rooms=frozenset(rooms), admin=admin)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who (from the tailnet) and what they may do (token ∩ grant)."""

    login: str  # the identity both locks agreed on
    display_name: str
    node: str
    rooms: frozenset[str]
    admin: bool
    token_id: str
    token_expires: int
    grant_applied: bool

    def may_use(self, room: str) -> bool:
        return ALL_ROOMS in self.rooms or room in self.rooms


def identity_names(who: WhoIs) -> frozenset[str]:
    """The names a token subject may use for this peer: its login, or its tags if tagged."""
    return frozenset(who.tags) if who.is_tagged else frozenset({who.login})


def _intersect(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    if ALL_ROOMS in a:
        return b
    if ALL_ROOMS in b:
        return a
    return a & b


def authorize(who: WhoIs, claims: Claims, grant: Grant | None, *,
              require_grant: bool) -> Principal:
    """Both locks must agree; the result is the token's rights narrowed by the grant.

    Raises Unauthenticated when the token belongs to someone else, PermissionDenied when the
    policy grants nothing (with require_grant) or the intersection is empty.
    """
    names = identity_names(who)
    if claims.subject not in names:
        shown = ", ".join(sorted(names)) or "?"
        raise Unauthenticated(
            f"the two locks disagree: the token was issued to {claims.subject!r} but this "
            f"connection comes from {shown} ({who.node_name or 'unknown device'}). "
            "Tokens only work from their owner's own devices.")
    rooms, admin = claims.rooms, claims.admin
    if grant is not None:
        rooms, admin = _intersect(rooms, grant.rooms), admin and grant.admin
    elif require_grant:
        raise PermissionDenied(
            f"the tailnet policy grants {sorted(names)[0]} no access to tsnetchat "
            "(no app capability grant); ask a tailnet admin")
    if not rooms:
        raise PermissionDenied("your token and the tailnet grant have no room in common")
    return Principal(
        login=claims.subject, display_name=who.display_name or claims.subject,
        node=who.node_name, rooms=rooms, admin=admin, token_id=claims.token_id,
        token_expires=claims.expires_at, grant_applied=grant is not None)


def check_room(p: Principal, room: str) -> None:
    if not ROOM_RE.match(room):
        from .errors import InvalidInput

        raise InvalidInput(
            f"{room!r} is not a valid room name: 1-32 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit")
    if not p.may_use(room):
        allowed = "any room" if ALL_ROOMS in p.rooms else ", ".join(sorted(p.rooms))
        raise PermissionDenied(f"you may not use room {room!r} (allowed: {allowed})")


def check_admin(p: Principal) -> None:
    if not p.admin:
        raise PermissionDenied("this needs admin rights (token admin claim and tailnet grant)")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token from ``authorization: Bearer <jwt>`` metadata; Unauthenticated if absent."""
    for k, v in metadata:
        if k.lower() == "authorization":
            value = v.decode(errors="replace") if isinstance(v, bytes) else v
            scheme, _, tok = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not tok.strip():
                raise Unauthenticated("token lock: authorization metadata must be "
                                      "'Bearer <token>'")
            return tok.strip()
    raise Unauthenticated("token lock: no token; pass --token or --token-file "
                          "(an admin issues one with `tsnetchat token issue`)")
