"""The `fleetwire` command line: the root group and the commands every instance has.

Hub commands are in hub/cli.py and spoke commands in spoke/cli.py; `main` joins them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Config, check_name, default_config_text, load_config
from shared.db.engine import make_engine, make_sessions, upgrade
from shared.errors import FleetwireError, InvalidArgument
from shared.identity import decode_public_key, generate_key_file, load_identity
from shared.peers import add_peer, list_peers
from shared.tenancy import create_tenant, create_workspace, list_tenants

T = TypeVar("T")


class FleetwireGroup(click.Group):
    """Turns domain errors into a message on stderr and DESIGN.md's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetwireError as err:
            click.echo(f"error: {err.message}", err=True)
            sys.exit(err.exit_code)


def home_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--home", required=True, envvar="FLEETWIRE_HOME",
        type=click.Path(file_okay=False, path_type=Path),
        help="The instance's folder (or FLEETWIRE_HOME).")(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def emit(obj: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2) if as_json else text)


def with_session(home: Path, fn: Callable[[AsyncSession, Config], Awaitable[T]]) -> T:
    """Run fn in one committed transaction on the instance's database."""
    cfg = load_config(home)

    async def go() -> T:
        engine = make_engine(cfg.db_url)
        try:
            async with make_sessions(engine)() as session, session.begin():
                return await fn(session, cfg)
        finally:
            await engine.dispose()

    return asyncio.run(go())


@click.group(cls=FleetwireGroup)
def root() -> None:
    """Fleetwire: a hub and spokes that spawn, query and kill agents with signed commands."""


@root.command()
@home_option
@click.option("--name", required=True, help="This instance's name, as its peers will know it.")
def init(home: Path, name: str) -> None:
    """Create an instance: identity key (0600), config.toml, migrated state.db."""
    check_name("instance name", name)
    if (home / "identity.key").exists() or (home / "config.toml").exists():
        raise InvalidArgument(f"{home} already holds an instance; pick another --home")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    generate_key_file(home / "identity.key")
    (home / "config.toml").write_text(default_config_text(name))
    cfg = load_config(home)
    upgrade(cfg.db_url)
    ident = load_identity(name, cfg.key_path)
    click.echo(f"initialized '{name}' in {home} (key_id {ident.key_id})")


@root.group()
def identity() -> None:
    """This instance's signing identity."""


@identity.command("show")
@home_option
@json_option
def identity_show(home: Path, as_json: bool) -> None:
    """Print name, key_id and public key (base64 of the raw 32 bytes)."""
    cfg = load_config(home)
    ident = load_identity(cfg.name, cfg.key_path)
    obj = {"name": ident.name, "key_id": ident.key_id, "public_key": ident.public_key_b64}
    emit(obj, as_json, f"name        {ident.name}\nkey_id      {ident.key_id}\n"
                       f"public_key  {ident.public_key_b64}")


@root.group()
def peer() -> None:
    """Other instances this one trusts."""


@peer.command("add")
@home_option
@click.option("--name", required=True)
@click.option("--public-key", required=True, help="Base64, from the peer's `identity show`.")
@click.option("--address", default="", help="HOST:PORT, for peers this one sends to.")
def peer_add(home: Path, name: str, public_key: str, address: str) -> None:
    """Trust a peer's signing key."""
    raw = decode_public_key(public_key)
    info = with_session(home, lambda s, _: add_peer(s, name=name, public_key=raw,
                                                     address=address))
    click.echo(f"added peer '{info.name}' (key_id {info.key_ids[0]})"
               + (f" at {info.address}" if info.address else ""))


@peer.command("list")
@home_option
@json_option
def peer_list(home: Path, as_json: bool) -> None:
    """List peers."""
    peers = with_session(home, lambda s, _: list_peers(s))
    obj = [{"name": p.name, "address": p.address, "state": p.state, "key_ids": list(p.key_ids)}
           for p in peers]
    emit(obj, as_json, "\n".join(f"{p.name:<20} {p.state:<8} {p.address or '-':<22} "
                                 f"{','.join(p.key_ids)}" for p in peers) or "no peers")


@root.group()
def tenant() -> None:
    """Tenants this instance keeps."""


@tenant.command("create")
@home_option
@click.argument("slug")
def tenant_create(home: Path, slug: str) -> None:
    """Create a tenant."""
    with_session(home, lambda s, _: create_tenant(s, slug))
    click.echo(f"created tenant '{slug}'")


@tenant.command("list")
@home_option
@json_option
def tenant_list(home: Path, as_json: bool) -> None:
    """List tenants and their workspaces."""
    rows = with_session(home, lambda s, _: list_tenants(s))
    emit([{"tenant": t, "workspaces": ws} for t, ws in rows], as_json,
         "\n".join(f"{t}: {', '.join(ws) or '-'}" for t, ws in rows) or "no tenants")


@root.group()
def workspace() -> None:
    """Workspaces inside tenants."""


@workspace.command("create")
@home_option
@click.option("--tenant", "tenant_slug", required=True)
@click.argument("slug")
def workspace_create(home: Path, tenant_slug: str, slug: str) -> None:
    """Create a workspace in a tenant."""
    with_session(home, lambda s, _: create_workspace(s, tenant_slug, slug))
    click.echo(f"created workspace '{slug}' in tenant '{tenant_slug}'")


def run_daemon(home: Path, runner: Callable[[Config], Coroutine[Any, Any, None]]) -> None:
    """Start a daemon: migrate its database, then serve until SIGTERM/SIGINT."""
    from shared.daemon import setup_logging

    setup_logging()
    cfg = load_config(home)
    upgrade(cfg.db_url)
    asyncio.run(runner(cfg))


def build_cli() -> click.Group:
    """The whole command line: the shared commands plus the hub's and the spoke's."""
    from hub.cli import register as register_hub
    from spoke.cli import register as register_spoke

    if "hub" not in root.commands:
        register_hub(root)
        register_spoke(root)
    return root


def main() -> None:
    build_cli()(prog_name="fleetwire")


if __name__ == "__main__":
    main()
