"""The client's one error boundary: gRPC and tailnet failures as a person reads them.

Everything the client does above the raw stub (``RoomSession``, the terminal chat, the
``send``/``tail``/``history``/``whoami`` commands) passes what it catches through
``translate``, and shows only ``str()`` of the result: never a status name, a gRPC core
message or Python's text for an exception. ``client.Connection`` itself stays the raw API
(its methods raise ``grpc.aio.AioRpcError`` like the generated stub), for tests and scripts.

::

    TsnetchatError (tsnetchat.errors)
    └── ClientError          str(e) is for people; ``retryable``: trying again later, without
                             anyone acting, can help; ``transport``: the way to the server
                             failed (not the server's answer); ``exit_code`` for the CLI;
                             ``retry_after``: the server's "not before" in seconds

A failure nothing here names is a bug: ``ClientError.bug``, and on the chat's screen the
words of ``internal``, wherever it was caught.

``refusal`` classifies an error event the server sends about one message (the stream stays
open): a rate refusal or a failed commit means "wait and send it again"; anything else
means "refused for good".
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

import grpc

from .errors import (
    RESUME_HINT,
    ConfigError,
    InvalidInput,
    LimitExceeded,
    LocalAPIUnavailable,
    PeerNotFound,
    PermissionDenied,
    ServerUnavailable,
    TailnetError,
    TailnetNotReady,
    TsnetchatError,
    Unauthenticated,
)

# Exit codes of the client commands (README "Exit codes").
EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_TAILNET = 1, 2, 3, 4
EXIT_UNAUTHENTICATED, EXIT_PERMISSION, EXIT_UNAVAILABLE = 5, 6, 7


class ClientError(TsnetchatError):
    """A failure the client met, said plainly (see the module doc)."""

    def __init__(self, message: str, *, retryable: bool, exit_code: int = EXIT_ERROR,
                 transport: bool = False, retry_after: float = 0.0,
                 status: grpc.StatusCode | None = None, bug: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.exit_code = exit_code
        self.transport = transport
        self.retry_after = retry_after
        self.status = status
        self.bug = bug  # nothing ``translate`` knows: it belongs in the log


class Where(Protocol):
    """What the boundary needs to know about the server to say where a failure happened
    (``discovery.Target`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def mode(self) -> str: ...


# gRPC's own words for "the connection could not be made or broke", as opposed to a status
# the server chose (whose details are a sentence meant for people).
# "Internal error from Core": grpc.aio's word for a write on a stream whose connection or
# call had just ended, in place of the real status (grpc/grpc#36066): a reconnect learns it.
# "ping timeout": its keepalive PING unanswered (grpc.http2.ping_timeout_ms; `tail` printed
# "connection lost: ping timeout", grpcio 1.85.3, 2026-11-25).
_TRANSPORT = re.compile(r"failed to connect|socket closed|connection reset|connection refused|"
                        r"broken pipe|http proxy|dns resolution|keepalive|ping timeout|goaway|"
                        r"end of tcp stream|stream removed|connection attempt timed out|"
                        r"too_many_pings|handshake|unreachable|internal error from core", re.I)
_NOTHING_LISTENS = re.compile(r"http proxy returned response code|connection refused|"
                              r"socket closed|connection reset", re.I)
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?)\s*s")


def retry_hint(message: str) -> float:
    """The "retry in 1.5s" a server refusal carries, in seconds (0 when it has none)."""
    m = _RETRY_IN.search(message)
    return float(m.group(1)) if m else 0.0


def _where(where: Where | None, server: str) -> tuple[str, str]:
    if where is None:
        return server or "the server", ""
    return where.name or server or "the server", f" on port {where.port}"


def from_status(code: grpc.StatusCode, details: str, where: Where | None = None, *,
                server: str = "", proxy: str = "") -> ClientError:
    """A call or stream that ended with ``code``: what it means for a person."""
    details = (details or "").strip()
    name, port = _where(where, server)
    S = grpc.StatusCode
    if code in (S.UNAVAILABLE, S.CANCELLED, S.DEADLINE_EXCEEDED, S.UNKNOWN, S.INTERNAL) \
            and _TRANSPORT.search(details):
        if where is not None and where.mode == "proxy" and proxy and proxy in details \
                and "refused" in details.lower():
            msg = (f"this machine's tailscaled proxy ({proxy}) refuses connections: is "
                   "tailscaled running here?")
        elif _NOTHING_LISTENS.search(details):
            msg = (f"{name} is on the tailnet but nothing answers{port}: is `tsnetchat serve` "
                   "running there?")
        else:
            msg = f"cannot reach {name}{port}: the connection failed or broke"
        return ClientError(msg, retryable=True, exit_code=EXIT_UNAVAILABLE, transport=True,
                           status=code)
    if code == S.DEADLINE_EXCEEDED:
        return ClientError(f"{name} did not answer in time", retryable=True,
                           exit_code=EXIT_UNAVAILABLE, transport=True, status=code)
    if code == S.CANCELLED:
        return ClientError(f"the connection to {name} was closed", retryable=True,
                           exit_code=EXIT_UNAVAILABLE, transport=True, status=code)
    if code == S.UNAVAILABLE:
        # The server's own "unavailable": shutting down, tailscaled or the disk failing there.
        details = details.removesuffix(RESUME_HINT)
        return ClientError(details or f"{name} is unavailable", retryable=True,
                           exit_code=EXIT_UNAVAILABLE, retry_after=retry_hint(details),
                           status=code)
    if code == S.UNAUTHENTICATED:
        return ClientError(details or "the server refused the token", retryable=False,
                           exit_code=EXIT_UNAUTHENTICATED, status=code)
    if code == S.PERMISSION_DENIED:
        return ClientError(details or "not allowed", retryable=False,
                           exit_code=EXIT_PERMISSION, status=code)
    if code == S.INVALID_ARGUMENT:
        return ClientError(details or "the server refused the request as invalid",
                           retryable=False, exit_code=EXIT_USAGE, status=code)
    if code == S.RESOURCE_EXHAUSTED:
        return ClientError(details or "a limit was reached; slow down", retryable=True,
                           retry_after=retry_hint(details), status=code)
    if code == S.UNIMPLEMENTED:
        return ClientError(f"{name}{port} does not speak this version of tsnetchat; is it a "
                           "tsnetchat server, and as new as this client?", retryable=False,
                           status=code)
    if code == S.NOT_FOUND:
        return ClientError(details or "not found", retryable=False, status=code)
    if code == S.DATA_LOSS:  # (the server's history is damaged: waiting does not help)
        return ClientError(details or f"{name}'s history is damaged", retryable=False,
                           status=code)
    first = details.splitlines()[0][:200] if details else "no details"
    return ClientError(f"{name} failed to answer ({first})", retryable=True, status=code)


def translate(e: BaseException, where: Where | None = None, *, server: str = "",
              proxy: str = "") -> ClientError:
    """Any exception met while talking to the server, as a ClientError (raise it ``from e``)."""
    if isinstance(e, ClientError):
        return e
    if isinstance(e, grpc.aio.AioRpcError):
        return from_status(e.code(), e.details() or "", where, server=server, proxy=proxy)
    name = _where(where, server)[0]
    if isinstance(e, ServerUnavailable):  # the machine answers, the server does not (yet)
        return ClientError(str(e), retryable=True, exit_code=EXIT_UNAVAILABLE, transport=True)
    if isinstance(e, PeerNotFound):
        return ClientError(str(e), retryable=False, exit_code=EXIT_TAILNET, transport=True)
    if isinstance(e, LocalAPIUnavailable | TailnetNotReady | TailnetError):
        # tailscaled restarting, starting up, or the peer briefly offline: it can come back.
        return ClientError(str(e), retryable=True, exit_code=EXIT_TAILNET, transport=True)
    if isinstance(e, Unauthenticated):
        return ClientError(str(e), retryable=False, exit_code=EXIT_UNAUTHENTICATED)
    if isinstance(e, PermissionDenied):
        return ClientError(str(e), retryable=False, exit_code=EXIT_PERMISSION)
    if isinstance(e, ConfigError):
        return ClientError(str(e), retryable=False, exit_code=EXIT_CONFIG)
    if isinstance(e, InvalidInput):
        return ClientError(str(e), retryable=False, exit_code=EXIT_USAGE)
    if isinstance(e, LimitExceeded):
        return ClientError(str(e), retryable=True, retry_after=retry_hint(str(e)))
    if isinstance(e, TsnetchatError):
        return ClientError(str(e), retryable=False)
    if isinstance(e, TimeoutError):
        return ClientError(f"{name} did not answer in time", retryable=True,
                           exit_code=EXIT_UNAVAILABLE, transport=True)
    if isinstance(e, UnicodeError):  # a room, login or query given as bytes that are not UTF-8
        return ClientError("the text is not valid Unicode (is it UTF-8?)", retryable=False,
                           exit_code=EXIT_USAGE)
    if isinstance(e, asyncio.InvalidStateError):  # writing to a stream that already ended
        return ClientError(f"the connection to {name} ended", retryable=True,
                           exit_code=EXIT_UNAVAILABLE, transport=True)
    if isinstance(e, OSError):
        return ClientError(f"cannot reach {name}: {e.strerror or e}", retryable=True,
                           exit_code=EXIT_UNAVAILABLE, transport=True)
    return ClientError(_bug_words(e), retryable=True, bug=True)


def _bug_words(e: BaseException, doing: str = "") -> str:
    return (f"internal error in the client{doing} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no details'})")


def internal(e: BaseException, log: object, doing: str = "") -> str:
    """What the chat's screen says of ``e``, a failure nothing above names (``translate``'s
    ``bug``), caught while ``doing`` (" showing an event"), its traceback written to ``log``.
    (Each place that caught one said it in words of its own, three of them without the
    failure's own words.)"""
    return f"{_bug_words(e, doing)}; see {log}"


def refusal(code: int, message: str, retry_after_ms: int = 0) -> ClientError:
    """The server refused one message and kept the stream open (an Error event).

    Retryable: a rate refusal ("slow down ... retry in 0.4s") and a commit that failed ("send
    it again"); the message is sent again after ``retry_after``: the event's own
    ``retry_after_ms``, or the words' "retry in". (The words alone were read: a refusal for a
    full disk, which says no "retry in", was sent again at the pace of the client's rate,
    thousands of times in 10 s with a high one; an operator's run, 2026-11-23.) Anything else
    (too long, a control character, not allowed) is refused for good.
    """
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if status in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return ClientError(message, retryable=True,
                           retry_after=max(retry_after_ms / 1000, retry_hint(message)),
                           status=status)
    return ClientError(message or status.name.lower().replace("_", " "), retryable=False,
                       exit_code=EXIT_USAGE if status == grpc.StatusCode.INVALID_ARGUMENT
                       else EXIT_ERROR, status=status)
