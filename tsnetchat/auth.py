"""The two locks: signed tokens (PyJWT) and tailnet identity (WhoIs), and the policy that
combines them with tailnet grants.

Everything here is pure or file-local: no gRPC, no sockets. The gate (gate.py) calls
``verify_token`` with the token string (before it asks tailscaled anything), then
``authorize`` with the claims and the WhoIs answer of the connection.

Contracts:

* ``load_or_create_key`` creates a 256-bit key with mode 0600 and refuses (ConfigError) to use
  a key file that group or others can read. ``rotate_key`` replaces it atomically.
* Tokens are HS256 only (pinned, never read from the token), with a header of exactly
  ``alg`` and ``typ: JWT``, and exactly the claims sub, rooms, admin, exp, iat, nbf, jti, iss,
  aud, each of its type (times are whole seconds up to year 9999). Any other algorithm,
  header field, claim, type or a missing claim is refused with Unauthenticated; nothing a
  client puts in a token raises anything else. PyJWT is the one translation point for the
  signature; its errors are translated here.
* ``authorize`` is a pure function of (identity, claims, grant, require_grant).
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from . import render
from .config import ROOM_RE
from .errors import ConfigError, InvalidInput, PermissionDenied, Unauthenticated
from .statedir import full_disk_hint, give_to_server, open_nofollow, read_key
from .tailnet import WhoIs

ALGORITHM = "HS256"
ISSUER = "tsnetchat"
AUDIENCE = "tsnetchat"
ALL_ROOMS = "*"
MAX_TOKEN_BYTES = 4096
MAX_LOGIN = 256  # characters in a login or tag (token subject, DM member, author)
LEEWAY = 5  # seconds of clock difference allowed for exp, nbf and iat
# Token ids that self-service Login hands out start with this (enroll.py), so renewal,
# `tsnetchat token list` and the door's advice can tell them from admin-issued ones.
LOGIN_ID_PREFIX = "login-"
MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z: later "times" are garbage
MAX_TOKEN_ID = 64
CLAIMS = frozenset({"sub", "rooms", "admin", "exp", "iat", "nbf", "jti", "iss", "aud"})
HEADER = frozenset({"alg", "typ"})


def load_or_create_key(path: Path) -> bytes:
    """Return the signing key, creating it (0600) on first use; ConfigError as ``read_key``."""
    create_key(path)
    return read_key(path)


def create_key(path: Path) -> bool:
    """Make the signing key (0600) if there is none; whether this call made it (another
    process's may come first). ConfigError when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.path.lexists(path):
        return False
    # Written aside and linked into place whole: on a full disk the key was left empty,
    # and the error said "unexpected OSError ... a bug" (an operator's run, 2026-11-24).
    try:
        tmp = _key_aside(path, secrets.token_bytes(32).hex().encode())
        try:
            os.link(tmp, path)
        except FileExistsError:  # (another process's came first)
            return False
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:  # (ConfigError, as read_key's: what start-up and reload catch)
        raise ConfigError(f"cannot write the signing key {path}: {e.strerror}"
                          f"{full_disk_hint(path)}") from None
    return True


def _key_aside(path: Path, key: bytes) -> Path:
    """``key`` in a new file beside ``path`` (0600, synced, the server's), under a name of
    this process's own, for a rename or link into place; removed if it cannot be written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    try:
        with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
            give_to_server(f.fileno(), path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def rotate_key(path: Path) -> None:
    """Replace the signing key with a new one (0600, atomically). Every token signed with the
    old key stops working; a running server notices within a second."""
    write_key(path, secrets.token_bytes(32).hex().encode())


def write_key(path: Path, key: bytes) -> None:
    """Replace the signing key with ``key`` (0600, atomically): cluster mode adopts the
    cluster's key this way, so `tsnetchat token issue` on any server signs with it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _key_aside(path, key).replace(path)


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


def new_token_advice(token_id: str) -> str:
    """How the holder of a refused token gets a new one: from `tsnetchat login` when that
    is where it came from (a person told to "ask an admin" could do it themselves)."""
    if token_id.startswith(LOGIN_ID_PREFIX):
        return "run `tsnetchat login` for a new one (if you are still allowed)"
    return "ask an admin for a new one (tsnetchat token issue)"


def is_token_room(name: str) -> bool:
    """Whether a token or grant may carry ``name``: a room, or ``*`` for every room."""
    return name == ALL_ROOMS or ROOM_RE.fullmatch(name) is not None


def valid_subject(subject: object) -> bool:
    """Whether ``subject`` may be a token's: a tailnet login or tag, shown safely."""
    return (isinstance(subject, str) and 0 < len(subject) <= MAX_LOGIN
            and render.UNSAFE.search(subject) is None and not any(c.isspace() for c in subject)
            and not render.is_blank(subject))


def validate_subject(subject: str) -> None:
    if not valid_subject(subject):
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
        if not is_token_room(r):
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


def _refuse(why: str) -> Unauthenticated:
    return Unauthenticated(f"token lock: {why}")


def _segment(part: str) -> Any:
    """A JWT segment's JSON, or raises ValueError."""
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return json.loads(raw)


def _time_claim(payload: Mapping[str, Any], name: str) -> int:
    v = payload[name]
    if type(v) is not int or not 0 <= v <= MAX_TIME:
        raise _refuse(f"the token's {name!r} claim is not a time in whole seconds")
    return v


def verify_token(key: bytes, token: str, *, now: float | None = None) -> Claims:
    """Decode and check a token (see the module's contract). Cheap: no I/O, one HMAC.

    Raises Unauthenticated with a reason a person understands, and nothing else.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise _refuse(f"the token is {len(token)} bytes; tokens are at most {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise _refuse("the token is not a JWT (malformed)")
    try:
        header = _segment(parts[0])
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the limit
        raise _refuse("the token is not a JWT (malformed)") from None
    if not isinstance(header, dict):
        raise _refuse("the token is not a JWT (malformed)")
    alg = header.get("alg")
    if alg != ALGORITHM:
        shown = (repr(alg) if isinstance(alg, str | None) and len(str(alg)) < 20
                 else "something else")
        raise _refuse(f"tokens must be signed with {ALGORITHM}, this one says {shown}")
    extra = set(header) - HEADER
    if extra or header.get("typ", "JWT") != "JWT":
        raise _refuse("the token's header has fields tsnetchat does not issue "
                      f"({', '.join(repr(k[:20]) for k in sorted(extra)[:3]) or 'typ'})")
    try:
        # Only the signature is PyJWT's to check; every claim is checked below, strictly.
        payload = jwt.decode(token, key, algorithms=[ALGORITHM], options={
            "verify_signature": True, "verify_exp": False, "verify_nbf": False,
            "verify_iat": False, "verify_aud": False, "verify_iss": False, "verify_sub": False,
            "verify_jti": False, "require": []})
    except jwt.InvalidSignatureError:
        raise _refuse("the token's signature does not match this server's key (issued by "
                      "another server or before the key was rotated, or altered)") from None
    except (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError):
        raise _refuse("the token is not a JWT (malformed)") from None
    if not isinstance(payload, dict):
        raise _refuse("the token is not a JWT (malformed)")
    missing = sorted(CLAIMS - set(payload))
    if missing:
        raise _refuse(f"the token lacks the {missing[0]!r} claim")
    if set(payload) - CLAIMS:
        raise _refuse("the token carries claims tsnetchat does not issue")
    if payload["iss"] != ISSUER or payload["aud"] != AUDIENCE:
        raise _refuse("the token was not issued for tsnetchat")
    exp, iat, nbf = (_time_claim(payload, n) for n in ("exp", "iat", "nbf"))
    t = time.time() if now is None else now
    if exp < t - LEEWAY:
        jti = payload["jti"]
        raise _refuse("the token has expired; "
                      + new_token_advice(jti if isinstance(jti, str) else ""))
    if nbf > t + LEEWAY or iat > t + LEEWAY:
        raise _refuse("the token is not valid yet (nbf or iat in the future; check the "
                      "clocks)")
    sub, jti, rooms, admin = payload["sub"], payload["jti"], payload["rooms"], payload["admin"]
    if not valid_subject(sub):
        raise _refuse("the token's subject is not a tailnet login or tag")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_TOKEN_ID:
        raise _refuse("the token's id (jti) is not a short string")
    if (not isinstance(rooms, list) or not rooms or not all(
            isinstance(r, str) and is_token_room(r) for r in rooms)):
        raise _refuse("the token's rooms claim is not a list of room names")
    if not isinstance(admin, bool):
        raise _refuse("the token's admin claim is not true/false")
    return Claims(subject=sub, rooms=frozenset(rooms), admin=admin, token_id=jti,
                  issued_at=iat, expires_at=exp)


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

    @property
    def room_names(self) -> frozenset[str]:
        """``rooms`` as lists show them: without the names no room can have, which a tailnet
        grant may list (``General``, ``+ops``)."""
        return frozenset(filter(is_token_room, self.rooms))


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
              require_grant: bool, logins_need_grant: bool = True) -> Principal:
    """Both locks must agree; the result is the token's rights narrowed by the grant.

    A token `tsnetchat login` issued (``LOGIN_ID_PREFIX``) carries the rights its grant had
    then; without a grant now it has what a login without one would get: nothing
    (``logins_need_grant``: enroll is not ``any``), or its rooms without admin. (It had its
    full rights back, admin included, once the grant that had narrowed it was removed: an
    attacker's run over the lab, 2026-11-23.)

    Raises Unauthenticated when the token belongs to someone else, PermissionDenied when the
    policy grants nothing (with require_grant, or to a login token) or the intersection is
    empty.
    """
    names = identity_names(who)
    if claims.subject not in names:
        shown = ", ".join(render.name(n) for n in sorted(names)) or "?"
        raise Unauthenticated(
            f"the two locks disagree: the token was issued to {claims.subject!r} but this "
            f"connection comes from {shown} ({render.name(who.node_name, 'unknown device')}). "
            "Tokens only work from their owner's own devices.")
    rooms, admin = claims.rooms, claims.admin
    login = claims.token_id.startswith(LOGIN_ID_PREFIX)
    if grant is not None:
        rooms, admin = _intersect(rooms, grant.rooms), admin and grant.admin
    elif require_grant or (login and logins_need_grant):
        why = ("; a token from `tsnetchat login` lasts only as long as the grant it came with"
               if login else "")
        raise PermissionDenied(
            f"the tailnet policy grants {render.name(min(names, default=''))} no access to "
            f"tsnetchat (no app capability grant){why}; ask a tailnet admin")
    elif login:
        admin = False
    if not rooms:
        raise PermissionDenied("your token and the tailnet grant have no room in common")
    # Names from the tailnet are shown to other people: the same rule as for message text.
    return Principal(
        login=claims.subject, display_name=render.name(who.display_name, claims.subject),
        node=render.name(who.node_name), rooms=rooms, admin=admin, token_id=claims.token_id,
        token_expires=claims.expires_at, grant_applied=grant is not None)


def check_room_name(room: str) -> None:
    if not ROOM_RE.fullmatch(room):
        raise InvalidInput(
            f"{room[:40]!r} is not a valid room name: 1-32 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit")


def check_room(p: Principal, room: str) -> None:
    check_room_name(room)
    if not p.may_use(room):
        allowed = "any room" if ALL_ROOMS in p.rooms else ", ".join(sorted(p.rooms))
        # (`--room genral` read as a refusal of the room meant: a new user's day, 2026-11-24)
        close = difflib.get_close_matches(room, sorted(p.room_names - {ALL_ROOMS}), n=1,
                                          cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PermissionDenied(f"you may not use room {room!r} (allowed: {allowed}{hint})")


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
