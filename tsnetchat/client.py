"""Client side: a connection to the server, and a room session that survives reconnects.

Finding and dialling the server is ``tsnetchat.discovery``'s job; this module only uses the
channel it opens.

``RoomSession`` turns one Join stream into a session that survives reconnects: it resumes
after the last message id it has seen (so nothing is missed and nothing shown twice) and
resends unacknowledged messages with their idempotency keys (so nothing is lost or doubled).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from .discovery import CHANNEL_OPTIONS, DialBridge, Report, Target, discover, open_channel, route
from .errors import TsnetchatError
from .pb import chat_pb2 as pb
from .pb import chat_pb2_grpc as pb_grpc
from .tokens import Renewal

DEFAULT_PORT = 50051

# Statuses after which retrying cannot help: the user must act.
FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                   grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                   grpc.StatusCode.NOT_FOUND})


class Connection:
    """A channel plus the token: the stub calls everything else uses. Each Connection has
    its own TCP connection (discovery.CHANNEL_OPTIONS), never shared with another one."""

    def __init__(self, channel: grpc.aio.Channel, token: str, *,
                 bridge: DialBridge | None = None, target: Target | None = None) -> None:
        self.channel = channel
        self.stub: Any = pb_grpc.ChatStub(channel)  # type: ignore[no-untyped-call]
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.bridge = bridge
        self.target = target

    async def close(self) -> None:
        await self.channel.close()
        if self.bridge is not None:
            await self.bridge.close()

    async def whoami(self, timeout: float = 10) -> pb.WhoAmIResponse:
        res: pb.WhoAmIResponse = await self.stub.WhoAmI(
            pb.WhoAmIRequest(), metadata=self.metadata, timeout=timeout)
        return res

    async def list_rooms(self, timeout: float = 10) -> pb.ListRoomsResponse:
        res: pb.ListRoomsResponse = await self.stub.ListRooms(
            pb.ListRoomsRequest(), metadata=self.metadata, timeout=timeout)
        return res

    async def history(self, room: str, *, before: int | None = None, after: int | None = None,
                      limit: int = 0, timeout: float = 10) -> pb.HistoryResponse:
        req = pb.HistoryRequest(room=room, limit=limit)
        if before is not None:
            req.before_id = before
        if after is not None:
            req.after_id = after
        res: pb.HistoryResponse = await self.stub.History(req, metadata=self.metadata,
                                                          timeout=timeout)
        return res

    def subscribe(self, room: str, after: int | None = None) -> Any:
        req = pb.SubscribeRequest(room=room)
        if after is not None:
            req.after_id = after
        return self.stub.Subscribe(req, metadata=self.metadata)

    async def send_one(self, room: str, text: str, *, kind: int = pb.MESSAGE_KIND_TEXT,
                       timeout: float = 15) -> int:
        """Join, send one message, wait for its id, leave. Returns the id."""
        cmid = uuid.uuid4().hex
        done = asyncio.Event()

        async def requests() -> AsyncIterator[pb.ClientEvent]:
            yield pb.ClientEvent(hello=pb.Hello(room=room, after_id=2**62, batch_acks=True))
            yield pb.ClientEvent(send=pb.SendMessage(text=text, kind=kind, client_msg_id=cmid))  # type: ignore[arg-type]
            await done.wait()

        call = self.stub.Join(requests(), metadata=self.metadata, timeout=timeout)
        try:
            async for ev in call:
                which = ev.WhichOneof("event")
                for sent in acks_in(ev):
                    if sent.client_msg_id == cmid:
                        return int(sent.id)
                if which == "error" and ev.error.client_msg_id == cmid:
                    raise grpc.aio.AioRpcError(grpc.StatusCode(_code(ev.error.code)),
                                               grpc.aio.Metadata(), grpc.aio.Metadata(),
                                               ev.error.message)
        finally:
            done.set()
            call.cancel()
        raise TsnetchatError("the server closed the stream before confirming the message")


def acks_in(ev: pb.ServerEvent) -> Sequence[pb.Sent]:
    """The acknowledgements a server event carries: its Sent, or those inside a batch."""
    which = ev.WhichOneof("event")
    return [ev.sent] if which == "sent" else ev.batch.sent if which == "batch" else ()


def _code(value: int) -> tuple[int, str]:
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


async def connect(name: str, token: str | None, *, socket: str = "", port: int = DEFAULT_PORT,
                  proxy: str = "", address: str = "", report: Report | None = None
                  ) -> Connection:
    """Find ``name`` on the tailnet and open a channel (``tsnetchat.discovery``).

    ``token=None`` uses the token stored for that server node, renewed while in use
    (``tsnetchat.tokens``); it is looked up after discovery, so a typo gets "did you mean"
    first. ``socket=""`` looks for tailscaled at the platform's known places. ``report``
    receives each discovery step. ``address`` ("host:port") skips discovery (for tests and
    unusual setups).
    """
    if address:
        host, _, p = address.rpartition(":")
        target = Target(name=name, host=host.strip("[]"), ip=host.strip("[]"), port=int(p),
                        mode="address")
        return Connection(grpc.aio.insecure_channel(address, options=[
            *CHANNEL_OPTIONS, ("grpc.enable_http_proxy", 0)]), token or "", target=target)
    found = await discover(name, socket=socket, report=report)
    renewal = None if token is not None else Renewal.for_server(found.node, name)
    target = await route(found, port, proxy=proxy, report=report)
    channel, bridge = await open_channel(target)
    conn = Connection(channel, renewal.token if renewal else token or "", bridge=bridge,
                      target=target)
    if renewal is not None:
        try:
            await renewal.ready(conn)
        except BaseException:
            await conn.close()
            raise
    return conn


# --- a room session that survives reconnects ------------------------------------------


@dataclass
class Outgoing:
    text: str
    kind: int
    client_msg_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class SessionEvent:
    """What a UI needs to show. kind: message, presence, welcome, status, error, sent."""

    kind: str
    message: pb.ChatMessage | None = None
    presence: pb.Presence | None = None
    welcome: pb.Welcome | None = None
    text: str = ""


class RoomSession:
    """One room, kept joined across network loss, server restarts and tailscaled restarts.

    Guarantees to the consumer of ``events()``: every message is yielded once, in id order,
    with no gaps while the server still has them in history; a message given to ``send`` is
    delivered once even if the connection drops before it is acknowledged.
    """

    def __init__(self, connect_fn: Callable[[], Any], room: str, *, after_id: int | None = None,
                 max_backoff: float = 5.0) -> None:
        self._connect = connect_fn  # async () -> Connection; called for every (re)connect
        self.room = room
        self.last_id = after_id
        self.pending: dict[str, Outgoing] = {}
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.max_backoff = max_backoff
        self.connected = False
        self.closed = False
        self.conn: Connection | None = None
        self.reconnects = 0

    def send(self, text: str, kind: int = pb.MESSAGE_KIND_TEXT) -> Outgoing:
        out = Outgoing(text, kind)
        self.pending[out.client_msg_id] = out
        self._outbox.put_nowait(out)
        return out

    async def close(self) -> None:
        self.closed = True
        if self.conn is not None:
            await self.conn.close()

    async def _requests(self, resend: list[Outgoing],
                        outbox: asyncio.Queue[Outgoing]) -> AsyncIterator[pb.ClientEvent]:
        hello = pb.Hello(room=self.room, batch_acks=True)
        if self.last_id is not None:
            hello.after_id = self.last_id
        yield pb.ClientEvent(hello=hello)
        for out in resend:
            yield pb.ClientEvent(send=pb.SendMessage(text=out.text, kind=out.kind,  # type: ignore[arg-type]
                                                     client_msg_id=out.client_msg_id))
        while True:
            out = await outbox.get()
            if out.client_msg_id not in self.pending:
                continue
            yield pb.ClientEvent(send=pb.SendMessage(text=out.text, kind=out.kind,  # type: ignore[arg-type]
                                                     client_msg_id=out.client_msg_id))

    async def events(self) -> AsyncIterator[SessionEvent]:
        backoff = 0.5
        call: Any = None
        while not self.closed:
            try:
                if self.conn is None:
                    self.conn = await self._connect()
                # A fresh outbox per call: the previous call's request generator may still be
                # parked on its own queue and must not steal new messages. Everything unacked
                # is in `pending` and is resent (the server deduplicates by client_msg_id).
                self._outbox = asyncio.Queue()
                resend = list(self.pending.values())
                call = self.conn.stub.Join(self._requests(resend, self._outbox),
                                           metadata=self.conn.metadata)
                async for ev in call:
                    which = ev.WhichOneof("event")
                    if which == "welcome":
                        self.connected = True
                        backoff = 0.5
                        yield SessionEvent("welcome", welcome=ev.welcome)
                    elif which == "message":
                        for e in self._accept([ev.message]):
                            yield e
                    elif which == "batch":
                        for e in self._accept(list(ev.batch.messages)):
                            yield e
                    elif which == "presence":
                        yield SessionEvent("presence", presence=ev.presence)
                    elif which == "error":
                        if ev.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                            self.pending.pop(ev.error.client_msg_id, None)
                        yield SessionEvent("error", text=ev.error.message)
                    elif which == "going_away":
                        yield SessionEvent("status", text=f"server going away: "
                                                          f"{ev.going_away.reason}")
                    for sent in acks_in(ev):  # after a batch's messages, as the proto says
                        self.pending.pop(sent.client_msg_id, None)
                        yield SessionEvent("sent", text=sent.client_msg_id)
                # The server ended the stream normally: treat as a drop and rejoin.
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "stream ended")
            except grpc.aio.AioRpcError as e:
                self.connected = False
                if call is not None:
                    call.cancel()  # releases the request generator of the dead call
                if self.closed:
                    return
                if e.code() in FATAL:
                    yield SessionEvent("fatal", text=f"{e.code().name}: {e.details()}")
                    self.closed = True
                    return
                yield SessionEvent("status", text=f"reconnecting ({e.code().name}: "
                                                  f"{e.details()})")
            except TsnetchatError as e:
                self.connected = False
                yield SessionEvent("status", text=f"reconnecting ({e})")
                if self.conn is not None:
                    await self.conn.close()
                self.conn = None
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff)
            if self.conn is not None and backoff >= 2:
                # A long outage: rebuild the channel (tailscaled or the proxy may have moved).
                with contextlib.suppress(Exception):
                    await self.conn.close()
                self.conn = None

    def _accept(self, msgs: list[pb.ChatMessage]) -> list[SessionEvent]:
        out = []
        for m in msgs:
            if self.last_id is not None and m.id <= self.last_id:
                continue  # already shown: never twice
            self.last_id = m.id
            out.append(SessionEvent("message", message=m))
        return out

