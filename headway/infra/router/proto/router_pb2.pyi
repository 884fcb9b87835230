# Type stub for router_pb2.py (generated from router.proto, whose messages are built at import
# time and so invisible to a type checker). Written in the form `protoc --pyi_out` produces;
# regenerate it with the module: add --pyi_out=. to the command in router.proto.
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("model", "path", "body", "region")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    body: bytes
    region: str
    def __init__(self, model: str | None = ..., path: str | None = ..., body: bytes | None = ...,
                 region: str | None = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("status", "body", "replica")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    status: int
    body: bytes
    replica: str
    def __init__(self, status: int | None = ..., body: bytes | None = ..., replica: str | None = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("event", "data")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    event: str
    data: bytes
    def __init__(self, event: str | None = ..., data: bytes | None = ...) -> None: ...
