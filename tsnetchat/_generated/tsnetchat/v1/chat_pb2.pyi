from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_KIND_UNSPECIFIED: _ClassVar[MessageKind]
    MESSAGE_KIND_TEXT: _ClassVar[MessageKind]
    MESSAGE_KIND_ACTION: _ClassVar[MessageKind]
    MESSAGE_KIND_EDIT: _ClassVar[MessageKind]
    MESSAGE_KIND_DELETE: _ClassVar[MessageKind]
    MESSAGE_KIND_TOPIC: _ClassVar[MessageKind]

class PresenceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRESENCE_KIND_UNSPECIFIED: _ClassVar[PresenceKind]
    PRESENCE_KIND_JOINED: _ClassVar[PresenceKind]
    PRESENCE_KIND_LEFT: _ClassVar[PresenceKind]
    PRESENCE_KIND_AWAY: _ClassVar[PresenceKind]
    PRESENCE_KIND_BACK: _ClassVar[PresenceKind]

class SearchOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_ORDER_UNSPECIFIED: _ClassVar[SearchOrder]
    SEARCH_ORDER_RANK: _ClassVar[SearchOrder]
    SEARCH_ORDER_NEWEST: _ClassVar[SearchOrder]
MESSAGE_KIND_UNSPECIFIED: MessageKind
MESSAGE_KIND_TEXT: MessageKind
MESSAGE_KIND_ACTION: MessageKind
MESSAGE_KIND_EDIT: MessageKind
MESSAGE_KIND_DELETE: MessageKind
MESSAGE_KIND_TOPIC: MessageKind
PRESENCE_KIND_UNSPECIFIED: PresenceKind
PRESENCE_KIND_JOINED: PresenceKind
PRESENCE_KIND_LEFT: PresenceKind
PRESENCE_KIND_AWAY: PresenceKind
PRESENCE_KIND_BACK: PresenceKind
SEARCH_ORDER_UNSPECIFIED: SearchOrder
SEARCH_ORDER_RANK: SearchOrder
SEARCH_ORDER_NEWEST: SearchOrder

class Identity(_message.Message):
    __slots__ = ("login", "display_name", "node")
    LOGIN_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    login: str
    display_name: str
    node: str
    def __init__(self, login: _Optional[str] = ..., display_name: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("id", "room", "sent_unix_ms", "sender", "text", "kind", "client_msg_id", "target_id", "mentions", "deleted_by", "edited_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    MENTIONS_FIELD_NUMBER: _ClassVar[int]
    DELETED_BY_FIELD_NUMBER: _ClassVar[int]
    EDITED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    room: str
    sent_unix_ms: int
    sender: Identity
    text: str
    kind: MessageKind
    client_msg_id: str
    target_id: int
    mentions: _containers.RepeatedScalarFieldContainer[str]
    deleted_by: str
    edited_unix_ms: int
    def __init__(self, id: _Optional[int] = ..., room: _Optional[str] = ..., sent_unix_ms: _Optional[int] = ..., sender: _Optional[_Union[Identity, _Mapping]] = ..., text: _Optional[str] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., client_msg_id: _Optional[str] = ..., target_id: _Optional[int] = ..., mentions: _Optional[_Iterable[str]] = ..., deleted_by: _Optional[str] = ..., edited_unix_ms: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("room", "after_id", "batch_acks")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ACKS_FIELD_NUMBER: _ClassVar[int]
    room: str
    after_id: int
    batch_acks: bool
    def __init__(self, room: _Optional[str] = ..., after_id: _Optional[int] = ..., batch_acks: _Optional[bool] = ...) -> None: ...

class SendMessage(_message.Message):
    __slots__ = ("text", "kind", "client_msg_id", "claimed_sender", "target_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_SENDER_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    kind: MessageKind
    client_msg_id: str
    claimed_sender: Identity
    target_id: int
    def __init__(self, text: _Optional[str] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., client_msg_id: _Optional[str] = ..., claimed_sender: _Optional[_Union[Identity, _Mapping]] = ..., target_id: _Optional[int] = ...) -> None: ...

class Away(_message.Message):
    __slots__ = ("away", "message", "client_msg_id")
    AWAY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    away: bool
    message: str
    client_msg_id: str
    def __init__(self, away: _Optional[bool] = ..., message: _Optional[str] = ..., client_msg_id: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("last_seen_id",)
    LAST_SEEN_ID_FIELD_NUMBER: _ClassVar[int]
    last_seen_id: int
    def __init__(self, last_seen_id: _Optional[int] = ...) -> None: ...

class ClientEvent(_message.Message):
    __slots__ = ("hello", "send", "ack", "away")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SEND_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    AWAY_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    send: SendMessage
    ack: Ack
    away: Away
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., send: _Optional[_Union[SendMessage, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., away: _Optional[_Union[Away, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("room", "you", "members", "max_message_bytes", "last_id", "rate_per_second", "rate_burst", "topic", "private", "member_logins", "last_read_id", "history_id", "history_generation", "servers", "away_logins")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    YOU_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RATE_BURST_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_LOGINS_FIELD_NUMBER: _ClassVar[int]
    LAST_READ_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    AWAY_LOGINS_FIELD_NUMBER: _ClassVar[int]
    room: str
    you: Identity
    members: _containers.RepeatedCompositeFieldContainer[Identity]
    max_message_bytes: int
    last_id: int
    rate_per_second: float
    rate_burst: int
    topic: Topic
    private: bool
    member_logins: _containers.RepeatedScalarFieldContainer[str]
    last_read_id: int
    history_id: str
    history_generation: int
    servers: _containers.RepeatedCompositeFieldContainer[ClusterServer]
    away_logins: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room: _Optional[str] = ..., you: _Optional[_Union[Identity, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., last_id: _Optional[int] = ..., rate_per_second: _Optional[float] = ..., rate_burst: _Optional[int] = ..., topic: _Optional[_Union[Topic, _Mapping]] = ..., private: _Optional[bool] = ..., member_logins: _Optional[_Iterable[str]] = ..., last_read_id: _Optional[int] = ..., history_id: _Optional[str] = ..., history_generation: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[ClusterServer, _Mapping]]] = ..., away_logins: _Optional[_Iterable[str]] = ...) -> None: ...

class Topic(_message.Message):
    __slots__ = ("text", "set_by", "set_unix_ms", "id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SET_BY_FIELD_NUMBER: _ClassVar[int]
    SET_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    set_by: Identity
    set_unix_ms: int
    id: int
    def __init__(self, text: _Optional[str] = ..., set_by: _Optional[_Union[Identity, _Mapping]] = ..., set_unix_ms: _Optional[int] = ..., id: _Optional[int] = ...) -> None: ...

class ClusterServer(_message.Message):
    __slots__ = ("name", "port", "node_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    node_id: str
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class Presence(_message.Message):
    __slots__ = ("room", "kind", "who", "members", "away_message", "reason", "away_logins")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    AWAY_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AWAY_LOGINS_FIELD_NUMBER: _ClassVar[int]
    room: str
    kind: PresenceKind
    who: Identity
    members: _containers.RepeatedCompositeFieldContainer[Identity]
    away_message: str
    reason: str
    away_logins: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room: _Optional[str] = ..., kind: _Optional[_Union[PresenceKind, str]] = ..., who: _Optional[_Union[Identity, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ..., away_message: _Optional[str] = ..., reason: _Optional[str] = ..., away_logins: _Optional[_Iterable[str]] = ...) -> None: ...

class Sent(_message.Message):
    __slots__ = ("client_msg_id", "id")
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    client_msg_id: str
    id: int
    def __init__(self, client_msg_id: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "client_msg_id", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    client_msg_id: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., client_msg_id: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ReplayDone(_message.Message):
    __slots__ = ("last_id", "history_id", "history_generation", "servers")
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    last_id: int
    history_id: str
    history_generation: int
    servers: _containers.RepeatedCompositeFieldContainer[ClusterServer]
    def __init__(self, last_id: _Optional[int] = ..., history_id: _Optional[str] = ..., history_generation: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[ClusterServer, _Mapping]]] = ...) -> None: ...

class GoingAway(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("messages", "sent")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    sent: _containers.RepeatedCompositeFieldContainer[Sent]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., sent: _Optional[_Iterable[_Union[Sent, _Mapping]]] = ...) -> None: ...

class ServerEvent(_message.Message):
    __slots__ = ("welcome", "message", "presence", "sent", "error", "batch", "replay_done", "going_away")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REPLAY_DONE_FIELD_NUMBER: _ClassVar[int]
    GOING_AWAY_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    message: ChatMessage
    presence: Presence
    sent: Sent
    error: Error
    batch: Batch
    replay_done: ReplayDone
    going_away: GoingAway
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., message: _Optional[_Union[ChatMessage, _Mapping]] = ..., presence: _Optional[_Union[Presence, _Mapping]] = ..., sent: _Optional[_Union[Sent, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., replay_done: _Optional[_Union[ReplayDone, _Mapping]] = ..., going_away: _Optional[_Union[GoingAway, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("room", "after_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    after_id: int
    def __init__(self, room: _Optional[str] = ..., after_id: _Optional[int] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("room", "before_id", "after_id", "limit")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    room: str
    before_id: int
    after_id: int
    limit: int
    def __init__(self, room: _Optional[str] = ..., before_id: _Optional[int] = ..., after_id: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("messages", "more", "max_page")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    more: bool
    max_page: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., more: _Optional[bool] = ..., max_page: _Optional[int] = ...) -> None: ...

class ListRoomsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoomInfo(_message.Message):
    __slots__ = ("name", "last_id", "members", "unread", "unread_mentions", "last_read_id", "private", "direct", "member_logins", "topic")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    UNREAD_FIELD_NUMBER: _ClassVar[int]
    UNREAD_MENTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_READ_ID_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    MEMBER_LOGINS_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    last_id: int
    members: _containers.RepeatedCompositeFieldContainer[Identity]
    unread: int
    unread_mentions: int
    last_read_id: int
    private: bool
    direct: bool
    member_logins: _containers.RepeatedScalarFieldContainer[str]
    topic: Topic
    def __init__(self, name: _Optional[str] = ..., last_id: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ..., unread: _Optional[int] = ..., unread_mentions: _Optional[int] = ..., last_read_id: _Optional[int] = ..., private: _Optional[bool] = ..., direct: _Optional[bool] = ..., member_logins: _Optional[_Iterable[str]] = ..., topic: _Optional[_Union[Topic, _Mapping]] = ...) -> None: ...

class UnreadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnreadResponse(_message.Message):
    __slots__ = ("rooms", "total_unread", "total_mentions")
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_UNREAD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MENTIONS_FIELD_NUMBER: _ClassVar[int]
    rooms: _containers.RepeatedCompositeFieldContainer[RoomInfo]
    total_unread: int
    total_mentions: int
    def __init__(self, rooms: _Optional[_Iterable[_Union[RoomInfo, _Mapping]]] = ..., total_unread: _Optional[int] = ..., total_mentions: _Optional[int] = ...) -> None: ...

class MarkReadRequest(_message.Message):
    __slots__ = ("room", "last_read_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    LAST_READ_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    last_read_id: int
    def __init__(self, room: _Optional[str] = ..., last_read_id: _Optional[int] = ...) -> None: ...

class MarkReadResponse(_message.Message):
    __slots__ = ("last_read_id",)
    LAST_READ_ID_FIELD_NUMBER: _ClassVar[int]
    last_read_id: int
    def __init__(self, last_read_id: _Optional[int] = ...) -> None: ...

class MentionsRequest(_message.Message):
    __slots__ = ("include_read", "limit")
    INCLUDE_READ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    include_read: bool
    limit: int
    def __init__(self, include_read: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class MentionsResponse(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "rooms", "author", "since_unix_ms", "until_unix_ms", "order", "limit", "offset")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    query: str
    rooms: _containers.RepeatedScalarFieldContainer[str]
    author: str
    since_unix_ms: int
    until_unix_ms: int
    order: SearchOrder
    limit: int
    offset: int
    def __init__(self, query: _Optional[str] = ..., rooms: _Optional[_Iterable[str]] = ..., author: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ..., order: _Optional[_Union[SearchOrder, str]] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("messages", "more", "next_offset")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    more: bool
    next_offset: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., more: _Optional[bool] = ..., next_offset: _Optional[int] = ...) -> None: ...

class CreateRoomRequest(_message.Message):
    __slots__ = ("room", "members")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    room: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class SetRoomMembersRequest(_message.Message):
    __slots__ = ("room", "add", "remove")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    room: str
    add: _containers.RepeatedScalarFieldContainer[str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, room: _Optional[str] = ..., add: _Optional[_Iterable[str]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class RoomMembersResponse(_message.Message):
    __slots__ = ("room", "members", "streams_closed")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    room: str
    members: _containers.RepeatedScalarFieldContainer[str]
    streams_closed: int
    def __init__(self, room: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., streams_closed: _Optional[int] = ...) -> None: ...

class ListRoomsResponse(_message.Message):
    __slots__ = ("rooms", "all_rooms_allowed")
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    ALL_ROOMS_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    rooms: _containers.RepeatedCompositeFieldContainer[RoomInfo]
    all_rooms_allowed: bool
    def __init__(self, rooms: _Optional[_Iterable[_Union[RoomInfo, _Mapping]]] = ..., all_rooms_allowed: _Optional[bool] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("identity", "rooms", "admin", "token_id", "token_expires_unix", "grant_applied")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    GRANT_APPLIED_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    rooms: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    token_id: str
    token_expires_unix: int
    grant_applied: bool
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ..., rooms: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., token_id: _Optional[str] = ..., token_expires_unix: _Optional[int] = ..., grant_applied: _Optional[bool] = ...) -> None: ...

class KickRequest(_message.Message):
    __slots__ = ("room", "login")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    LOGIN_FIELD_NUMBER: _ClassVar[int]
    room: str
    login: str
    def __init__(self, room: _Optional[str] = ..., login: _Optional[str] = ...) -> None: ...

class KickResponse(_message.Message):
    __slots__ = ("streams_closed",)
    STREAMS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    streams_closed: int
    def __init__(self, streams_closed: _Optional[int] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("streams_closed",)
    STREAMS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    streams_closed: int
    def __init__(self, streams_closed: _Optional[int] = ...) -> None: ...

class ServerNode(_message.Message):
    __slots__ = ("node_id", "name", "addresses")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class LoginRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewTokenRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ("token", "token_id", "issued_unix", "expires_unix", "rooms", "admin", "identity", "server")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    issued_unix: int
    expires_unix: int
    rooms: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    identity: Identity
    server: ServerNode
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., issued_unix: _Optional[int] = ..., expires_unix: _Optional[int] = ..., rooms: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., server: _Optional[_Union[ServerNode, _Mapping]] = ...) -> None: ...
