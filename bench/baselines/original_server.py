#!/usr/bin/env python3
"""The original design, reproduced faithfully, speaking tsnetchat.v1 so one load generator
drives both servers in the same run.

From the seed documents: a synchronous grpc server with a thread pool (max_workers=10), one
queue.Queue per client, a broadcast that puts into every queue, and a thread per stream
reading its queue (the stream handler itself runs on a pool thread; Join also starts a
listener thread for the client's messages, as the chatroom seed does). A static token list
stands in for its "predefined tokens". Each message object is serialised by grpc per
subscriber (no shared bytes). A client beyond max_workers is not served at all: its stream
waits for a free pool thread. We measure that honestly instead of raising the pool.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.pb import chat_pb2_grpc as pb_grpc

TOKENS = {"bench-token"}


class ChatRoom(pb_grpc.ChatServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[int, queue.Queue[pb.ServerEvent]] = {}
        self.next_client = 0
        self.next_id = 0

    def _auth(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        if md.get("authorization", "").removeprefix("Bearer ") not in TOKENS:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")

    def _register(self) -> tuple[int, queue.Queue[pb.ServerEvent]]:
        q: queue.Queue[pb.ServerEvent] = queue.Queue()
        with self.lock:
            self.next_client += 1
            self.clients[self.next_client] = q
            return self.next_client, q

    def broadcast(self, text: str, room: str) -> int:
        with self.lock:
            self.next_id += 1
            ev = pb.ServerEvent(message=pb.ChatMessage(
                id=self.next_id, room=room, text=text, sent_unix_ms=int(time.time() * 1000),
                sender=pb.Identity(login="bench")))
            for q in self.clients.values():
                q.put(ev)
            return self.next_id

    def _stream(self, cid: int, q: queue.Queue[pb.ServerEvent],
                context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            while context.is_active():
                try:
                    yield q.get(timeout=0.5)
                except queue.Empty:
                    continue
        finally:
            with self.lock:
                self.clients.pop(cid, None)

    def Subscribe(self, request, context):  # type: ignore[no-untyped-def]
        self._auth(context)
        cid, q = self._register()
        yield pb.ServerEvent(replay_done=pb.ReplayDone())
        yield from self._stream(cid, q, context)

    def Join(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self._auth(context)
        cid, q = self._register()
        room = "general"

        def listen() -> None:
            nonlocal room
            try:
                for ev in request_iterator:
                    which = ev.WhichOneof("event")
                    if which == "hello":
                        room = ev.hello.room
                    elif which == "send":
                        mid = self.broadcast(ev.send.text, room)
                        q.put(pb.ServerEvent(sent=pb.Sent(client_msg_id=ev.send.client_msg_id,
                                                          id=mid)))
            except grpc.RpcError:
                pass

        threading.Thread(target=listen, daemon=True).start()
        yield pb.ServerEvent(replay_done=pb.ReplayDone())
        yield from self._stream(cid, q, context)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    pb_grpc.add_ChatServicer_to_server(ChatRoom(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
