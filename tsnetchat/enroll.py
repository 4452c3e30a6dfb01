"""Self-service tokens: a person asks the server for their own token (`tsnetchat login`).

The proof of who is asking is the connection's tailnet identity (WhoIs), the same lock
every other call passes; no token is needed to ask. What the server hands out:

* a token whose subject is the caller's WhoIs login (never anyone else's);
* rooms and admin taken from the caller's tailnet grant (``<cap_domain>/cap/tsnetchat``),
  never more than the grant; with ``enroll = "any"``, a caller without a grant gets every
  room and no admin (``require_grant`` still refuses them, as it would at the door);
* only when the policy allows it: ``off`` (the default: admins issue tokens by hand),
  ``grant`` (people the tailnet policy grants the capability), ``any`` (every tailnet
  user). Tagged devices get their tokens from an admin.

Renewal (``RenewToken``) re-issues a token that Login issued: the same token id, so a
revocation ends every copy, a new expiry, and rights from the grant as it is now. It needs
the current token (valid, not revoked, and both locks agreeing), and is accepted once
``RENEW_FROM`` of the token's life has passed. Admin-issued tokens are not renewable: their
lifetime is the admin's decision.

Login and RenewToken are rate-limited per device (WhoIs node), each on its own. Every issue
and renewal is logged with the login and device, never the token; refusals too, at most 20
at once and 2 a second (as the door's). The age rule alone did not bound renewals: the copy
renewed stays valid until its own expiry, and one old token was renewed about 940 times a
second, a database write and a log line each (an attack, 2026-11-23).

The door is used through two calls only (``Door``): the connection's WhoIs identity, and the
admission check of a token for that identity.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from . import auth, render
from .config import ServerConfig
from .errors import InvalidInput, LimitExceeded, PermissionDenied, TsnetchatError
from .pb import chat_pb2 as pb
from .service import GARBAGE, abort_bug, status_for
from .tailnet import PeerInfo, WhoIs
from .throttle import Buckets, LogLimiter, retry_in

log = logging.getLogger("tsnetchat.enroll")

POLICIES = ("off", "grant", "any")
# Renewal is accepted once this share of a token's life has passed; clients renew at half.
RENEW_FROM = 0.4
# Per device: a burst of logins, then one a minute. A person logs in once per device; this
# only stops a script from filling the log and the token table.
LOGIN_BURST = 5
LOGIN_PER_SECOND = 1 / 60


class TokenRecords(Protocol):
    """Where issued tokens are recorded (`tsnetchat token list`, revocation)."""

    async def record_token(self, row: dict[str, object]) -> None: ...

    async def renew_token(self, row: dict[str, object]) -> None: ...


class Door(Protocol):
    """What enrollment needs from the gate: who is behind a connection, and whether a
    token is acceptable from them (expiry, revocation, both locks)."""

    def identity(self, peer: str) -> AbstractAsyncContextManager[WhoIs]: ...

    def check_token(self, who: WhoIs, token: str) -> auth.Principal: ...


@dataclass(frozen=True)
class EnrollPolicy:
    mode: str  # one of POLICIES
    ttl_seconds: float
    cap_name: str
    require_grant: bool
    server: str = "the server"  # how refusals name this server


def policy_from(cfg: ServerConfig, server: str = "the server") -> EnrollPolicy:
    return EnrollPolicy(mode=cfg.enroll, ttl_seconds=cfg.enroll_ttl_hours * 3600,
                        cap_name=cfg.cap_name, require_grant=cfg.require_grant, server=server)


@dataclass(frozen=True)
class Rights:
    rooms: frozenset[str]
    admin: bool


def rights_for(policy: EnrollPolicy, who: WhoIs) -> Rights:
    """What a self-service token for ``who`` may carry under ``policy``; a pure function.

    Raises PermissionDenied, saying whom to ask, when the policy hands ``who`` nothing.
    """
    if policy.mode == "off":
        raise PermissionDenied(
            f"{policy.server} does not hand out tokens itself (enroll = off). Ask its admin "
            f"for one: `tsnetchat token issue {who.login or '<your login>'}` on that machine")
    if who.is_tagged:
        raise PermissionDenied(
            f"tagged devices ({', '.join(who.tags)}) do not log in; an admin issues their "
            f"tokens: `tsnetchat token issue {who.tags[0]}` on {policy.server}")
    if not auth.valid_subject(who.login):
        # (issue_token's ConfigError was answered INTERNAL, "invalid token subject", as a
        # fault of the server's rather than of a login no token can name)
        raise PermissionDenied(
            f"your tailnet login {render.name(who.login, '(none)')!r} cannot be signed into "
            f"a token (it is empty, over {auth.MAX_LOGIN} characters, or holds spaces or "
            "control characters); ask a tailnet admin to give you a plain login")
    grant = auth.grant_from_capmap(who.cap_map, policy.cap_name)
    if grant is None:
        if policy.mode == "grant" or policy.require_grant:
            raise PermissionDenied(
                f"the tailnet policy grants {who.login} no access to tsnetchat ({policy.server} "
                f"hands out tokens only to people with a grant of {policy.cap_name}). Ask a "
                f"tailnet admin to grant it to you, or a tsnetchat admin for a token "
                f"(`tsnetchat token issue {who.login}`)")
        return Rights(frozenset({auth.ALL_ROOMS}), False)
    # Only names that are rooms are signed into a token (issue_token refuses others).
    usable = frozenset(filter(auth.is_token_room, grant.rooms))
    if not usable:
        odd = ", ".join(repr(r[:40]) for r in sorted(grant.rooms)[:3])
        raise PermissionDenied(
            f"your tailnet grant of {policy.cap_name} lists no rooms"
            + (f" (only names that are not room names: {odd})" if odd else "")
            + "; ask a tailnet admin to add the rooms you need")
    return Rights(usable, grant.admin)


def _where(who: WhoIs) -> str:
    return who.node_name or who.node_id or "?"


class Enrollment:
    """The Login and RenewToken RPCs. ``policy`` may be replaced at any time (reload)."""

    def __init__(self, *, door: Door, key: Callable[[], bytes], store: TokenRecords,
                 policy: EnrollPolicy,
                 server_node: Callable[[], PeerInfo | None] = lambda: None) -> None:
        self.door, self.key, self.store, self.policy = door, key, store, policy
        self._server_node = server_node
        # One per device for each method: renewals do not use up a device's logins.
        self._buckets = {m: Buckets(LOGIN_BURST, LOGIN_PER_SECOND) for m in ("login", "renew")}
        self._refusal_log = LogLimiter()
        self._error_log = LogLimiter(burst=5, rate=0.2)  # (as the servicer's)

    # helpers -----------------------------------------------------------------------

    def _server(self) -> pb.ServerNode:
        me = self._server_node()
        if me is None:
            return pb.ServerNode()
        return pb.ServerNode(node_id=me.node_id, name=me.dns_name.rstrip("."),
                             addresses=list(me.ips))

    def _take(self, method: str, who: WhoIs) -> None:
        device = who.node_id or who.node_name or who.login
        wait = self._buckets[method].take(device)
        if wait:
            what = "logins" if method == "login" else "token renewals"
            raise LimitExceeded(f"too many {what} from this device ({LOGIN_BURST} in a row, "
                                f"then one a minute); {retry_in(wait)}")

    def _issue(self, who: WhoIs, rights: Rights, token_id: str) -> tuple[str, auth.Claims]:
        return auth.issue_token(self.key(), who.login, sorted(rights.rooms), admin=rights.admin,
                                ttl_seconds=self.policy.ttl_seconds, token_id=token_id)

    def _response(self, who: WhoIs, token: str, claims: auth.Claims) -> pb.LoginResponse:
        return pb.LoginResponse(
            token=token, token_id=claims.token_id, issued_unix=claims.issued_at,
            expires_unix=claims.expires_at, rooms=sorted(claims.rooms), admin=claims.admin,
            identity=pb.Identity(login=who.login, display_name=who.display_name,
                                 node=who.node_name),
            server=self._server())

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, who: WhoIs | None,
                      e: TsnetchatError) -> None:
        code = status_for(e)
        self._refusal_log.log(log, logging.INFO,
                              "%s refused login=%s device=%s peer=%s code=%s reason=%s", method,
                              who.login if who else "?", _where(who) if who else "?",
                              context.peer(), code.name, e)
        await context.abort(code, str(e))

    # RPCs ----------------------------------------------------------------------------

    async def Login(self, request: Any, context: grpc.aio.ServicerContext) -> pb.LoginResponse:
        async def login(who: WhoIs) -> tuple[str, auth.Claims]:
            self._take("login", who)
            token, claims = self._issue(who, rights_for(self.policy, who),
                                        auth.LOGIN_ID_PREFIX + uuid.uuid4().hex)
            await self.store.record_token(claims.to_row())
            return token, claims

        return await self._answer(context, "login", login, request)

    async def RenewToken(self, request: Any,
                         context: grpc.aio.ServicerContext) -> pb.LoginResponse:
        async def renew(who: WhoIs) -> tuple[str, auth.Claims]:
            current = auth.bearer_token(_metadata(context))
            self.door.check_token(who, current)  # valid, not revoked, both locks agree
            old = auth.verify_token(self.key(), current)
            check_renewable(old, time.time())
            self._take("renew", who)
            token, claims = self._issue(who, rights_for(self.policy, who), old.token_id)
            await self.store.renew_token(claims.to_row())
            return token, claims

        return await self._answer(context, "renew", renew, request)

    async def _answer(self, context: grpc.aio.ServicerContext, method: str,
                      issue: Callable[[WhoIs], Awaitable[tuple[str, auth.Claims]]],
                      request: Any) -> pb.LoginResponse:
        """Look up the caller, ``issue`` a token for them, answer; or refuse and log why."""
        who: WhoIs | None = None
        try:
            async with self.door.identity(context.peer()) as who:
                if request is GARBAGE:  # (as the servicer's calls: a token was handed out)
                    raise InvalidInput(f"{method}: the request could not be decoded as a "
                                       "tsnetchat.v1 message (garbage or wrong schema)")
                token, claims = await issue(who)
                self._issued(method, who, claims)
                return self._response(who, token, claims)
        except TsnetchatError as e:
            await self._refuse(context, method, who, e)
        except Exception as e:
            # A bug: answered as the servicer answers one, not by grpc.aio, which logged a
            # traceback each time and sent the caller UNKNOWN with Python's words
            # ("Unexpected <class 'KeyError'>: ...").
            await abort_bug(context, method, e, log, self._error_log)
        raise AssertionError("unreachable")  # pragma: no cover - abort raised

    def _issued(self, method: str, who: WhoIs, claims: auth.Claims) -> None:
        log.info("%s issued token=%s login=%s device=%s rooms=%s admin=%s ttl=%.0fs", method,
                 claims.token_id, who.login, _where(who), ",".join(sorted(claims.rooms)),
                 claims.admin, self.policy.ttl_seconds)


def check_renewable(claims: auth.Claims, now: float) -> None:
    """Refuse admin-issued tokens, and tokens too young to renew (LimitExceeded)."""
    if not claims.token_id.startswith(auth.LOGIN_ID_PREFIX):
        raise PermissionDenied(
            "this token was issued by an admin, who decides how long it lasts; it is not "
            "renewed. Ask them for a new one, or `tsnetchat login` if this server hands out "
            "tokens")
    life = claims.expires_at - claims.issued_at
    earliest = claims.issued_at + life * RENEW_FROM
    if now < earliest:
        raise LimitExceeded(f"too early to renew this token; renew after {earliest - now:.0f}s")


def _metadata(context: grpc.aio.ServicerContext) -> Iterable[tuple[str, str | bytes]]:
    return context.invocation_metadata() or ()
