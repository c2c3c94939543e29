"""The hub's operator gRPC surface. Token checks happen in one place: `_authorized`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from hub.operator import HubOperator
from hub.tokens import authenticate
from shared.errors import FleetwireError, Internal, Unauthenticated, abort
from shared.pb.v1 import operator_pb2, operator_pb2_grpc, wire_pb2
from shared.scope import Scope, use_scope

log = logging.getLogger(__name__)
R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def _authorized(method: Handler[R]) -> Handler[R]:
    """Resolve the bearer token to tenant and principal, set the scope, map errors."""

    @functools.wraps(method)
    async def wrapper(self: OperatorService, request: Any,
                      context: grpc.aio.ServicerContext) -> R:
        try:
            token = ""
            for key, value in context.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str):
                    token = value.removeprefix("Bearer ").strip()
            if not token:
                raise Unauthenticated(
                    "no operator token; pass --token or set FLEETWIRE_TOKEN")
            async with self._sessions() as session:
                tenant, principal = await authenticate(session, token)
            with use_scope(Scope(tenant=tenant, workspace=None, principal=principal)):
                return await method(self, request, context)
        except FleetwireError as err:
            await abort(context, err)
        except Exception:
            log.exception("operator request failed")
            await abort(context, Internal("internal error on the hub; its log has the details"))

    return wrapper


class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(self, sessions: async_sessionmaker[AsyncSession], operator: HubOperator) -> None:
        self._sessions = sessions
        self._operator = operator

    @_authorized
    async def SpawnAgent(self, request: operator_pb2.SpawnAgentRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> wire_pb2.Agent:
        return await self._operator.spawn(request)

    @_authorized
    async def GetAgent(self, request: operator_pb2.GetAgentRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> wire_pb2.Agent:
        return await self._operator.status(request.agent_id)

    @_authorized
    async def ListAgents(self, request: operator_pb2.ListAgentsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> operator_pb2.ListAgentsResponse:
        return await self._operator.list_agents(request)

    @_authorized
    async def KillAgent(self, request: operator_pb2.KillAgentRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> wire_pb2.Agent:
        grace = request.grace_ms if request.HasField("grace_ms") else None
        return await self._operator.kill(request.agent_id, grace)
