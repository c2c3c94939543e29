"""Operator tokens: random bearer secrets, stored only as SHA-256, bound to one tenant.

A principal holds at most MAX_ACTIVE working tokens; making another retires the oldest.
Rotation hands out a new token and lets the old one work for a grace period; a token
used after its grace is refused and deactivated.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import check_name
from shared.db import models
from shared.errors import InvalidArgument, NotFound, Unauthenticated
from shared.scope import Principal, Role
from shared.tenancy import require_tenant

TOKEN_PREFIX = "fwt_"
MAX_ACTIVE = 3
MIN_GRACE_HOURS, MAX_GRACE_HOURS, DEFAULT_GRACE_HOURS = 1, 720, 24
_HOUR_MS = 3600 * 1000


def token_digest(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def _active(now_ms: int):  # type: ignore[no-untyped-def]
    t = models.OperatorToken
    return and_(t.revoked_at_ms.is_(None),
                or_(t.expires_at_ms.is_(None), t.expires_at_ms > now_ms))


@dataclass(frozen=True)
class TokenInfo:
    id: int
    tenant: str
    principal: str
    role: str
    created_at_ms: int
    state: str  # active | expiring | expired | revoked
    expires_at_ms: int | None
    replaced_by_id: int | None


@dataclass(frozen=True)
class Issued:
    id: int
    token: str
    retired: tuple[int, ...]


def describe_retired(issued: Issued) -> str:
    """'; retired token 1, 2' for audit reasons and messages, or ''."""
    return f"; retired token {', '.join(map(str, issued.retired))}" if issued.retired else ""


async def _issue(session: AsyncSession, *, tenant_id: int, principal: str, role: Role,
                 now_ms: int, in_grace: int | None = None) -> Issued:
    # The tenant's row is locked until commit, so that concurrent issues for it (in any
    # process sharing the database) count working tokens one after another.
    await session.execute(select(models.Tenant.id).where(models.Tenant.id == tenant_id)
                          .with_for_update())
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = models.OperatorToken(token_sha256=token_digest(token), tenant_id=tenant_id,
                               principal=principal, role=role.value, created_at_ms=now_ms)
    session.add(row)
    await session.flush()
    retired = await _retire_beyond_limit(session, tenant_id, principal, now_ms, in_grace)
    return Issued(id=row.id, token=token, retired=retired)


async def _retire_beyond_limit(session: AsyncSession, tenant_id: int, principal: str,
                               now_ms: int, in_grace: int | None) -> tuple[int, ...]:
    """Retire the oldest working tokens beyond MAX_ACTIVE. A token being rotated out
    (in_grace) is retired last: its grace is what rotation promises."""
    t = models.OperatorToken
    active = list((await session.execute(
        select(t.id).where(t.tenant_id == tenant_id, t.principal == principal,
                           _active(now_ms))
        .order_by(t.created_at_ms, t.id))).scalars())
    active.sort(key=lambda token_id: token_id == in_grace)  # stable: keeps age order
    retired = tuple(active[: max(0, len(active) - MAX_ACTIVE)])
    if retired:
        await session.execute(update(t).where(t.id.in_(retired)).values(revoked_at_ms=now_ms))
    return retired


async def create_token(session: AsyncSession, *, tenant: str, principal: str, role: Role,
                       now_ms: int) -> Issued:
    """Make a token; the plain text is returned once and never stored."""
    check_name("principal", principal)
    t = await require_tenant(session, tenant)
    return await _issue(session, tenant_id=t.id, principal=principal, role=role, now_ms=now_ms)


def _in_tenant(tenant: str | None):  # type: ignore[no-untyped-def]
    """No filter for the hub's local admin (None); else only that tenant's tokens."""
    t = models.OperatorToken
    if tenant is None:
        return t.id.is_not(None)
    return t.tenant_id.in_(select(models.Tenant.id).where(models.Tenant.slug == tenant))


async def rotate_token(session: AsyncSession, *, token_id: int, grace_hours: int,
                       now_ms: int, tenant: str | None = None) -> Issued:
    """Replace a working token; the old one keeps working for grace_hours.

    The claim on the old token is a compare-and-set, made once the tenant's row is
    locked, so of two concurrent rotations exactly one wins and the chain never forks.
    """
    if not MIN_GRACE_HOURS <= grace_hours <= MAX_GRACE_HOURS:
        raise InvalidArgument(
            f"grace must be {MIN_GRACE_HOURS} to {MAX_GRACE_HOURS} hours, not {grace_hours}")
    t = models.OperatorToken
    # The tenant's row first, as an issue locks it first: token writes (and the security
    # epoch's trigger each of them fires) then take their locks in one order.
    tenant_id = (await session.execute(select(t.tenant_id).where(t.id == token_id))
                 ).scalar_one_or_none()
    if tenant_id is not None:
        await session.execute(select(models.Tenant.id).where(models.Tenant.id == tenant_id)
                              .with_for_update())
    claimed = await session.execute(
        update(t).where(t.id == token_id, t.replaced_by_id.is_(None), _active(now_ms),
                        _in_tenant(tenant))
        .values(replaced_by_id=0))
    if getattr(claimed, "rowcount", 0) != 1:
        raise NotFound(
            f"token {token_id} is not a working token that can be rotated (unknown, revoked, "
            "expired, or already rotated); see `fleetwire token list`")
    old = (await session.execute(select(t).where(t.id == token_id))).scalar_one()
    issued = await _issue(session, tenant_id=old.tenant_id, principal=old.principal,
                          role=Role(old.role), now_ms=now_ms, in_grace=token_id)
    grace_end = now_ms + grace_hours * _HOUR_MS
    await session.execute(update(t).where(t.id == token_id).values(
        replaced_by_id=issued.id,
        expires_at_ms=min(grace_end, old.expires_at_ms or grace_end)))
    return issued


async def revoke_token(session: AsyncSession, *, token_id: int, now_ms: int,
                       tenant: str | None = None) -> None:
    t = models.OperatorToken
    done = await session.execute(update(t).where(t.id == token_id, t.revoked_at_ms.is_(None),
                                                 _in_tenant(tenant))
                                 .values(revoked_at_ms=now_ms))
    if getattr(done, "rowcount", 0) != 1:
        raise NotFound(f"token {token_id} not found or already revoked; see "
                       "`fleetwire token list`")


async def list_tokens(session: AsyncSession, *, tenant: str | None, now_ms: int
                      ) -> list[TokenInfo]:
    t = models.OperatorToken
    query = (select(t, models.Tenant.slug)
             .join(models.Tenant, models.Tenant.id == t.tenant_id).order_by(t.id))
    if tenant is not None:
        query = query.where(models.Tenant.slug == tenant)
    out = []
    for row, slug in (await session.execute(query)).all():
        if row.revoked_at_ms is not None:
            state = "revoked"
        elif row.expires_at_ms is not None:
            state = "expiring" if row.expires_at_ms > now_ms else "expired"
        else:
            state = "active"
        out.append(TokenInfo(id=row.id, tenant=slug, principal=row.principal,
                             role=Role(row.role).label, created_at_ms=row.created_at_ms,
                             state=state, expires_at_ms=row.expires_at_ms,
                             replaced_by_id=row.replaced_by_id or None))
    return out


@dataclass(frozen=True)
class Authenticated:
    tenant: str
    principal: Principal
    token_id: int


@dataclass(frozen=True)
class TokenRecord:
    """What the hub holds of a token; whether it works is decided per request."""

    id: int
    tenant: str
    principal: str
    role: int
    revoked_at_ms: int | None
    expires_at_ms: int | None
    replaced_by_id: int | None


def check_token_text(token: str) -> str:
    """The digest of a well-formed token; Unauthenticated for anything else."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        raise Unauthenticated(
            "operator token is malformed; pass the token from `fleetwire token create` "
            "with --token or FLEETWIRE_TOKEN")
    return token_digest(token)


# Asked on every operator request; built once.
_BY_DIGEST = (select(models.OperatorToken, models.Tenant.slug)
              .join(models.Tenant, models.Tenant.id == models.OperatorToken.tenant_id)
              .where(models.OperatorToken.token_sha256 == bindparam("b_digest")))


async def read_token(session: AsyncSession, digest: str) -> TokenRecord | None:
    row = (await session.execute(_BY_DIGEST, {"b_digest": digest})).first()
    if row is None:
        return None
    tok, tenant = row
    return TokenRecord(id=tok.id, tenant=tenant, principal=tok.principal, role=tok.role,
                       revoked_at_ms=tok.revoked_at_ms, expires_at_ms=tok.expires_at_ms,
                       replaced_by_id=tok.replaced_by_id)


def check_token(tok: TokenRecord | None, *, now_ms: int) -> Authenticated:
    """The tenant and principal a token record stands for at now_ms, or Unauthenticated
    (TokenExpired for one past its grace: the caller deactivates it)."""
    if tok is None or tok.revoked_at_ms is not None:
        raise Unauthenticated("operator token is not valid; ask an admin for a new one")
    if tok.expires_at_ms is not None and tok.expires_at_ms <= now_ms:
        raise TokenExpired(
            f"operator token {tok.id} was rotated and its grace ended; use its replacement "
            f"(token {tok.replaced_by_id})", token_id=tok.id)
    return Authenticated(tok.tenant, Principal(name=tok.principal, role=Role(tok.role)),
                         tok.id)


async def authenticate(session: AsyncSession, token: str, *, now_ms: int) -> Authenticated:
    """The tenant and principal a bearer token stands for, or Unauthenticated
    (TokenExpired for one past its grace: the caller deactivates it)."""
    return check_token(await read_token(session, check_token_text(token)), now_ms=now_ms)


async def deactivate_token(session: AsyncSession, token_id: int, now_ms: int) -> None:
    t = models.OperatorToken
    await session.execute(update(t).where(t.id == token_id, t.revoked_at_ms.is_(None))
                          .values(revoked_at_ms=now_ms))


class TokenExpired(Unauthenticated):
    """Refused because its grace ended."""

    def __init__(self, message: str, *, token_id: int) -> None:
        super().__init__(message)
        self.token_id = token_id
