"""Tenants and workspaces an instance keeps for itself."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import check_slug
from shared.db import models
from shared.envelope import now_ms
from shared.errors import InvalidArgument, NotFound


async def create_tenant(session: AsyncSession, slug: str) -> None:
    check_slug("tenant", slug)
    session.add(models.Tenant(slug=slug, created_at_ms=now_ms()))
    try:
        await session.flush()
    except IntegrityError:
        raise InvalidArgument(f"tenant '{slug}' already exists") from None


async def find_tenant(session: AsyncSession, slug: str) -> models.Tenant | None:
    return (await session.execute(
        select(models.Tenant).where(models.Tenant.slug == slug))).scalar_one_or_none()


async def require_tenant(session: AsyncSession, slug: str) -> models.Tenant:
    """For local admin commands; request paths answer NOT_FOUND through scope checks."""
    tenant = await find_tenant(session, slug)
    if tenant is None:
        raise NotFound(f"tenant '{slug}' not found; create it with `fleetwire tenant create`")
    return tenant


async def create_workspace(session: AsyncSession, tenant: str, slug: str,
                           max_agents: int | None = None) -> None:
    check_slug("workspace", slug)
    t = await require_tenant(session, tenant)
    session.add(models.Workspace(tenant_id=t.id, slug=slug, created_at_ms=now_ms(),
                                 max_agents=max_agents))
    try:
        await session.flush()
    except IntegrityError:
        raise InvalidArgument(f"workspace '{slug}' already exists in tenant '{tenant}'") from None


# Asked on every command a spoke takes; built once.
_WORKSPACE = (select(models.Workspace.max_agents)
              .join(models.Tenant, models.Tenant.id == models.Workspace.tenant_id)
              .where(models.Tenant.slug == bindparam("b_tenant"),
                     models.Workspace.slug == bindparam("b_slug")))


@dataclass(frozen=True)
class FoundWorkspace:
    max_agents: int | None  # its quota of live agents (None: no quota)


async def find_workspace(session: AsyncSession, tenant: str, slug: str
                         ) -> FoundWorkspace | None:
    row = (await session.execute(_WORKSPACE, {"b_tenant": tenant, "b_slug": slug})).first()
    return None if row is None else FoundWorkspace(max_agents=row[0])


async def workspace_exists(session: AsyncSession, tenant: str, slug: str) -> bool:
    return await find_workspace(session, tenant, slug) is not None


async def list_tenants(session: AsyncSession) -> list[tuple[str, list[str]]]:
    rows = (await session.execute(
        select(models.Tenant.slug, models.Workspace.slug)
        .join(models.Workspace, models.Workspace.tenant_id == models.Tenant.id, isouter=True)
        .order_by(models.Tenant.slug, models.Workspace.slug))).all()
    out: dict[str, list[str]] = {}
    for tenant, ws in rows:
        out.setdefault(tenant, [])
        if ws:
            out[tenant].append(ws)
    return list(out.items())
