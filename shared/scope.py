"""Tenant/workspace scope: roles, what each may do, and the per-request ContextVar.

Every data access on a request path reads the active scope from `current_scope()`, set
once per request with `use_scope`, so concurrent requests never see each other's scope.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from shared.errors import InvalidArgument, PermissionDenied
from shared.pb.v1 import wire_pb2


class Role(enum.IntEnum):
    """Ordered: each role may do everything the ones below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidArgument(
                f"role '{text}' is not one of viewer, operator, admin"
            ) from None

    @classmethod
    def from_wire(cls, value: int) -> Role:
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument("command carries no valid principal role") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class Action(enum.Enum):
    SPAWN = "spawn"
    STATUS = "status"
    LIST = "list"
    KILL = "kill"
    KILL_MANY = "kill many agents at once in"
    # Manage the tenant itself: tokens on the hub, workspaces on spokes.
    MANAGE = "manage tokens and workspaces of"


# The least role that may take each action; KILL by an operator is further limited to
# the agents it spawned (see role_allows).
_MIN_ROLE = {
    Action.STATUS: Role.VIEWER,
    Action.LIST: Role.VIEWER,
    Action.SPAWN: Role.OPERATOR,
    Action.KILL: Role.OPERATOR,
    Action.KILL_MANY: Role.ADMIN,
    Action.MANAGE: Role.ADMIN,
}


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def to_wire(self) -> wire_pb2.Principal:
        return wire_pb2.Principal(name=self.name, role=f"ROLE_{self.role.name}")


@dataclass(frozen=True)
class Scope:
    """Who acts, for whom, where. workspace None means every workspace in `allowed`."""

    tenant: str
    workspace: str | None
    principal: Principal
    # Workspaces the sender may see in this tenant; None means all of them.
    allowed_workspaces: frozenset[str] | None = None
    peer: str = ""
    # Set when the principal's role was lowered to what the sender's grant allows.
    role_note: str = ""

    def sees(self, tenant: str, workspace: str) -> bool:
        """Whether something in tenant and workspace is within this scope."""
        return tenant == self.tenant and self.sees_workspace(workspace)

    def sees_workspace(self, workspace: str) -> bool:
        if self.workspace is not None and workspace != self.workspace:
            return False
        return self.allowed_workspaces is None or workspace in self.allowed_workspaces


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "fleetwire_scope", default=None
)


def current_scope() -> Scope:
    """The request's scope; fails closed when none was set."""
    scope = _current.get()
    if scope is None:
        raise RuntimeError("no request scope is active: data access outside a request")
    return scope


@contextmanager
def use_scope(scope: Scope) -> Iterator[Scope]:
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def role_allows(role: Role, action: Action, *, owns_target: bool = True) -> bool:
    """Whether role may take action; operators kill only agents they spawned."""
    if role < _MIN_ROLE[action]:
        return False
    return not (action is Action.KILL and role is Role.OPERATOR and not owns_target)


def require_role(principal: Principal, action: Action, *, owns_target: bool = True,
                 note: str = "") -> None:
    """Raise PermissionDenied naming who, what, and (note) why the role is what it is."""
    if not role_allows(principal.role, action, owns_target=owns_target):
        what = action.value + ("" if owns_target else " an agent another principal spawned")
        raise PermissionDenied(
            f"principal '{principal.name}' with role {principal.role.label} may not "
            f"{what}" + (f" ({note})" if note else "; ask an admin of the tenant")
        )
