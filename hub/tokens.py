"""Operator tokens: random bearer secrets, stored only as SHA-256, bound to one tenant."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import check_name
from shared.db import models
from shared.envelope import now_ms
from shared.errors import Unauthenticated
from shared.scope import Principal, Role
from shared.tenancy import require_tenant

TOKEN_PREFIX = "fwt_"


def token_digest(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(session: AsyncSession, *, tenant: str, principal: str, role: Role) -> str:
    """Make a token; the plain text is returned once and never stored."""
    check_name("principal", principal)
    t = await require_tenant(session, tenant)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(models.OperatorToken(
        token_sha256=token_digest(token), tenant_id=t.id, principal=principal,
        role=role.value, created_at_ms=now_ms()))
    await session.flush()
    return token


async def authenticate(session: AsyncSession, token: str) -> tuple[str, Principal]:
    """The tenant and principal a bearer token stands for, or Unauthenticated."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        raise Unauthenticated(
            "operator token is malformed; pass the token from `fleetwire token create` "
            "with --token or FLEETWIRE_TOKEN")
    row = (await session.execute(
        select(models.OperatorToken, models.Tenant.slug)
        .join(models.Tenant, models.Tenant.id == models.OperatorToken.tenant_id)
        .where(models.OperatorToken.token_sha256 == token_digest(token)))).first()
    if row is None or row[0].revoked_at_ms is not None:
        raise Unauthenticated("operator token is not valid; ask an admin for a new one")
    tok, tenant = row
    return tenant, Principal(name=tok.principal, role=Role(tok.role))
