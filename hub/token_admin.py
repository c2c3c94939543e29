"""Token management through the operator API: a tenant's admins, in their tenant only.

The same operations as `fleetwire token ... --home` on the hub's machine, scoped by the
caller's token: another tenant's tokens answer NOT_FOUND like tokens that do not exist.
"""

from __future__ import annotations

from hub.tokens import (
    DEFAULT_GRACE_HOURS,
    Issued,
    TokenInfo,
    create_token,
    describe_retired,
    list_tokens,
    revoke_token,
    rotate_token,
)
from shared.audit import ALLOWED, AuditEntry, AuditTrail, append_audit
from shared.envelope import now_ms
from shared.scope import Action, Role, current_scope, require_role


class TenantTokens:
    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def _admin(self) -> str:
        scope = current_scope()
        require_role(scope.principal, Action.MANAGE)
        return scope.tenant

    def _entry(self, action: str, target: str, reason: str) -> AuditEntry:
        scope = current_scope()
        return AuditEntry(action=action, outcome=ALLOWED, tenant=scope.tenant,
                          principal=scope.principal.name, target=target, reason=reason)

    async def create(self, principal: str, role: Role) -> Issued:
        tenant = self._admin()
        async with self._trail.transaction() as session:
            issued = await create_token(session, tenant=tenant, principal=principal,
                                        role=role, now_ms=now_ms())
            await append_audit(session, self._entry(
                "token.create", f"token {issued.id}",
                f"principal {principal}, role {role.label}" + describe_retired(issued)))
        return issued

    async def list(self) -> list[TokenInfo]:
        tenant = self._admin()
        async with self._trail.reader() as session:
            return await list_tokens(session, tenant=tenant, now_ms=now_ms())

    async def rotate(self, token_id: int, grace_hours: int) -> tuple[Issued, TokenInfo]:
        tenant = self._admin()
        grace = grace_hours or DEFAULT_GRACE_HOURS
        async with self._trail.transaction() as session:
            issued = await rotate_token(session, token_id=token_id, grace_hours=grace,
                                        now_ms=now_ms(), tenant=tenant)
            info = next(t for t in await list_tokens(session, tenant=tenant, now_ms=now_ms())
                        if t.id == issued.id)
            await append_audit(session, self._entry(
                "token.rotate", f"token {token_id}",
                f"replaced by token {issued.id}, grace {grace} h" + describe_retired(issued)))
        return issued, info

    async def revoke(self, token_id: int) -> None:
        tenant = self._admin()
        async with self._trail.transaction() as session:
            await revoke_token(session, token_id=token_id, now_ms=now_ms(), tenant=tenant)
            await append_audit(session, self._entry("token.revoke", f"token {token_id}", ""))
