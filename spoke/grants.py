"""Grants: which hub may act in which tenant and workspace of this spoke, up to what role."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import check_slug
from shared.db import models
from shared.db.models import ALL_WORKSPACES
from shared.envelope import now_ms
from shared.errors import InvalidArgument, NotFound
from shared.peers import find_peer
from shared.scope import Role
from shared.tenancy import require_tenant, workspace_exists


@dataclass(frozen=True)
class TenantGrant:
    """Everything one hub holds in one tenant: max role per workspace ('*' = all)."""

    roles: dict[str, Role]

    def max_role_in(self, workspace: str) -> Role | None:
        found = [r for ws, r in self.roles.items() if ws in (workspace, ALL_WORKSPACES)]
        return max(found) if found else None

    @property
    def workspaces(self) -> frozenset[str] | None:
        """The workspaces covered, or None for the whole tenant."""
        return None if ALL_WORKSPACES in self.roles else frozenset(self.roles)


async def add_grant(
    session: AsyncSession, *, peer: str, tenant: str, workspace: str | None, max_role: Role
) -> None:
    p = await find_peer(session, peer)
    if p is None:
        raise NotFound(f"peer '{peer}' not found; join the hub first (`fleetwire join`) or "
                       "add it with `fleetwire peer add`")
    t = await require_tenant(session, tenant)
    if workspace is not None:
        check_slug("workspace", workspace)
        if not await workspace_exists(session, tenant, workspace):
            raise NotFound(
                f"workspace '{workspace}' not found in tenant '{tenant}'; create it with "
                "`fleetwire workspace create`"
            )
    session.add(models.Grant(peer_id=p.id, tenant_id=t.id,
                             workspace=workspace or ALL_WORKSPACES,
                             max_role=max_role.value, created_at_ms=now_ms()))
    try:
        await session.flush()
    except IntegrityError:
        raise InvalidArgument(
            f"peer '{peer}' already holds a grant for tenant '{tenant}'"
            + (f" workspace '{workspace}'" if workspace else "")
        ) from None


async def revoke_grant(
    session: AsyncSession, *, peer: str, tenant: str, workspace: str | None
) -> None:
    """Remove one grant; the hub's next command in that scope answers NOT_FOUND."""
    scope = workspace or ALL_WORKSPACES
    grant = (await session.execute(
        select(models.Grant)
        .join(models.Peer, models.Peer.id == models.Grant.peer_id)
        .join(models.Tenant, models.Tenant.id == models.Grant.tenant_id)
        .where(models.Peer.name == peer, models.Tenant.slug == tenant,
               models.Grant.workspace == scope))).scalar_one_or_none()
    if grant is None:
        where = f"tenant '{tenant}'" + (f" workspace '{workspace}'" if workspace else "")
        raise NotFound(f"peer '{peer}' holds no grant for {where}; see `fleetwire grant list`")
    await session.delete(grant)


# Asked on every command; built once.
_GRANTS = (select(models.Grant.workspace, models.Grant.max_role)
           .join(models.Peer, models.Peer.id == models.Grant.peer_id)
           .join(models.Tenant, models.Tenant.id == models.Grant.tenant_id)
           .where(models.Peer.name == bindparam("b_peer"),
                  models.Tenant.slug == bindparam("b_tenant")))


async def tenant_grant(session: AsyncSession, peer: str, tenant: str) -> TenantGrant | None:
    """The grants `peer` holds in `tenant`, or None (then the tenant is invisible to it)."""
    rows = (await session.execute(_GRANTS, {"b_peer": peer, "b_tenant": tenant})).all()
    if not rows:
        return None
    roles: dict[str, Role] = {}
    for ws, role in rows:
        roles[ws] = max(roles.get(ws, Role.VIEWER), Role(role))
    return TenantGrant(roles=roles)


async def list_grants(session: AsyncSession) -> list[tuple[str, str, str, str]]:
    rows = (await session.execute(
        select(models.Peer.name, models.Tenant.slug, models.Grant.workspace,
               models.Grant.max_role)
        .join(models.Peer, models.Peer.id == models.Grant.peer_id)
        .join(models.Tenant, models.Tenant.id == models.Grant.tenant_id)
        .order_by(models.Peer.name, models.Tenant.slug, models.Grant.workspace))).all()
    return [(p, t, w, Role(r).label) for p, t, w, r in rows]
