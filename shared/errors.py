"""Domain errors and the one place that maps them to gRPC status and CLI exit codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from shared.pb.v1 import wire_pb2

RETRY_AFTER_KEY = "retry-after-ms"
# Trailing metadata a daemon adds to every status it ends a call with itself: a client
# then knows an UNAVAILABLE came from the daemon (say, about a spoke behind a hub), not
# from failing to reach it.
REFUSED_KEY = "fleetwire-refused"
# The metadata key that names an operator call that creates or changes something, so
# the same call again gets the first answer (hub/idempotency.py).
IDEMPOTENCY_KEY = "idempotency-key"


class FleetwireError(Exception):
    """A refusal meant for a person: the message says what was wrong and what to do."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 1
    wire_code: wire_pb2.ErrorCode = wire_pb2.ERROR_CODE_INTERNAL

    def __init__(self, message: str, *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidArgument(FleetwireError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2
    wire_code = wire_pb2.ERROR_CODE_INVALID_ARGUMENT


class Unauthenticated(FleetwireError):
    status = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 5


class EnvelopeRejected(Unauthenticated):
    """An envelope refused by one of the wire rules; `rule` names which, from a fixed set
    (shared.metrics.REJECTION_REASONS), so it can label a metric."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class NotFound(FleetwireError):
    status = grpc.StatusCode.NOT_FOUND
    exit_code = 3
    wire_code = wire_pb2.ERROR_CODE_NOT_FOUND


class PermissionDenied(FleetwireError):
    status = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 4
    wire_code = wire_pb2.ERROR_CODE_PERMISSION_DENIED


class ResourceExhausted(FleetwireError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 6
    wire_code = wire_pb2.ERROR_CODE_RESOURCE_EXHAUSTED


class Unavailable(FleetwireError):
    status = grpc.StatusCode.UNAVAILABLE
    exit_code = 7


class Internal(FleetwireError):
    pass


_BY_STATUS: dict[grpc.StatusCode, type[FleetwireError]] = {
    cls.status: cls
    for cls in (InvalidArgument, Unauthenticated, NotFound, PermissionDenied,
                ResourceExhausted, Unavailable, Internal)
}
_BY_WIRE: dict[int, type[FleetwireError]] = {
    cls.wire_code: cls
    for cls in (InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Internal)
}


def not_found_agent(agent_id: str) -> NotFound:
    """The one NOT_FOUND for agents: absent and out-of-scope must read the same."""
    return NotFound(f"agent '{agent_id}' not found; check the id with `fleetwire agent list`")


def not_found_workspace(workspace: str) -> NotFound:
    """The one NOT_FOUND for workspaces: ungranted tenant and missing slug read the same."""
    return NotFound(
        f"workspace '{workspace}' not found; check the slug, and that the spoke has the "
        "workspace and a grant for this hub"
    )


def not_found_tenant(tenant: str) -> NotFound:
    """The one NOT_FOUND for tenants: ungranted and nonexistent read the same."""
    return NotFound(
        f"tenant '{tenant}' not found; check that the spoke has the tenant and a grant for "
        "this hub"
    )


def to_wire_error(err: FleetwireError) -> wire_pb2.Error:
    """A domain error as the signed Error a spoke answers with."""
    return wire_pb2.Error(code=err.wire_code, message=err.message,
                          retry_after_ms=err.retry_after_ms)


def from_wire_error(err: wire_pb2.Error) -> FleetwireError:
    """A signed Error from a peer, back as a domain error."""
    cls = _BY_WIRE.get(err.code, Internal)
    return cls(err.message, retry_after_ms=err.retry_after_ms)


async def abort(context: grpc.aio.ServicerContext, err: FleetwireError) -> NoReturn:
    """End an RPC with the status that err maps to (retry hint in trailing metadata)."""
    trailing = [(REFUSED_KEY, "1")]
    if err.retry_after_ms:
        trailing.append((RETRY_AFTER_KEY, str(err.retry_after_ms)))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(err.status, err.message)
    raise AssertionError("unreachable: context.abort raises")


def from_rpc_error(err: grpc.aio.AioRpcError, *, target: str) -> FleetwireError:
    """An RPC failure seen by a client, as a domain error a person can act on."""
    code = err.code()
    detail = err.details() or ""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return InvalidArgument(
            f"{target} does not serve this API; check the address (is it the hub's "
            "operator address?)"
        )
    trailing = dict(err.trailing_metadata() or ())
    retry_after = int(trailing[RETRY_AFTER_KEY]) if str(
        trailing.get(RETRY_AFTER_KEY, "")).isdigit() else 0
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if REFUSED_KEY in trailing and detail:
            # The daemon answered: what was unavailable is what its message names (a
            # spoke behind the hub, say), not the daemon itself.
            return Unavailable(detail, retry_after_ms=retry_after)
        return Unavailable(f"cannot reach {target}: {detail or code.name}")
    cls = _BY_STATUS.get(code, Internal)
    return cls(detail or code.name, retry_after_ms=retry_after)
