from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_VIEWER: _ClassVar[Role]
    ROLE_OPERATOR: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_PENDING: _ClassVar[AgentState]
    AGENT_STATE_RUNNING: _ClassVar[AgentState]
    AGENT_STATE_SUCCEEDED: _ClassVar[AgentState]
    AGENT_STATE_FAILED: _ClassVar[AgentState]
    AGENT_STATE_KILLED: _ClassVar[AgentState]
    AGENT_STATE_TIMED_OUT: _ClassVar[AgentState]
    AGENT_STATE_LOST: _ClassVar[AgentState]
    AGENT_STATE_UNKNOWN: _ClassVar[AgentState]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_PERMISSION_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
ROLE_UNSPECIFIED: Role
ROLE_VIEWER: Role
ROLE_OPERATOR: Role
ROLE_ADMIN: Role
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_PENDING: AgentState
AGENT_STATE_RUNNING: AgentState
AGENT_STATE_SUCCEEDED: AgentState
AGENT_STATE_FAILED: AgentState
AGENT_STATE_KILLED: AgentState
AGENT_STATE_TIMED_OUT: AgentState
AGENT_STATE_LOST: AgentState
AGENT_STATE_UNKNOWN: AgentState
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_PERMISSION_DENIED: ErrorCode
ERROR_CODE_RESOURCE_EXHAUSTED: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class SignedEnvelope(_message.Message):
    __slots__ = ("envelope", "signature", "key_id")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    signature: bytes
    key_id: str
    def __init__(self, envelope: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("message_id", "sender", "recipient", "key_id", "issued_at_ms", "in_reply_to", "command", "response", "report", "heartbeat", "key_announcement")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    IN_REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    KEY_ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    sender: str
    recipient: str
    key_id: str
    issued_at_ms: int
    in_reply_to: str
    command: Command
    response: Response
    report: StatusReport
    heartbeat: Heartbeat
    key_announcement: KeyAnnouncement
    def __init__(self, message_id: _Optional[str] = ..., sender: _Optional[str] = ..., recipient: _Optional[str] = ..., key_id: _Optional[str] = ..., issued_at_ms: _Optional[int] = ..., in_reply_to: _Optional[str] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., response: _Optional[_Union[Response, _Mapping]] = ..., report: _Optional[_Union[StatusReport, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., key_announcement: _Optional[_Union[KeyAnnouncement, _Mapping]] = ...) -> None: ...

class KeyAnnouncement(_message.Message):
    __slots__ = ("new_public_key", "grace_until_ms")
    NEW_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    GRACE_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    new_public_key: bytes
    grace_until_ms: int
    def __init__(self, new_public_key: _Optional[bytes] = ..., grace_until_ms: _Optional[int] = ...) -> None: ...

class AgentUpdate(_message.Message):
    __slots__ = ("agent", "seq")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    seq: int
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("updates", "snapshot")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[AgentUpdate]
    snapshot: bool
    def __init__(self, updates: _Optional[_Iterable[_Union[AgentUpdate, _Mapping]]] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("agents_running", "interval_ms", "address", "isolation")
    AGENTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    agents_running: int
    interval_ms: int
    address: str
    isolation: str
    def __init__(self, agents_running: _Optional[int] = ..., interval_ms: _Optional[int] = ..., address: _Optional[str] = ..., isolation: _Optional[str] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("name", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: Role
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("tenant", "workspace", "principal", "deadline_ms", "spawn", "get", "list", "kill", "create_workspace", "logs")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SPAWN_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    CREATE_WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    workspace: str
    principal: Principal
    deadline_ms: int
    spawn: SpawnAgent
    get: GetAgent
    list: ListAgents
    kill: KillAgent
    create_workspace: CreateWorkspace
    logs: GetLogs
    def __init__(self, tenant: _Optional[str] = ..., workspace: _Optional[str] = ..., principal: _Optional[_Union[Principal, _Mapping]] = ..., deadline_ms: _Optional[int] = ..., spawn: _Optional[_Union[SpawnAgent, _Mapping]] = ..., get: _Optional[_Union[GetAgent, _Mapping]] = ..., list: _Optional[_Union[ListAgents, _Mapping]] = ..., kill: _Optional[_Union[KillAgent, _Mapping]] = ..., create_workspace: _Optional[_Union[CreateWorkspace, _Mapping]] = ..., logs: _Optional[_Union[GetLogs, _Mapping]] = ...) -> None: ...

class GetLogs(_message.Message):
    __slots__ = ("agent_id", "tail_lines")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    tail_lines: int
    def __init__(self, agent_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class AgentLogs(_message.Message):
    __slots__ = ("agent_id", "text", "truncated")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    text: str
    truncated: bool
    def __init__(self, agent_id: _Optional[str] = ..., text: _Optional[str] = ..., truncated: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateWorkspace(_message.Message):
    __slots__ = ("max_agents",)
    MAX_AGENTS_FIELD_NUMBER: _ClassVar[int]
    max_agents: int
    def __init__(self, max_agents: _Optional[int] = ...) -> None: ...

class Workspace(_message.Message):
    __slots__ = ("spoke", "tenant", "workspace", "max_agents")
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGENTS_FIELD_NUMBER: _ClassVar[int]
    spoke: str
    tenant: str
    workspace: str
    max_agents: int
    def __init__(self, spoke: _Optional[str] = ..., tenant: _Optional[str] = ..., workspace: _Optional[str] = ..., max_agents: _Optional[int] = ...) -> None: ...

class SpawnAgent(_message.Message):
    __slots__ = ("agent_id", "template", "task", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    template: str
    task: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, agent_id: _Optional[str] = ..., template: _Optional[str] = ..., task: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetAgent(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class ListAgents(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KillAgent(_message.Message):
    __slots__ = ("agent_id", "grace_ms", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    grace_ms: int
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., grace_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("agent_id", "spoke", "tenant", "workspace", "template", "task", "principal", "state", "exit_code", "created_at_ms", "started_at_ms", "ended_at_ms", "reason", "stale", "reported_at_ms", "seq")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SPOKE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    spoke: str
    tenant: str
    workspace: str
    template: str
    task: str
    principal: str
    state: AgentState
    exit_code: int
    created_at_ms: int
    started_at_ms: int
    ended_at_ms: int
    reason: str
    stale: bool
    reported_at_ms: int
    seq: int
    def __init__(self, agent_id: _Optional[str] = ..., spoke: _Optional[str] = ..., tenant: _Optional[str] = ..., workspace: _Optional[str] = ..., template: _Optional[str] = ..., task: _Optional[str] = ..., principal: _Optional[str] = ..., state: _Optional[_Union[AgentState, str]] = ..., exit_code: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., started_at_ms: _Optional[int] = ..., ended_at_ms: _Optional[int] = ..., reason: _Optional[str] = ..., stale: _Optional[bool] = ..., reported_at_ms: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class AgentList(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("agent", "agents", "error", "workspace", "logs", "ack")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    agents: AgentList
    error: Error
    workspace: Workspace
    logs: AgentLogs
    ack: Ack
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., agents: _Optional[_Union[AgentList, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., workspace: _Optional[_Union[Workspace, _Mapping]] = ..., logs: _Optional[_Union[AgentLogs, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("call", "envelope")
    CALL_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    call: int
    envelope: SignedEnvelope
    def __init__(self, call: _Optional[int] = ..., envelope: _Optional[_Union[SignedEnvelope, _Mapping]] = ...) -> None: ...

class Delivered(_message.Message):
    __slots__ = ("call", "envelope", "refusal")
    CALL_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    call: int
    envelope: SignedEnvelope
    refusal: Refusal
    def __init__(self, call: _Optional[int] = ..., envelope: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("status", "message", "retry_after_ms")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    status: int
    message: str
    retry_after_ms: int
    def __init__(self, status: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class JoinClaim(_message.Message):
    __slots__ = ("token", "name", "public_key", "tls_cert", "address", "issued_at_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    public_key: bytes
    tls_cert: bytes
    address: str
    issued_at_ms: int
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ..., public_key: _Optional[bytes] = ..., tls_cert: _Optional[bytes] = ..., address: _Optional[str] = ..., issued_at_ms: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("claim", "signature")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    claim: bytes
    signature: bytes
    def __init__(self, claim: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("hub_name", "public_key", "tls_cert", "peer_port", "state")
    HUB_NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    PEER_PORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    hub_name: str
    public_key: bytes
    tls_cert: bytes
    peer_port: int
    state: str
    def __init__(self, hub_name: _Optional[str] = ..., public_key: _Optional[bytes] = ..., tls_cert: _Optional[bytes] = ..., peer_port: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...
