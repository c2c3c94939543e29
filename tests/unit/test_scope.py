"""Roles, what each may do, and the per-request scope ContextVar."""

from __future__ import annotations

import asyncio
import contextvars
import random

import pytest

from shared.errors import InvalidArgument, PermissionDenied
from shared.pb.v1 import wire_pb2
from shared.scope import (
    Action,
    Principal,
    Role,
    Scope,
    current_scope,
    require_role,
    role_allows,
    use_scope,
)


def make_scope(tenant: str = "acme", workspace: str | None = "ws",
               role: Role = Role.OPERATOR, **kw) -> Scope:
    return Scope(tenant=tenant, workspace=workspace,
                 principal=Principal(name=f"{tenant}-user", role=role), **kw)


# ---------------------------------------------------------------- Role


def test_roles_are_ordered() -> None:
    assert Role.VIEWER < Role.OPERATOR < Role.ADMIN
    assert max(Role.VIEWER, Role.ADMIN, Role.OPERATOR) is Role.ADMIN
    assert sorted([Role.ADMIN, Role.VIEWER, Role.OPERATOR]) == [
        Role.VIEWER, Role.OPERATOR, Role.ADMIN]


@pytest.mark.parametrize(("text", "role"), [
    ("viewer", Role.VIEWER), ("operator", Role.OPERATOR), ("admin", Role.ADMIN),
    ("ADMIN", Role.ADMIN), ("Operator", Role.OPERATOR),
])
def test_parse_role(text: str, role: Role) -> None:
    assert Role.parse(text) is role
    assert Role.parse(role.label) is role


@pytest.mark.parametrize("text", ["", "root", "owner", "admins", "1", "VIEW"])
def test_parse_role_refuses_unknown(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        Role.parse(text)
    assert f"'{text}'" in exc.value.message
    assert "viewer, operator, admin" in exc.value.message


def test_role_labels() -> None:
    assert [r.label for r in Role] == ["viewer", "operator", "admin"]


def test_role_wire_values_match_proto() -> None:
    assert Role.VIEWER.value == wire_pb2.ROLE_VIEWER
    assert Role.OPERATOR.value == wire_pb2.ROLE_OPERATOR
    assert Role.ADMIN.value == wire_pb2.ROLE_ADMIN
    for role in Role:
        assert Role.from_wire(role.value) is role
    p = Principal(name="alice", role=Role.ADMIN).to_wire()
    assert (p.name, p.role) == ("alice", wire_pb2.ROLE_ADMIN)


@pytest.mark.parametrize("value", [wire_pb2.ROLE_UNSPECIFIED, 4, -1, 99])
def test_from_wire_refuses_unspecified_or_unknown(value: int) -> None:
    with pytest.raises(InvalidArgument, match="principal role"):
        Role.from_wire(value)


# ---------------------------------------------------------------- role_allows matrix

VIEW, OPER, ADM = Role.VIEWER, Role.OPERATOR, Role.ADMIN
MATRIX = {
    # (role, action, owns_target): allowed
    (VIEW, Action.STATUS, True): True,
    (VIEW, Action.LIST, True): True,
    (VIEW, Action.SPAWN, True): False,
    (VIEW, Action.KILL, True): False,
    (VIEW, Action.KILL, False): False,
    (OPER, Action.STATUS, True): True,
    (OPER, Action.LIST, True): True,
    (OPER, Action.SPAWN, True): True,
    (OPER, Action.KILL, True): True,
    (OPER, Action.KILL, False): False,
    (ADM, Action.STATUS, True): True,
    (ADM, Action.LIST, True): True,
    (ADM, Action.SPAWN, True): True,
    (ADM, Action.KILL, True): True,
    (ADM, Action.KILL, False): True,
}


@pytest.mark.parametrize(("role", "action", "owns", "allowed"),
                         [(*k, v) for k, v in MATRIX.items()],
                         ids=[f"{k[0].label}-{k[1].value}-{'own' if k[2] else 'other'}"
                              for k in MATRIX])
def test_role_allows_matrix(role: Role, action: Action, owns: bool, allowed: bool) -> None:
    assert role_allows(role, action, owns_target=owns) is allowed


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("action", [Action.STATUS, Action.LIST, Action.SPAWN])
def test_ownership_matters_only_for_kill(role: Role, action: Action) -> None:
    assert role_allows(role, action, owns_target=False) == role_allows(role, action)


def test_require_role_passes_silently_when_allowed() -> None:
    assert require_role(Principal("op", Role.OPERATOR), Action.KILL) is None
    assert require_role(Principal("adm", Role.ADMIN), Action.KILL, owns_target=False) is None


def test_require_role_denies_viewer_spawn() -> None:
    with pytest.raises(PermissionDenied) as exc:
        require_role(Principal("vic", Role.VIEWER), Action.SPAWN)
    msg = exc.value.message
    assert "'vic'" in msg and "viewer" in msg and "spawn" in msg


def test_require_role_denies_operator_killing_foreign_agent() -> None:
    with pytest.raises(PermissionDenied) as exc:
        require_role(Principal("olga", Role.OPERATOR), Action.KILL, owns_target=False)
    assert "another principal spawned" in exc.value.message
    assert exc.value.exit_code == 4


# ---------------------------------------------------------------- Scope.sees_workspace


def test_sees_workspace() -> None:
    pinned = make_scope(workspace="ws")
    assert pinned.sees_workspace("ws") and not pinned.sees_workspace("other")
    everything = make_scope(workspace=None)
    assert everything.sees_workspace("ws") and everything.sees_workspace("other")
    limited = make_scope(workspace=None, allowed_workspaces=frozenset({"a"}))
    assert limited.sees_workspace("a") and not limited.sees_workspace("b")
    # A pinned workspace outside the allowed set is still invisible.
    assert not make_scope(workspace="b", allowed_workspaces=frozenset({"a"})).sees_workspace("b")


# ---------------------------------------------------------------- ContextVar


def test_current_scope_fails_closed_when_unset() -> None:
    # A fresh context, independent of whatever ran before in this thread.
    def probe() -> None:
        with pytest.raises(RuntimeError, match="no request scope"):
            current_scope()

    contextvars.Context().run(probe)


def test_use_scope_sets_and_restores() -> None:
    def body() -> None:
        outer, inner = make_scope("outer"), make_scope("inner")
        with use_scope(outer) as s:
            assert s is outer and current_scope() is outer
            with use_scope(inner):
                assert current_scope() is inner
            assert current_scope() is outer
        with pytest.raises(RuntimeError):
            current_scope()

    contextvars.Context().run(body)


def test_use_scope_restores_after_exception() -> None:
    def body() -> None:
        with pytest.raises(ValueError), use_scope(make_scope()):
            raise ValueError("boom")
        with pytest.raises(RuntimeError):
            current_scope()

    contextvars.Context().run(body)


async def test_concurrent_tasks_never_see_each_others_scope() -> None:
    tenants = [f"tenant-{i % 7}" for i in range(200)]
    rng = random.Random(1234)
    yields = [rng.randint(1, 6) for _ in tenants]
    observed: list[list[str]] = [[] for _ in tenants]
    started = asyncio.Event()
    running = 0

    async def request(i: int) -> None:
        nonlocal running
        scope = make_scope(tenants[i], f"ws-{i}", role=list(Role)[i % 3])
        with use_scope(scope):
            running += 1
            if running == len(tenants):
                started.set()
            # Wait until every task holds its own scope at once, then interleave.
            await started.wait()
            for _ in range(yields[i]):
                await asyncio.sleep(0)
                s = current_scope()
                observed[i].append(f"{s.tenant}/{s.workspace}")
                assert s is scope
        with pytest.raises(RuntimeError):
            current_scope()

    with pytest.raises(RuntimeError):
        current_scope()
    await asyncio.gather(*(request(i) for i in range(len(tenants))))

    for i, seen in enumerate(observed):
        assert seen == [f"{tenants[i]}/ws-{i}"] * yields[i]
    # The test task itself never picked up a scope from its children.
    with pytest.raises(RuntimeError):
        current_scope()
