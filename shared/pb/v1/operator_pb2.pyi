from shared.pb.v1 import wire_pb2 as _wire_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpawnAgentRequest(_message.Message):
    __slots__ = ("spoke", "workspace", "template", "task", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    spoke: str
    workspace: str
    template: str
    task: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, spoke: _Optional[str] = ..., workspace: _Optional[str] = ..., template: _Optional[str] = ..., task: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("spoke", "workspace")
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    spoke: str
    workspace: str
    def __init__(self, spoke: _Optional[str] = ..., workspace: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "unreachable_spokes")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_SPOKES_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_wire_pb2.Agent]
    unreachable_spokes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agents: _Optional[_Iterable[_Union[_wire_pb2.Agent, _Mapping]]] = ..., unreachable_spokes: _Optional[_Iterable[str]] = ...) -> None: ...

class KillAgentRequest(_message.Message):
    __slots__ = ("agent_id", "grace_ms")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    grace_ms: int
    def __init__(self, agent_id: _Optional[str] = ..., grace_ms: _Optional[int] = ...) -> None: ...
