"""Hub commands of the `fleetwire` command line: `hub run`, `agent ...`, `spoke list`,
`demo`; the token commands are in hub/token_cli.py."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from hub.client import HubClient
from hub.daemon import run_hub
from hub.join_cli import join_token
from hub.remote import hub_options, iso_ms, with_hub
from hub.token_cli import token
from shared.cli import daemon_options, home_option, json_option, run_daemon
from shared.config import Config
from shared.daemon import with_port
from shared.errors import InvalidArgument
from shared.pb.v1 import operator_pb2, wire_pb2


@click.group()
def hub() -> None:
    """The hub daemon."""


@hub.command("run")
@home_option
@click.option("--listen", default=None, help="HOST:PORT of the operator API (port 0: any "
              "free port); default from config.toml [hub] listen.")
@click.option("--peer-listen", default=None, help="HOST:PORT where spokes reach the hub "
              "(mutual TLS); default [hub] peer_listen, or port 0 on the --listen host "
              "when --listen has port 0.")
@click.option("--insecure", is_flag=True, help="Plaintext between instances (and for "
              "operators): only on loopback addresses, for trying things out.")
@click.option("--operator-tls", is_flag=True, help="Serve the operator API with TLS on a "
              "loopback address too (it always is elsewhere).")
@daemon_options
def hub_run(home: Path, listen: str | None, peer_listen: str | None, insecure: bool,
            operator_tls: bool, metrics_listen: str, log_format: str) -> None:
    """Run the hub daemon until SIGTERM or SIGINT."""

    def runner(cfg: Config) -> Coroutine[Any, Any, None]:
        op = listen or cfg.hub.listen
        peers = peer_listen or (with_port(op, 0) if listen and op.endswith(":0")
                                else cfg.hub.peer_listen)
        return run_hub(cfg, op, peers, insecure=insecure, operator_tls=operator_tls,
                       metrics_listen=metrics_listen)

    run_daemon(home, runner, log_format)


def agent_json(a: wire_pb2.Agent) -> dict[str, Any]:
    """The JSON shape of an agent that `--json` prints."""
    return {
        "agent_id": a.agent_id, "spoke": a.spoke, "tenant": a.tenant,
        "workspace": a.workspace, "template": a.template, "task": a.task,
        "principal": a.principal,
        "state": wire_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_"),
        "exit_code": a.exit_code if a.HasField("exit_code") else None,
        "created_at": iso_ms(a.created_at_ms), "started_at": iso_ms(a.started_at_ms),
        "ended_at": iso_ms(a.ended_at_ms), "reason": a.reason,
        "stale": a.stale, "reported_at": iso_ms(a.reported_at_ms),
    }


def _agent_line(a: dict[str, Any]) -> str:
    exit_code = "-" if a["exit_code"] is None else str(a["exit_code"])
    return (f"{a['agent_id']}  {a['spoke']:<10} {a['tenant']}/{a['workspace']:<12} "
            f"{a['template']:<8} {a['state']:<9} exit={exit_code:<4} {a['reason']}")


def _agent_text(a: dict[str, Any]) -> str:
    return "\n".join(f"{k:<11} {'-' if v is None or v == '' else v}" for k, v in a.items())


@click.group()
def agent() -> None:
    """Spawn, query, list and kill agents through the hub."""


@agent.command("spawn")
@hub_options
@click.option("--spoke", required=True)
@click.option("--workspace", required=True)
@click.option("--template", required=True)
@click.option("--task", default="")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A value for a parameter the template declares (repeatable).")
@json_option
def agent_spawn(hub_addr: str, tok: str, spoke: str, workspace: str, template: str,
                task: str, params: tuple[str, ...], as_json: bool) -> None:
    """Spawn an agent from a template on a spoke."""
    values: dict[str, str] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--param '{item}' is not KEY=VALUE")
        values[key] = value
    a = agent_json(with_hub(hub_addr, tok, lambda c: c.spawn(
        spoke=spoke, workspace=workspace, template=template, task=task, params=values)))
    click.echo(json.dumps(a, indent=2) if as_json else _agent_text(a))


live_option = click.option("--live", is_flag=True,
                           help="Ask the spoke now instead of the hub's registry.")


@agent.command("status")
@hub_options
@click.argument("agent_id")
@live_option
@json_option
def agent_status(hub_addr: str, tok: str, agent_id: str, live: bool, as_json: bool) -> None:
    """Show one agent: its last reported state, or with --live its spoke's answer."""
    a = agent_json(with_hub(hub_addr, tok, lambda c: c.status(agent_id, live=live)))
    click.echo(json.dumps(a, indent=2) if as_json else _agent_text(a))


@agent.command("list")
@hub_options
@click.option("--spoke", default="")
@click.option("--workspace", default="")
@live_option
@json_option
def agent_list(hub_addr: str, tok: str, spoke: str, workspace: str, live: bool,
               as_json: bool) -> None:
    """List the agents of the token's tenant from the hub's registry (--live: ask the
    spokes)."""
    resp = with_hub(hub_addr, tok, lambda c: c.list(spoke=spoke, workspace=workspace,
                                                     live=live))
    rows = [agent_json(a) for a in resp.agents]
    for name in resp.unreachable_spokes:
        click.echo(f"warning: spoke '{name}' is " + (
            "unreachable; its agents are not listed" if live else
            "OFFLINE; its agents' states are the last known (UNKNOWN)"), err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo("\n".join(_agent_line(a) for a in rows) or "no agents")


@agent.command("kill")
@hub_options
@click.argument("agent_id", required=False)
@click.option("--grace", type=click.FloatRange(min=0), default=None,
              help="Seconds between SIGTERM and SIGKILL (default: the template's).")
@click.option("--reason", default="", help="Why; kept in the agent's history and the audit "
              "trail.")
@click.option("--all", "kill_all", is_flag=True,
              help="Kill every agent in --workspace that matches the filters (admins).")
@click.option("--workspace", default="", help="With --all: the workspace.")
@click.option("--spoke", default="", help="With --all: only on this spoke.")
@click.option("--template", default="", help="With --all: only agents of this template.")
@click.option("--older-than", "older_than", default="", metavar="DURATION",
              help="With --all: only agents started at least this long ago (90s, 10m, 2h).")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["PENDING", "RUNNING"], case_sensitive=False),
              help="With --all: only agents in this state (default: PENDING and RUNNING).")
@click.option("--dry-run", is_flag=True, help="With --all: list what would be killed.")
@json_option
def agent_kill(hub_addr: str, tok: str, agent_id: str | None, grace: float | None,
               reason: str, kill_all: bool, workspace: str, spoke: str, template: str,
               older_than: str, states: tuple[str, ...], dry_run: bool,
               as_json: bool) -> None:
    """Kill an agent and everything it started, or with --all every matching agent of a
    workspace at once; prints each final state."""
    grace_ms = None if grace is None else int(grace * 1000)
    if not kill_all:
        if agent_id is None or workspace or spoke or template or older_than or states \
                or dry_run:
            raise InvalidArgument("give one AGENT_ID, or --workspace W --all with filters")
        a = agent_json(with_hub(hub_addr, tok, lambda c: c.kill(agent_id, grace_ms, reason)))
        click.echo(json.dumps(a, indent=2) if as_json else _agent_text(a))
        return
    if agent_id is not None or not workspace:
        raise InvalidArgument("--all takes --workspace W and no AGENT_ID")
    req = operator_pb2.KillAgentsRequest(
        workspace=workspace, spoke=spoke, template=template,
        older_than_ms=int(parse_duration(older_than) * 1000) if older_than else 0,
        states=[f"AGENT_STATE_{s.upper()}" for s in states], dry_run=dry_run, reason=reason)
    if grace_ms is not None:
        req.grace_ms = grace_ms
    resp = with_hub(hub_addr, tok, lambda c: c.kill_many(req))
    rows = [{**agent_json(r.agent), "error": r.error or None} for r in resp.results]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        verb = "would kill" if dry_run else "killed"
        for r in rows:
            click.echo(_agent_line(r) + (f"  ERROR: {r['error']}" if r["error"] else ""))
        failed = sum(1 for r in rows if r["error"])
        click.echo(f"{verb} {len(rows) - failed} agent(s)" + (f", {failed} refused" if failed
                                                              else ""), err=True)
    if any(r["error"] for r in rows):
        sys.exit(1)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1d' (or plain seconds) as seconds."""
    unit = text[-1:].lower()
    number = text[:-1] if unit in _DURATION_UNITS else text
    try:
        value = float(number) * _DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise InvalidArgument(f"'{text}' is not a duration; use e.g. 90s, 10m, 2h, 1d") from None
    if value < 0:
        raise InvalidArgument(f"duration '{text}' is negative")
    return value


@agent.command("logs")
@hub_options
@click.argument("agent_id")
@click.option("--tail", "tail_lines", type=click.IntRange(min=1, max=10_000), default=100,
              show_default=True, help="How many of the last lines.")
def agent_logs(hub_addr: str, tok: str, agent_id: str, tail_lines: int) -> None:
    """Print the end of an agent's output, fetched from its spoke."""
    logs = with_hub(hub_addr, tok, lambda c: c.logs(agent_id, tail_lines))
    if logs.truncated:
        click.echo(f"(older output left out; showing at most the last {tail_lines} lines)",
                   err=True)
    click.echo(logs.text, nl=False)


@agent.command("watch")
@hub_options
@click.option("--workspace", default="")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many changes (default: until interrupted).")
@json_option
def agent_watch(hub_addr: str, tok: str, workspace: str, count: int | None,
                as_json: bool) -> None:
    """Print the token's tenant's agent changes as they happen (one JSON object a line
    with --json)."""

    async def go(client: HubClient) -> None:
        seen = 0
        async for a in client.watch(workspace):
            row = agent_json(a)
            click.echo(json.dumps(row) if as_json else _agent_line(row))
            seen += 1
            if count is not None and seen >= count:
                return

    with contextlib.suppress(KeyboardInterrupt):
        with_hub(hub_addr, tok, go)


@click.command("list")
@hub_options
@json_option
def spoke_list(hub_addr: str, tok: str, as_json: bool) -> None:
    """List the hub's spokes: ONLINE/OFFLINE, the isolation each gives its agents, last
    heartbeat, the tenant's agents by state."""
    resp = with_hub(hub_addr, tok, lambda c: c.spokes())
    rows: list[dict[str, Any]] = [{"name": s.name, "address": s.address, "status": s.status,
             "last_heartbeat": iso_ms(s.last_heartbeat_ms), "isolation": s.isolation,
             "agents": dict(sorted(s.agents_by_state.items()))} for s in resp.spokes]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        counts = ", ".join(f"{k} {v}" for k, v in r["agents"].items()) or "no agents"
        click.echo(f"{r['name']:<16} {r['status']:<8} {r['address']:<22} "
                   f"isolation {r['isolation'] or '?':<11} "
                   f"last heartbeat {r['last_heartbeat'] or 'never'}  {counts}")
    if not rows:
        click.echo("no spokes")


@click.command()
@click.option("--keep", is_flag=True, help="Keep the temporary folder for a look afterwards.")
def demo(keep: bool) -> None:
    """Build a local federation (one hub, two spokes, two tenants) and walk through it."""
    from hub.demo import run_demo

    run_demo(keep=keep)


@click.command()
@click.option("--quick", is_flag=True, help="Fewer rounds and 100 agents, not 1,000 (under "
              "a minute).")
@json_option
def bench(quick: bool, as_json: bool) -> None:
    """Measure a hub and spoke against bare gRPC on this machine (medians, p99, ratios)."""
    from hub.bench import run_bench

    run_bench(quick=quick, as_json=as_json)


def register(root: click.Group) -> None:
    """Add the hub's commands; `spoke list` joins the spoke group, so register after it."""
    for cmd in (token, hub, agent, demo, bench, join_token):
        root.add_command(cmd)
    spoke_group = root.commands["spoke"]
    assert isinstance(spoke_group, click.Group)
    spoke_group.add_command(spoke_list)
