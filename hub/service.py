"""The hub's operator gRPC surface. Token checks happen in one place: `_authorized`."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from hub.idempotency import IdempotencyKeys, agent_id_for, key_of
from hub.operator import HubOperator
from hub.token_admin import TenantTokens
from hub.tokens import (
    Authenticated,
    Issued,
    TokenExpired,
    TokenRecord,
    check_token,
    check_token_text,
    deactivate_token,
    read_token,
)
from shared.audit import REFUSED, AuditEntry, AuditTrail, append_audit
from shared.config import SLUG_RE, check_name
from shared.envelope import now_ms
from shared.errors import FleetwireError, Internal, InvalidArgument, Unauthenticated, abort
from shared.metrics import Metrics
from shared.pb.v1 import operator_pb2, operator_pb2_grpc, wire_pb2
from shared.scope import Action, Role, Scope, current_scope, require_role, use_scope
from shared.security_view import SecurityView

log = logging.getLogger(__name__)
R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def _authorized(action: str) -> Callable[[Handler[R]], Handler[R]]:
    """Resolve the bearer token to tenant and principal, set the scope, map errors, and
    audit every refusal."""

    def decorate(method: Handler[R]) -> Handler[R]:
        @functools.wraps(method)
        async def wrapper(self: OperatorService, request: Any,
                          context: grpc.aio.ServicerContext) -> R:
            auth: Authenticated | None = None
            with self._metrics.operator_request(method.__name__) as observed:
                try:
                    # One read of the security epoch covers the token and the spoke's
                    # key that signs the answer.
                    async with self._view.checked():
                        auth = await self._authenticate(context)
                        scope = Scope(tenant=auth.tenant, workspace=None,
                                      principal=auth.principal)
                        with use_scope(scope):
                            return await method(self, request, context)
                except FleetwireError as err:
                    refusal = err
                except Exception:
                    log.exception("operator request %s failed", method.__name__,
                                  extra={"tenant": auth.tenant if auth else ""})
                    refusal = Internal("internal error on the hub; its log has the details")
                observed.refused(refusal)
            await self._refused(action, auth, request, refusal)
            await abort(context, refusal)

        return wrapper

    return decorate


def _idempotent(method: Handler[R]) -> Handler[R]:
    """Run a call that creates or changes something once per idempotency key
    (hub/idempotency.py); inside _authorized, which sets the caller's scope."""

    @functools.wraps(method)
    async def wrapper(self: OperatorService, request: Any,
                      context: grpc.aio.ServicerContext) -> R:
        answer: Any = self._answers[method.__name__]
        result: R = await self._keys.once(
            method.__name__, request, key_of(context), lambda: method(self, request, context),
            answer, secret=answer is operator_pb2.IssuedToken)
        return result

    return wrapper


class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(self, trail: AuditTrail, operator: HubOperator, metrics: Metrics,
                 view: SecurityView) -> None:
        self._trail = trail
        # Tokens (and, through the keyring, spoke keys): read once per request and kept
        # while the security epoch stands.
        self._view = view
        self._operator = operator
        self._metrics = metrics
        self._tokens = TenantTokens(trail)
        self._keys = IdempotencyKeys(trail)
        # The answer type of each call that takes an idempotency key.
        self._answers: dict[str, type[Message]] = {
            "SpawnAgent": wire_pb2.Agent, "KillAgent": wire_pb2.Agent,
            "KillAgents": operator_pb2.KillAgentsResponse,
            "CreateToken": operator_pb2.IssuedToken, "RotateToken": operator_pb2.IssuedToken,
            "RevokeToken": operator_pb2.RevokeTokenResponse,
            "CreateWorkspace": wire_pb2.Workspace}

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> Authenticated:
        """The caller's tenant and principal from its bearer token."""
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                token = value.removeprefix("Bearer ").strip()
        if not token:
            raise Unauthenticated("no operator token; pass --token or set FLEETWIRE_TOKEN")
        digest = check_token_text(token)
        found = await self._view.lookup(("token", digest), lambda: self._read_token(digest))
        return check_token(found, now_ms=now_ms())

    async def _read_token(self, digest: str) -> TokenRecord | None:
        async with self._trail.reader() as session:
            return await read_token(session, digest)

    async def _refused(self, action: str, auth: Authenticated | None, request: Any,
                       err: FleetwireError) -> None:
        """Audit a refused request; deactivate a token used after its grace with it."""
        async with self._trail.transaction() as session:
            if isinstance(err, TokenExpired):
                await deactivate_token(session, err.token_id, now_ms())
            await append_audit(session, AuditEntry(
                action=action, outcome=REFUSED,
                tenant=auth.tenant if auth else "",
                workspace=getattr(request, "workspace", ""),
                principal=auth.principal.name if auth else "",
                target=getattr(request, "agent_id", "") or getattr(request, "spoke", ""),
                reason=err.message))

    @_authorized("agent.spawn")
    @_idempotent
    async def SpawnAgent(self, request: operator_pb2.SpawnAgentRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> wire_pb2.Agent:
        key = key_of(context)
        return await self._operator.spawn(request, agent_id_for(key) if key else "")

    @_authorized("agent.status")
    async def GetAgent(self, request: operator_pb2.GetAgentRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> wire_pb2.Agent:
        return await self._operator.status(request.agent_id, live=request.live)

    @_authorized("agent.list")
    async def ListAgents(self, request: operator_pb2.ListAgentsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> operator_pb2.ListAgentsResponse:
        return await self._operator.list_agents(request)

    @_authorized("agent.kill")
    @_idempotent
    async def KillAgent(self, request: operator_pb2.KillAgentRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> wire_pb2.Agent:
        grace = request.grace_ms if request.HasField("grace_ms") else None
        return await self._operator.kill(request.agent_id, grace, request.reason)

    @_authorized("agent.kill_many")
    @_idempotent
    async def KillAgents(self, request: operator_pb2.KillAgentsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> operator_pb2.KillAgentsResponse:
        return await self._operator.kill_many(request)

    @_authorized("token.create")
    @_idempotent
    async def CreateToken(self, request: operator_pb2.CreateTokenRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> operator_pb2.IssuedToken:
        check_name("principal", request.principal)
        role = Role.from_wire(request.role)
        issued = await self._tokens.create(request.principal, role)
        return _issued(issued, current_scope().tenant, request.principal, role)

    @_authorized("token.list")
    async def ListTokens(self, request: operator_pb2.ListTokensRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> operator_pb2.ListTokensResponse:
        return operator_pb2.ListTokensResponse(tokens=[
            operator_pb2.TokenInfo(
                id=t.id, tenant=t.tenant, principal=t.principal,
                role=f"ROLE_{t.role.upper()}", created_at_ms=t.created_at_ms, state=t.state,
                expires_at_ms=t.expires_at_ms or 0, replaced_by_id=t.replaced_by_id or 0)
            for t in await self._tokens.list()])

    @_authorized("token.rotate")
    @_idempotent
    async def RotateToken(self, request: operator_pb2.RotateTokenRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> operator_pb2.IssuedToken:
        issued, info = await self._tokens.rotate(request.id, request.grace_hours)
        out = _issued(issued, info.tenant, info.principal, Role.parse(info.role))
        out.replaces = request.id
        return out

    @_authorized("token.revoke")
    @_idempotent
    async def RevokeToken(self, request: operator_pb2.RevokeTokenRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext
                          ) -> operator_pb2.RevokeTokenResponse:
        await self._tokens.revoke(request.id)
        return operator_pb2.RevokeTokenResponse()

    @_authorized("workspace.create")
    @_idempotent
    async def CreateWorkspace(self, request: operator_pb2.CreateWorkspaceRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> wire_pb2.Workspace:
        return await self._operator.create_workspace(request)


    @_authorized("agent.logs")
    async def GetLogs(self, request: operator_pb2.GetLogsRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> wire_pb2.AgentLogs:
        return await self._operator.logs(request.agent_id, request.tail_lines)

    @_authorized("spoke.list")
    async def ListSpokes(self, request: operator_pb2.ListSpokesRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext
                         ) -> operator_pb2.ListSpokesResponse:
        return await self._operator.list_spokes()

    async def WatchAgents(  # noqa: N802
        self, request: operator_pb2.WatchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire_pb2.Agent]:
        """Stream the caller's tenant's agent changes (server streaming)."""
        auth: Authenticated | None = None
        try:
            auth = await self._authenticate(context)
            scope = Scope(tenant=auth.tenant, workspace=None, principal=auth.principal)
            with use_scope(scope):
                require_role(auth.principal, Action.LIST)
                if request.workspace and not SLUG_RE.match(request.workspace):
                    raise InvalidArgument(f"workspace '{request.workspace}' is not a valid slug")
        except FleetwireError as err:
            await self._refused("agent.watch", auth, request, err)
            await abort(context, err)
        async for agent in self._operator.registry.events.watch(auth.tenant,
                                                                request.workspace):
            yield agent


def _issued(issued: Issued, tenant: str, principal: str, role: Role
            ) -> operator_pb2.IssuedToken:
    return operator_pb2.IssuedToken(id=issued.id, token=issued.token, tenant=tenant,
                                    principal=principal, role=f"ROLE_{role.name}",
                                    retired=list(issued.retired))
