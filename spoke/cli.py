"""Spoke commands of the `fleetwire` command line: grants and `spoke run`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click
from sqlalchemy.ext.asyncio import AsyncSession

from shared.cli import (
    IdentityFact,
    audited,
    daemon_options,
    emit,
    home_option,
    json_option,
    local_principal,
    run_daemon,
    with_session,
)
from shared.config import Config, load_config
from shared.errors import FleetwireError, Unavailable
from shared.scope import Role
from spoke.daemon import RUN_DIR, run_spoke
from spoke.drain import lift_drain, request_drain
from spoke.grants import add_grant, list_grants, revoke_grant
from spoke.isolation import recorded_or_probed
from spoke.join import join_hub
from spoke.store import count_live


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
@click.option("--advertise", default="", help="HOST:PORT hubs should use to reach this "
              "spoke (sent with each heartbeat); default: the bound --listen address.")
@click.option("--insecure", is_flag=True, help="Plaintext between instances: only on "
              "loopback addresses, for trying things out.")
@daemon_options
def spoke_run(home: Path, listen: str | None, advertise: str, insecure: bool,
              metrics_listen: str, log_format: str) -> None:
    """Run the spoke daemon until SIGTERM or SIGINT (agents keep running)."""
    run_daemon(home, lambda cfg: run_spoke(cfg, listen or cfg.spoke.listen,
                                           insecure=insecure, advertise=advertise,
                                           metrics_listen=metrics_listen), log_format)


@spoke.command("drain")
@home_option
@click.option("--reason", default="", help="Why; kept in every agent's history.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for the running daemon to finish killing.")
def spoke_drain(home: Path, reason: str, timeout: float) -> None:
    """Emergency stop: the spoke takes no more spawns and kills every agent it runs."""
    cfg = load_config(home)
    with_session(home, _nothing, audited("spoke.drain", reason=reason))
    request_drain(cfg, reason=reason, by=local_principal())
    deadline = time.monotonic() + timeout
    while (left := with_session(home, _live_count)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        raise Unavailable(f"{left} agent(s) still live after {timeout:g} s; is `fleetwire "
                          "spoke run` running for this home? The drain stays requested.")
    click.echo(f"spoke '{cfg.name}' drained: no agent is running; it takes no spawns until "
               "`fleetwire spoke resume`")


@spoke.command("resume")
@home_option
def spoke_resume(home: Path) -> None:
    """Take spawns again after a drain."""
    cfg = load_config(home)
    with_session(home, _nothing, audited("spoke.resume"))
    lifted = lift_drain(cfg)
    click.echo(f"spoke '{cfg.name}' " + ("takes spawns again" if lifted else
                                         "was not draining"))


async def _nothing(_: AsyncSession, __: object) -> None:
    """A transaction that only carries an audit record."""


async def _live_count(session: AsyncSession, _: object) -> int:
    return await count_live(session)


@click.command("join")
@home_option
@click.option("--hub", "hub_addr", required=True, envvar="FLEETWIRE_HUB",
              help="The hub's operator address HOST:PORT.")
@click.option("--token", "join_token_text", required=True,
              help="From `fleetwire join-token create` on the hub.")
@click.option("--address", default="", help="HOST:PORT the hub should use for this spoke "
              "(else the spoke's heartbeats tell it).")
def join(home: Path, hub_addr: str, join_token_text: str, address: str) -> None:
    """Join this spoke to a hub: both sides record each other's signing key and TLS
    certificate; nothing is pasted by hand. Grants stay this spoke's decision: add them
    with `fleetwire grant add`."""
    cfg = load_config(home)
    joined = asyncio.run(join_hub(cfg, hub_addr, join_token_text, address))
    click.echo(f"joined hub '{joined.hub.name}' at {joined.hub.address} (key_id "
               f"{joined.hub.key_ids[0]}, TLS {joined.hub.tls_fingerprint}); this spoke is "
               f"{joined.state} there"
               + ("; the hub's operator must run `fleetwire peer resume "
                  f"{cfg.name}`" if joined.state == "PENDING" else ""))


def isolation_fact(cfg: Config) -> dict[str, str]:
    """For `identity show`: the isolation the spoke gives agents (as it chose at its last
    start, or would choose now)."""
    try:
        chosen = recorded_or_probed(cfg, cfg.home / RUN_DIR)
    except FleetwireError as err:
        return {"isolation": f"unavailable: {err.message}"}
    return {"isolation": chosen.describe() if not chosen.refusal
            else f"unavailable: {chosen.refusal}"}


def register(root: click.Group, identity_facts: list[IdentityFact]) -> None:
    identity_facts.append(isolation_fact)
    root.add_command(join)
    root.add_command(grant)
    root.add_command(spoke)
