"""The generated protobuf modules under one short name (generated code lives in _generated)."""

from ._generated.tsnetchat.v1 import chat_pb2 as chat_pb2
from ._generated.tsnetchat.v1 import chat_pb2_grpc as chat_pb2_grpc

__all__ = ["chat_pb2", "chat_pb2_grpc"]
