"""`fleetwire token ...`: on the hub's machine with --home, or by a tenant admin through
the hub with --hub and --token."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncSession

from hub.remote import hub_options, iso_ms, with_hub
from hub.tokens import (
    DEFAULT_GRACE_HOURS,
    MAX_GRACE_HOURS,
    MIN_GRACE_HOURS,
    Issued,
    TokenInfo,
    create_token,
    describe_retired,
    list_tokens,
    revoke_token,
    rotate_token,
)
from shared.audit import append_audit
from shared.cli import audited, json_option, with_session
from shared.envelope import now_ms
from shared.errors import InvalidArgument
from shared.pb.v1 import operator_pb2
from shared.scope import Role


@click.group()
def token() -> None:
    """Operator tokens: on the hub's machine with --home, or by a tenant admin with
    --hub and --token."""


def home_or_hub(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--home", default=None, envvar="FLEETWIRE_HOME",
        type=click.Path(file_okay=False, path_type=Path),
        help="The hub's folder, on its machine (or FLEETWIRE_HOME). Without it, the "
             "command goes through --hub with an admin --token, in that token's tenant.")(f)
    return hub_options(f)


def _print_issued(as_json: bool, token_id: int, secret: str, retired: list[int],
                  **about: str) -> None:
    if as_json:
        click.echo(json.dumps({"token": secret, "id": token_id, **about, "retired": retired}))
        return
    click.echo(secret)
    gone = f"; retired token {', '.join(map(str, retired))}" if retired else ""
    click.echo(f"(token {token_id}: " + ", ".join(f"{k} {v}" for k, v in about.items())
               + f"; shown only now{gone})", err=True)


def _remote_issued(as_json: bool, issued: operator_pb2.IssuedToken) -> None:
    about = {"tenant": issued.tenant, "principal": issued.principal,
             "role": Role.from_wire(issued.role).label}
    if issued.replaces:
        about["replaces"] = str(issued.replaces)
    _print_issued(as_json, issued.id, issued.token, list(issued.retired), **about)


@token.command("create")
@home_or_hub
@click.option("--tenant", default=None, help="The token's tenant (with --home).")
@click.option("--principal", default="operator", show_default=True,
              help="Who the token stands for; recorded on the agents it spawns.")
@click.option("--role", default="operator", show_default=True,
              type=click.Choice(["viewer", "operator", "admin"]))
@json_option
def token_create(home: Path | None, hub_addr: str, tok: str, tenant: str | None,
                 principal: str, role: str, as_json: bool) -> None:
    """Create an operator token. It is shown once and stored hashed; a principal's
    oldest working token is retired beyond 3."""
    r = Role.parse(role)
    if home is None:
        if tenant:
            raise InvalidArgument("through the hub, a token is made in the admin token's own "
                                  "tenant; drop --tenant")
        _remote_issued(as_json, with_hub(hub_addr, tok, lambda c: c.create_token(principal, r)))
        return
    if not tenant:
        raise InvalidArgument("with --home, name the token's tenant with --tenant")

    async def create(session: AsyncSession, _: object) -> Issued:
        issued = await create_token(session, tenant=tenant, principal=principal, role=r,
                                    now_ms=now_ms())
        await append_audit(session, audited(
            "token.create", tenant=tenant, target=f"token {issued.id}",
            reason=f"principal {principal}, role {r.label}" + describe_retired(issued)))
        return issued

    issued = with_session(home, create, audited("token.create", tenant=tenant),
                          audit_success=False)
    _print_issued(as_json, issued.id, issued.token, list(issued.retired), tenant=tenant,
                  principal=principal, role=r.label)


@token.command("list")
@home_or_hub
@click.option("--tenant", default=None, help="Only this tenant's tokens (with --home).")
@json_option
def token_list(home: Path | None, hub_addr: str, tok: str, tenant: str | None,
               as_json: bool) -> None:
    """List tokens (never their secrets): id, tenant, principal, role, state."""
    if home is None:
        resp = with_hub(hub_addr, tok, lambda c: c.list_tokens())
        rows = [TokenInfo(id=t.id, tenant=t.tenant, principal=t.principal,
                          role=Role.from_wire(t.role).label, created_at_ms=t.created_at_ms,
                          state=t.state, expires_at_ms=t.expires_at_ms or None,
                          replaced_by_id=t.replaced_by_id or None) for t in resp.tokens]
    else:
        rows = with_session(home, lambda s, _: list_tokens(s, tenant=tenant, now_ms=now_ms()))
    if as_json:
        click.echo(json.dumps([vars(r) for r in rows], indent=2))
        return
    for r in rows:
        until = f" until {iso_ms(r.expires_at_ms or 0)}" if r.state == "expiring" else ""
        after = f" -> {r.replaced_by_id}" if r.replaced_by_id else ""
        click.echo(f"{r.id:>5} {r.tenant:<16} {r.principal:<16} {r.role:<9} "
                   f"{r.state}{until}{after}")
    if not rows:
        click.echo("no tokens")


@token.command("rotate")
@home_or_hub
@click.argument("token_id", type=int)
@click.option("--grace", "grace_hours", type=int, default=DEFAULT_GRACE_HOURS,
              show_default=True, help=f"Hours the old token keeps working "
              f"({MIN_GRACE_HOURS}-{MAX_GRACE_HOURS}).")
@json_option
def token_rotate(home: Path | None, hub_addr: str, tok: str, token_id: int, grace_hours: int,
                 as_json: bool) -> None:
    """Replace a token: the new one is shown once, the old one works until the grace
    ends."""
    if home is None:
        _remote_issued(as_json, with_hub(hub_addr, tok,
                                          lambda c: c.rotate_token(token_id, grace_hours)))
        return

    async def rotate(session: AsyncSession, _: object) -> tuple[Issued, TokenInfo]:
        issued = await rotate_token(session, token_id=token_id, grace_hours=grace_hours,
                                    now_ms=now_ms())
        info = next(t for t in await list_tokens(session, tenant=None, now_ms=now_ms())
                    if t.id == issued.id)
        await append_audit(session, audited(
            "token.rotate", tenant=info.tenant, target=f"token {token_id}",
            reason=f"replaced by token {issued.id}, grace {grace_hours} h"
            + describe_retired(issued)))
        return issued, info

    issued, info = with_session(home, rotate, audited(
        "token.rotate", target=f"token {token_id}"), audit_success=False)
    _print_issued(as_json, issued.id, issued.token, list(issued.retired), tenant=info.tenant,
                  principal=info.principal, role=info.role, replaces=str(token_id))


@token.command("revoke")
@home_or_hub
@click.argument("token_id", type=int)
def token_revoke(home: Path | None, hub_addr: str, tok: str, token_id: int) -> None:
    """Stop a token at once."""
    if home is None:
        with_hub(hub_addr, tok, lambda c: c.revoke_token(token_id))
    else:
        with_session(home, lambda s, _: revoke_token(s, token_id=token_id, now_ms=now_ms()),
                     audited("token.revoke", target=f"token {token_id}"))
    click.echo(f"revoked token {token_id}")
