"""The `fleetwire` command line: the root group and the commands every instance has.

Hub commands are in hub/cli.py and spoke commands in spoke/cli.py; `main` joins them.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.audit import ALLOWED, REFUSED, AuditEntry, append_audit, load_records, verify_chain
from shared.config import (
    Config,
    check_name,
    config_report,
    config_report_text,
    default_config_text,
    load_config,
)
from shared.db.engine import (
    AUDIT_CHAIN_LOCK,
    current_revision,
    lock_for_transaction,
    make_engine,
    make_sessions,
    upgrade,
)
from shared.durations import describe, parse_duration
from shared.errors import FleetwireError, InvalidArgument, Unavailable
from shared.identity import decode_public_key, generate_key_file, load_identity
from shared.log_format import FORMATS, setup_logging
from shared.peers import add_peer, change_peer_state, list_peers
from shared.rotation import rotate_key
from shared.tenancy import create_tenant, create_workspace, list_tenants
from shared.tls import check_certificate, fingerprint, load_tls_identity, make_certificate

T = TypeVar("T")


class FleetwireGroup(click.Group):
    """Turns domain errors into a message on stderr and docs/design.md's exit code."""

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


_HUB_CA = "fleetwire.hub_ca"


def hub_ca_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--hub-ca (or FLEETWIRE_HUB_CA): how the CLI trusts the hub's TLS certificate."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str) -> str:
        ctx.meta[_HUB_CA] = value or ""
        return value

    return click.option(
        "--hub-ca", envvar="FLEETWIRE_HUB_CA", default="", expose_value=False,
        callback=remember,
        help="The hub's TLS certificate file (its tls.crt, or a CA's), or sha256:FINGERPRINT "
             "to pin it (or FLEETWIRE_HUB_CA). Needed for a hub off loopback.")(f)


def hub_ca() -> str:
    ctx = click.get_current_context(silent=True)
    return str(ctx.meta.get(_HUB_CA, "")) if ctx is not None else ""


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def emit(obj: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2) if as_json else text)


def local_principal() -> str:
    """Who runs a local admin command, for the audit trail."""
    return f"local:{getpass.getuser()}"


def with_session(home: Path, fn: Callable[[AsyncSession, Config], Awaitable[T]],
                 audit: AuditEntry | None = None, *, audit_success: bool = True) -> T:
    """Run fn in one committed transaction on the instance's database. With audit, the
    change is recorded in the same transaction (unless fn records it itself:
    audit_success=False), and a refusal in a transaction of its own."""
    cfg = load_config(home)

    async def go() -> T:
        engine = make_engine(cfg.db_url)
        sessions = make_sessions(engine)
        try:
            try:
                async with sessions() as session, session.begin():
                    if audit is not None:  # the chain's lock first, as AuditTrail does
                        await lock_for_transaction(session, AUDIT_CHAIN_LOCK)
                    result = await fn(session, cfg)
                    if audit is not None and audit_success:
                        await append_audit(session, audit)
                    return result
            except (IntegrityError, OperationalError) as exc:
                # What fn did not turn into a refusal itself: another process changed the
                # database (or took the audit chain's tail) at the same moment.
                raise Unavailable(
                    f"{home} was busy with another change ({type(exc).__name__}); run the "
                    "command again") from None
            except FleetwireError as err:
                if audit is not None:
                    async with sessions() as session, session.begin():
                        await append_audit(session, replace(audit, outcome=REFUSED,
                                                            reason=err.message))
                raise
        finally:
            await engine.dispose()

    return asyncio.run(go())


def audited(action: str, **fields: str) -> AuditEntry:
    """The audit entry of a local admin command."""
    return AuditEntry(action=action, outcome=ALLOWED, principal=local_principal(), **fields)


@click.group(cls=FleetwireGroup)
def root() -> None:
    """Fleetwire: a hub and spokes that spawn, query and kill agents with signed commands."""
    # What an instance writes (its database and journal, config, logs, folders) is its
    # own alone: keys and state are never readable to other users, agents included.
    os.umask(0o077)


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
    (home / "config.toml").write_text(default_config_text(name))
    try:
        cfg = load_config(home)
    except InvalidArgument:
        # A bad FLEETWIRE_ variable: leave nothing behind, so init can be run again.
        (home / "config.toml").unlink()
        raise
    generate_key_file(home / "identity.key")
    make_certificate(name, cfg.tls_key_path, cfg.tls_cert_path)
    upgrade(cfg.db_url)
    ident = load_identity(name, cfg.key_path)
    with_session(home, lambda s, _: append_audit(s, audited(
        "instance.init", target=name, reason=f"key_id {ident.key_id}")))
    click.echo(f"initialized '{name}' in {home} (key_id {ident.key_id}, TLS "
               f"{fingerprint(cfg.tls_cert_path.read_bytes())})")


@root.command()
@home_option
def migrate(home: Path) -> None:
    """Bring the instance's database (SQLite or PostgreSQL, from config.toml [database]
    or FLEETWIRE_DATABASE_URL) to the newest schema. Daemons do it when they start;
    run it after pointing an instance at a new database, before other commands."""
    cfg = load_config(home)
    try:
        upgrade(cfg.db_url)
    except (OSError, SQLAlchemyError) as exc:
        raise Unavailable(f"cannot migrate the database of {home}: {exc}; check "
                          "[database] url and that the server is up") from None
    click.echo(f"database of '{cfg.name}' at schema {current_revision(cfg.db_url)}")


# What each side adds to `identity show` (the spoke: the isolation it gives agents).
IdentityFact = Callable[[Config], dict[str, str]]
IDENTITY_FACTS: list[IdentityFact] = []


@root.group()
def identity() -> None:
    """This instance's signing identity."""


@identity.command("show")
@home_option
@json_option
def identity_show(home: Path, as_json: bool) -> None:
    """Print name, key_id, public key (base64 of the raw 32 bytes) and the TLS
    certificate (file and fingerprint) peers pin."""
    cfg = load_config(home)
    ident = load_identity(cfg.name, cfg.key_path)
    tls = load_tls_identity(cfg.tls_key_path, cfg.tls_cert_path)
    obj = {"name": ident.name, "key_id": ident.key_id, "public_key": ident.public_key_b64,
           "tls_cert": str(cfg.tls_cert_path), "tls_fingerprint": tls.fingerprint}
    for fact in IDENTITY_FACTS:
        obj.update(fact(cfg))
    emit(obj, as_json, "\n".join(f"{key:<16} {value}" for key, value in obj.items()))


@identity.command("rotate")
@home_option
@click.option("--grace", default="24h", show_default=True,
              help="How long peers still accept the current key: 90s, 15m, 24h, 7d (at "
                   "most 30d).")
@json_option
def identity_rotate(home: Path, grace: str, as_json: bool) -> None:
    """Make a new signing key current. The running daemon signs with it from its next
    message and announces it to every peer, signed by the current key (retried until
    each peer has it); peers accept either key until the grace ends, then only the new
    one. At most 3 keys are in use at once."""
    seconds = parse_duration(grace, "--grace")
    rotated = with_session(home, lambda s, cfg: rotate_key(s, cfg, seconds),
                           audited("identity.rotate", reason=f"grace {describe(seconds)}"))
    until = datetime.fromtimestamp(rotated.grace_until_ms / 1000, UTC).isoformat(
        timespec="seconds")
    emit({"old_key_id": rotated.old_key_id, "new_key_id": rotated.new_key_id,
          "grace_until": until}, as_json,
         f"new key_id {rotated.new_key_id}; peers accept {rotated.old_key_id} until {until}")


@root.group()
def peer() -> None:
    """Other instances this one trusts."""


@peer.command("add")
@home_option
@click.option("--name", required=True)
@click.option("--public-key", required=True, help="Base64, from the peer's `identity show`.")
@click.option("--tls-cert", "tls_cert", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The peer's TLS certificate (its tls.crt): pinned, the only "
                                 "one accepted for it. Needed unless both run --insecure.")
@click.option("--address", default="", help="HOST:PORT, for peers this one sends to.")
def peer_add(home: Path, name: str, public_key: str, tls_cert: Path | None,
             address: str) -> None:
    """Trust a peer by hand (where `fleetwire join` cannot be used)."""
    raw = decode_public_key(public_key)
    cert = check_certificate(_read(tls_cert, "--tls-cert"), str(tls_cert)) if tls_cert else None
    info = with_session(home, lambda s, _: add_peer(s, name=name, public_key=raw,
                                                     address=address, tls_cert=cert),
                        audited("peer.add", peer=name, target=address))
    click.echo(f"added peer '{info.name}' (key_id {info.key_ids[0]})"
               + (f" at {info.address}" if info.address else "")
               + (f", TLS {info.tls_fingerprint}" if info.tls_fingerprint else ""))


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{option} {path}: {exc.strerror}") from None


@peer.command("list")
@home_option
@json_option
def peer_list(home: Path, as_json: bool) -> None:
    """List peers: state, address, signing keys in use, pinned TLS certificate."""
    peers = with_session(home, lambda s, _: list_peers(s))
    obj = [{"name": p.name, "address": p.address, "state": p.state, "key_ids": list(p.key_ids),
            "tls_fingerprint": p.tls_fingerprint} for p in peers]
    emit(obj, as_json, "\n".join(f"{p.name:<20} {p.state:<9} {p.address or '-':<22} "
                                 f"{','.join(p.key_ids) or '-':<34} "
                                 f"{p.tls_fingerprint[:23] or 'no TLS'}" for p in peers)
         or "no peers")


_PEER_MOVES = {
    "suspend": ("suspended", "Stop accepting a peer's messages until `peer resume` (from its "
                             "next message on)."),
    "resume": ("resumed", "Accept a suspended or pending peer's messages again."),
    "revoke": ("revoked", "Stop trusting a peer for good: its keys and certificate are "
                          "refused from its next message on."),
}


def _peer_move(move: str) -> None:
    past, doc = _PEER_MOVES[move]

    @peer.command(move, help=doc)
    @home_option
    @click.argument("name")
    def command(home: Path, name: str) -> None:
        info = with_session(home, lambda s, _: change_peer_state(s, name, move),
                            audited(f"peer.{move}", peer=name, target=name))
        click.echo(f"{past} peer '{info.name}': now {info.state}")


for _move in _PEER_MOVES:
    _peer_move(_move)


@root.group()
def tenant() -> None:
    """Tenants this instance keeps."""


@tenant.command("create")
@home_option
@click.argument("slug")
def tenant_create(home: Path, slug: str) -> None:
    """Create a tenant."""
    with_session(home, lambda s, _: create_tenant(s, slug),
                 audited("tenant.create", tenant=slug, target=slug))
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
@click.option("--home", default=None, envvar="FLEETWIRE_HOME",
              type=click.Path(file_okay=False, path_type=Path),
              help="The instance's folder. Without it: on --spoke, through --hub with a "
                   "tenant admin's --token.")
@click.option("--tenant", "tenant_slug", default=None, help="The tenant (with --home).")
@click.option("--spoke", default=None, help="The spoke to make it on (through the hub).")
@click.option("--hub", "hub_addr", envvar="FLEETWIRE_HUB", default="",
              help="The hub's operator address (or FLEETWIRE_HUB).")
@click.option("--token", "tok", envvar="FLEETWIRE_TOKEN", default="",
              help="A tenant admin's token (or FLEETWIRE_TOKEN).")
@hub_ca_option
@click.option("--max-agents", type=click.IntRange(min=1), default=None,
              help="Most agents that may run at once in it (on a spoke).")
@click.argument("slug")
def workspace_create(home: Path | None, tenant_slug: str | None, spoke: str | None,
                     hub_addr: str, tok: str, slug: str, max_agents: int | None) -> None:
    """Create a workspace in a tenant: locally with --home, or on a spoke through the
    hub as an admin of the token's tenant."""
    if home is None:
        if not spoke or tenant_slug:
            raise InvalidArgument("without --home, name the --spoke (the tenant is the admin "
                                  "token's; drop --tenant)")
        # The remote form is the hub's client; imported here so local use needs no hub.
        from hub.client import HubClient

        async def remote() -> None:
            async with HubClient(hub_addr, tok, hub_ca()) as client:
                made = await client.create_workspace(spoke=spoke, workspace=slug,
                                                     max_agents=max_agents or 0)
            click.echo(f"created workspace '{made.workspace}' in tenant '{made.tenant}' on "
                       f"spoke '{made.spoke}'"
                       + (f" (at most {max_agents} agents at once)" if max_agents else ""))

        asyncio.run(remote())
        return
    if not tenant_slug:
        raise InvalidArgument("with --home, name the tenant with --tenant")
    with_session(home, lambda s, _: create_workspace(s, tenant_slug, slug, max_agents),
                 audited("workspace.create", tenant=tenant_slug, workspace=slug, target=slug,
                         reason=f"max_agents={max_agents}" if max_agents else ""))
    click.echo(f"created workspace '{slug}' in tenant '{tenant_slug}'"
               + (f" (at most {max_agents} agents at once)" if max_agents else ""))


@root.group()
def audit() -> None:
    """The instance's hash-chained audit trail."""


def _audit_row(rec: Any) -> dict[str, Any]:
    return {"seq": rec.seq, "at_ms": rec.at_ms, "action": rec.action, "outcome": rec.outcome,
            "tenant": rec.tenant, "workspace": rec.workspace, "principal": rec.principal,
            "peer": rec.peer, "target": rec.target, "message_id": rec.message_id,
            "reason": rec.reason, "hash": rec.hash}


@audit.command("list")
@home_option
@click.option("--tenant", default=None, help="Only records of this tenant.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N.")
@json_option
def audit_list(home: Path, tenant: str | None, limit: int | None, as_json: bool) -> None:
    """Print audit records, oldest first."""
    records = with_session(home, lambda s, _: load_records(s, tenant))
    rows = [_audit_row(r) for r in records[-limit if limit else None:]]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        at = datetime.fromtimestamp(r["at_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        where = f"{r['tenant']}/{r['workspace']}" if r["workspace"] else r["tenant"] or "-"
        click.echo(f"{r['seq']:>6} {at} {r['outcome']:<8} {r['action']:<18} {where:<20} "
                   f"{r['principal'] or '-':<14} {r['peer'] or '-':<12} {r['target'] or '-'} "
                   f"{r['reason']}")
    if not rows:
        click.echo("no audit records")


@audit.command("verify")
@home_option
def audit_verify(home: Path) -> None:
    """Check the whole chain; exit 1 naming the first bad record if any was edited,
    removed or reordered."""
    records = with_session(home, lambda s, _: load_records(s))
    broken = verify_chain(records)
    if broken is not None:
        click.echo(f"audit trail broken at record {broken.seq}: {broken.problem}", err=True)
        sys.exit(1)
    head = records[-1].hash if records else "-"
    click.echo(f"audit trail intact: {len(records)} records, head {head}")


@root.group("config")
def config_group() -> None:
    """The instance's configuration: config.toml and FLEETWIRE_* variables."""


@config_group.command("show")
@home_option
@json_option
def config_show(home: Path, as_json: bool) -> None:
    """Print the configuration in effect: every setting with where it came from (the
    file, a FLEETWIRE_<SECTION>_<KEY> variable or the default) and the templates.
    Passwords in the database URL and secret-looking template env values show as ***."""
    report = config_report(load_config(home))
    emit(report, as_json, config_report_text(report))


def daemon_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--metrics and --log-format, which `hub run` and `spoke run` both take."""
    f = click.option(
        "--log-format", type=click.Choice(FORMATS), default="json", show_default=True,
        envvar="FLEETWIRE_LOG_FORMAT", help="Log lines on stderr: one JSON object each, "
        "or text for a person (or FLEETWIRE_LOG_FORMAT).")(f)
    return click.option(
        "--metrics", "metrics_listen", default="", envvar="FLEETWIRE_METRICS",
        metavar="HOST:PORT", help="Serve Prometheus metrics over plain HTTP at "
        "http://HOST:PORT/metrics (port 0: any free port; or FLEETWIRE_METRICS); off by "
        "default.")(f)


def make_private(home: Path) -> None:
    """Take group and other permissions off the home and what is in it (an instance made
    before files were created private, or copied in with a loose umask). Key files are
    left as they are: one others could read is refused at start, with the fix to run,
    since the key may have leaked already."""
    for path in (home, *home.iterdir()):
        if path.is_symlink() or path.suffix == ".key":
            continue
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(mode & 0o700)


def run_daemon(home: Path, runner: Callable[[Config], Coroutine[Any, Any, None]],
               log_format: str = "json") -> None:
    """Start a daemon: migrate its database, then serve until SIGTERM/SIGINT."""
    cfg = load_config(home)
    make_private(home)
    setup_logging(cfg.name, log_format)
    upgrade(cfg.db_url)
    from shared.daemon import run_until_stopped

    run_until_stopped(runner(cfg))


def build_cli() -> click.Group:
    """The whole command line: the shared commands plus the hub's and the spoke's."""
    from hub.cli import register as register_hub
    from spoke.cli import register as register_spoke

    if "hub" not in root.commands:
        register_spoke(root, IDENTITY_FACTS)
        register_hub(root)
    return root


def main() -> None:
    build_cli()(prog_name="fleetwire")


if __name__ == "__main__":
    main()
