"""Encoding server events once and packing them into frames."""

from __future__ import annotations

import dataclasses

from tsnetchat import codec
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.store import Sender, StoredMessage


def _stored(i: int) -> StoredMessage:
    return StoredMessage("r", i, 1000 + i, Sender("a@t", "A", "n"), pb.MESSAGE_KIND_TEXT,
                         "x" * (i * 70), f"c{i}")


def test_hand_packed_frames_equal_protobufs_own_encoding() -> None:
    msgs = [_stored(i) for i in range(1, 5)]
    items = [codec.message_item(m) for m in msgs]
    acks = [codec.sent_item(f"c{i}", i) for i in (1, 2)]
    as_pb = [codec.message_pb(m) for m in msgs]
    assert items[0].frame == pb.ServerEvent(message=as_pb[0]).SerializeToString()
    assert acks[0].frame == pb.ServerEvent(sent=pb.Sent(client_msg_id="c1", id=1)
                                           ).SerializeToString()
    # Interleaved on the wire, parsed into the two repeated fields in their own order.
    (frame,) = codec.pack([items[0], acks[0], items[1], acks[1], items[2], items[3]],
                          batch_acks=True)
    batch = pb.ServerEvent.FromString(frame).batch
    assert list(batch.messages) == as_pb
    assert [(s.client_msg_id, s.id) for s in batch.sent] == [("c1", 1), ("c2", 2)]


def test_acks_get_frames_of_their_own_unless_the_client_asked_for_batched_acks() -> None:
    items = [codec.message_item(_stored(i)) for i in (1, 2)]
    ack = codec.sent_item("c1", 1)
    frames = codec.pack([items[0], ack, items[1]])
    assert [pb.ServerEvent.FromString(f).WhichOneof("event") for f in frames] == [
        "message", "sent", "message"]
    assert codec.pack([ack]) == codec.pack([ack], batch_acks=True) == [ack.frame]


def test_pack_skips_replayed_and_keeps_order() -> None:
    items = [codec.message_item(_stored(i)) for i in (3, 4, 5)]
    presence = codec.event_item(presence=pb.Presence(room="r"))
    frames = codec.pack([items[0], presence, items[1], items[2]], skip_through=3)
    decoded = [pb.ServerEvent.FromString(f) for f in frames]
    assert [d.WhichOneof("event") for d in decoded] == ["presence", "batch"]
    assert [m.id for m in decoded[1].batch.messages] == [4, 5]


def test_a_batch_of_big_messages_is_split_into_frames_a_stock_client_accepts() -> None:
    big = [StoredMessage("r", i, 1000 + i, Sender("a@t", "A", "n"), pb.MESSAGE_KIND_TEXT,
                         "x" * 60_000, f"c{i}") for i in range(1, 257)]
    items = [codec.message_item(m) for m in big]
    acks = [codec.sent_item(f"c{i}", i) for i in range(1, 257)]
    mixed = [x for pair in zip(items, acks, strict=True) for x in pair]
    frames = codec.pack(mixed, batch_acks=True)
    assert len(frames) > 1 and all(len(f) <= codec.FRAME_BYTES + 100 for f in frames)
    decoded = [pb.ServerEvent.FromString(f).batch for f in frames]
    assert [m.id for b in decoded for m in b.messages] == list(range(1, 257))
    assert [s.id for b in decoded for s in b.sent] == list(range(1, 257))
    # A single message bigger than the cap still goes out whole, on its own.
    huge = codec.message_item(dataclasses.replace(big[0], text="y" * (codec.FRAME_BYTES + 10)))
    assert codec.pack([items[1], huge, items[2]]) == [items[1].frame, huge.frame, items[2].frame]
