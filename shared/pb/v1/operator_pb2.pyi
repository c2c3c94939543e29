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
    __slots__ = ("agent_id", "live")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    live: bool
    def __init__(self, agent_id: _Optional[str] = ..., live: _Optional[bool] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("spoke", "workspace", "live")
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    spoke: str
    workspace: str
    live: bool
    def __init__(self, spoke: _Optional[str] = ..., workspace: _Optional[str] = ..., live: _Optional[bool] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "unreachable_spokes")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_SPOKES_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_wire_pb2.Agent]
    unreachable_spokes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agents: _Optional[_Iterable[_Union[_wire_pb2.Agent, _Mapping]]] = ..., unreachable_spokes: _Optional[_Iterable[str]] = ...) -> None: ...

class KillAgentRequest(_message.Message):
    __slots__ = ("agent_id", "grace_ms", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    grace_ms: int
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., grace_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class KillAgentsRequest(_message.Message):
    __slots__ = ("workspace", "spoke", "template", "older_than_ms", "states", "dry_run", "reason", "grace_ms")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_MS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    spoke: str
    template: str
    older_than_ms: int
    states: _containers.RepeatedScalarFieldContainer[_wire_pb2.AgentState]
    dry_run: bool
    reason: str
    grace_ms: int
    def __init__(self, workspace: _Optional[str] = ..., spoke: _Optional[str] = ..., template: _Optional[str] = ..., older_than_ms: _Optional[int] = ..., states: _Optional[_Iterable[_Union[_wire_pb2.AgentState, str]]] = ..., dry_run: _Optional[bool] = ..., reason: _Optional[str] = ..., grace_ms: _Optional[int] = ...) -> None: ...

class KillResult(_message.Message):
    __slots__ = ("agent", "error")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    agent: _wire_pb2.Agent
    error: str
    def __init__(self, agent: _Optional[_Union[_wire_pb2.Agent, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class KillAgentsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[KillResult]
    def __init__(self, results: _Optional[_Iterable[_Union[KillResult, _Mapping]]] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("principal", "role")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    principal: str
    role: _wire_pb2.Role
    def __init__(self, principal: _Optional[str] = ..., role: _Optional[_Union[_wire_pb2.Role, str]] = ...) -> None: ...

class IssuedToken(_message.Message):
    __slots__ = ("id", "token", "tenant", "principal", "role", "retired", "replaces")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    id: int
    token: str
    tenant: str
    principal: str
    role: _wire_pb2.Role
    retired: _containers.RepeatedScalarFieldContainer[int]
    replaces: int
    def __init__(self, id: _Optional[int] = ..., token: _Optional[str] = ..., tenant: _Optional[str] = ..., principal: _Optional[str] = ..., role: _Optional[_Union[_wire_pb2.Role, str]] = ..., retired: _Optional[_Iterable[int]] = ..., replaces: _Optional[int] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "tenant", "principal", "role", "created_at_ms", "state", "expires_at_ms", "replaced_by_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    tenant: str
    principal: str
    role: _wire_pb2.Role
    created_at_ms: int
    state: str
    expires_at_ms: int
    replaced_by_id: int
    def __init__(self, id: _Optional[int] = ..., tenant: _Optional[str] = ..., principal: _Optional[str] = ..., role: _Optional[_Union[_wire_pb2.Role, str]] = ..., created_at_ms: _Optional[int] = ..., state: _Optional[str] = ..., expires_at_ms: _Optional[int] = ..., replaced_by_id: _Optional[int] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RotateTokenRequest(_message.Message):
    __slots__ = ("id", "grace_hours")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_HOURS_FIELD_NUMBER: _ClassVar[int]
    id: int
    grace_hours: int
    def __init__(self, id: _Optional[int] = ..., grace_hours: _Optional[int] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateWorkspaceRequest(_message.Message):
    __slots__ = ("spoke", "workspace", "max_agents")
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGENTS_FIELD_NUMBER: _ClassVar[int]
    spoke: str
    workspace: str
    max_agents: int
    def __init__(self, spoke: _Optional[str] = ..., workspace: _Optional[str] = ..., max_agents: _Optional[int] = ...) -> None: ...

class WatchAgentsRequest(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    def __init__(self, workspace: _Optional[str] = ...) -> None: ...

class GetLogsRequest(_message.Message):
    __slots__ = ("agent_id", "tail_lines")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    tail_lines: int
    def __init__(self, agent_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class ListSpokesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpokeInfo(_message.Message):
    __slots__ = ("name", "address", "status", "last_heartbeat_ms", "agents_by_state", "isolation")
    class AgentsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    status: str
    last_heartbeat_ms: int
    agents_by_state: _containers.ScalarMap[str, int]
    isolation: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[str] = ..., last_heartbeat_ms: _Optional[int] = ..., agents_by_state: _Optional[_Mapping[str, int]] = ..., isolation: _Optional[str] = ...) -> None: ...

class ListSpokesResponse(_message.Message):
    __slots__ = ("spokes",)
    SPOKES_FIELD_NUMBER: _ClassVar[int]
    spokes: _containers.RepeatedCompositeFieldContainer[SpokeInfo]
    def __init__(self, spokes: _Optional[_Iterable[_Union[SpokeInfo, _Mapping]]] = ...) -> None: ...
