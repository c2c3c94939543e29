"""Spoke commands of the `fleetwire` command line: grants and `spoke run`."""

from __future__ import annotations

from pathlib import Path

import click

from shared.cli import audited, emit, home_option, json_option, run_daemon, with_session
from shared.scope import Role
from spoke.daemon import run_spoke
from spoke.grants import add_grant, list_grants, revoke_grant


@click.group()
def grant() -> None:
    """Which hubs may act in which tenants of this spoke."""


@grant.command("add")
@home_option
@click.option("--peer", required=True, help="The hub's peer name.")
@click.option("--tenant", required=True)
@click.option("--workspace", default=None, help="Narrow the grant to one workspace.")
@click.option("--max-role", default="operator", show_default=True,
              type=click.Choice(["viewer", "operator", "admin"]),
              help="The highest role the hub may assert here.")
def grant_add(home: Path, peer: str, tenant: str, workspace: str | None, max_role: str) -> None:
    """Let a hub act in a tenant (or one workspace) of this spoke."""
    role = Role.parse(max_role)
    with_session(home, lambda s, _: add_grant(s, peer=peer, tenant=tenant,
                                              workspace=workspace, max_role=role),
                 audited("grant.add", tenant=tenant, workspace=workspace or "", peer=peer,
                         reason=f"max_role={role.label}"))
    where = f"tenant '{tenant}'" + (f" workspace '{workspace}'" if workspace else "")
    click.echo(f"granted '{peer}' {where} up to {role.label}")


@grant.command("revoke")
@home_option
@click.option("--peer", required=True, help="The hub's peer name.")
@click.option("--tenant", required=True)
@click.option("--workspace", default=None, help="The workspace of a narrowed grant.")
def grant_revoke(home: Path, peer: str, tenant: str, workspace: str | None) -> None:
    """Withdraw a grant; it takes effect on the hub's next command."""
    with_session(home, lambda s, _: revoke_grant(s, peer=peer, tenant=tenant,
                                                 workspace=workspace),
                 audited("grant.revoke", tenant=tenant, workspace=workspace or "", peer=peer))
    where = f"tenant '{tenant}'" + (f" workspace '{workspace}'" if workspace else "")
    click.echo(f"revoked '{peer}' grant for {where}")


@grant.command("list")
@home_option
@json_option
def grant_list(home: Path, as_json: bool) -> None:
    """List grants."""
    rows = with_session(home, lambda s, _: list_grants(s))
    emit([{"peer": p, "tenant": t, "workspace": w, "max_role": r} for p, t, w, r in rows],
         as_json, "\n".join(f"{p:<20} {t}/{w:<20} {r}" for p, t, w, r in rows) or "no grants")


@click.group()
def spoke() -> None:
    """The spoke daemon."""


@spoke.command("run")
@home_option
@click.option("--listen", default=None, help="HOST:PORT (port 0: any free port); "
              "default from config.toml [spoke] listen.")
def spoke_run(home: Path, listen: str | None) -> None:
    """Run the spoke daemon until SIGTERM or SIGINT (agents keep running)."""
    run_daemon(home, lambda cfg: run_spoke(cfg, listen or cfg.spoke.listen))


def register(root: click.Group) -> None:
    root.add_command(grant)
    root.add_command(spoke)
