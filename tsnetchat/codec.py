"""Encoding of server events into wire bytes, done once per event.

A chat message is serialised once; the same bytes are queued for every subscriber. When a
stream is behind, several already-encoded messages (and a sender's acks) are packed into one
``Batch`` frame by concatenating bytes, without decoding or re-encoding: protobuf's
length-delimited fields make ``ServerEvent{batch: Batch{messages: [m1, m2], sent: [s1]}}`` the
plain concatenation below, in any interleaving of the two repeated fields.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .pb import chat_pb2 as pb
from .store import StoredMessage


class Item(NamedTuple):
    """One server event, encoded once for every stream it goes to. ``frame`` is the event on
    its own; ``part`` is its encoding inside a batch frame (b"" when it cannot be batched).
    Messages have their id; other events have id 0."""

    id: int
    frame: bytes
    part: bytes = b""


_MESSAGE_FIELD = 2  # ServerEvent.message
_SENT_FIELD = 4  # ServerEvent.sent
_BATCH_FIELD = 6  # ServerEvent.batch
_BATCH_MESSAGES_FIELD = 1  # Batch.messages
_BATCH_SENT_FIELD = 2  # Batch.sent


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return bytes([(number << 3) | 2]) + _varint(len(payload)) + payload


def identity_pb(login: str, display_name: str, node: str) -> pb.Identity:
    return pb.Identity(login=login, display_name=display_name, node=node)


def message_pb(m: StoredMessage) -> pb.ChatMessage:
    return pb.ChatMessage(
        id=m.id, room=m.room, sent_unix_ms=m.ts_ms, text=m.text, kind=m.kind,  # type: ignore[arg-type]
        client_msg_id=m.client_msg_id,
        sender=identity_pb(m.sender.login, m.sender.display_name, m.sender.node),
        target_id=m.target, mentions=m.mentions, deleted_by=m.deleted_by,
        edited_unix_ms=m.edited_ms)


def message_item(m: StoredMessage) -> Item:
    raw = message_pb(m).SerializeToString()
    return Item(m.id, _len_field(_MESSAGE_FIELD, raw), _len_field(_BATCH_MESSAGES_FIELD, raw))


def sent_item(client_msg_id: str, message_id: int) -> Item:
    """An acknowledgement: a frame of its own, or a part of a batch for clients that asked
    for batched acks (Hello.batch_acks)."""
    raw = pb.Sent(client_msg_id=client_msg_id, id=message_id).SerializeToString()
    return Item(0, _len_field(_SENT_FIELD, raw), _len_field(_BATCH_SENT_FIELD, raw))


def batch_frame(parts: list[bytes]) -> bytes:
    return _len_field(_BATCH_FIELD, b"".join(parts))


def event(**kwargs: Any) -> bytes:
    """Encode a non-message ServerEvent, e.g. ``event(welcome=pb.Welcome(...))``."""
    return pb.ServerEvent(**kwargs).SerializeToString()


def event_item(**kwargs: Any) -> Item:
    return Item(0, event(**kwargs))


# The most a batch frame holds (encoded parts), far under the 4 MiB a gRPC client accepts
# by default. 256 messages (hub.FRAME_BATCH) of the 60,000 bytes max_message_bytes allows
# made a 15 MB frame, and a replay of 120 messages of 50 KB one of 6 MB, which every stock
# client refused ("Received message larger than max"), ending the stream (2026-11-23).
FRAME_BYTES = 1 << 20


def pack(items: list[Item], skip_through: int = 0, *, batch_acks: bool = False) -> list[bytes]:
    """Turn drained queue items into frames: consecutive messages (and acks, with
    ``batch_acks``) become one batch frame of at most FRAME_BYTES (a single message is
    never split). Messages with id <= skip_through (already replayed from history) are
    dropped."""
    frames: list[bytes] = []
    run: list[Item] = []
    size = 0

    def flush() -> None:
        if len(run) == 1:
            frames.append(run[0].frame)
        elif run:
            frames.append(batch_frame([i.part for i in run]))
        run.clear()

    for it in items:
        if it.id:
            if it.id <= skip_through:
                continue
        elif not (batch_acks and it.part):
            flush()
            size = 0
            frames.append(it.frame)
            continue
        size += len(it.part)
        if size > FRAME_BYTES and run:
            flush()
            size = len(it.part)
        run.append(it)
    flush()
    return frames
