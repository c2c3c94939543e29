"""`fleetwire bench`: what the federation costs over bare gRPC on this machine, in one run.

Baselines and Fleetwire run side by side on loopback: a bare grpc.aio echo (one hop, and
two hops through a relay, with the channel and server options Fleetwire uses) against a
real hub and spoke (separate processes, embedded SQLite) built in a temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc

from hub.client import HubClient
from hub.demo import LocalFederation
from shared.config import KeepAliveConfig
from shared.errors import FleetwireError
from shared.pb.v1 import operator_pb2
from shared.rpc import channel_options, server_options

ECHO = "/fleetwire.bench.Echo/Echo"
PAYLOAD = b"x" * 200  # about the size of a signed status command


@dataclass(frozen=True)
class Plan:
    rounds: int
    spawns: int
    seconds: float
    crowd: int


QUICK = Plan(rounds=100, spawns=15, seconds=2.0, crowd=100)
FULL = Plan(rounds=2000, spawns=100, seconds=5.0, crowd=1000)

BENCH_TEMPLATES = """
[templates.true]
argv = ["/bin/true"]

[templates.sleep]
argv = ["/bin/sleep", "3600"]
grace_seconds = 5
"""


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(p99 * 1000, 3), "n": len(ordered)}


async def _timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


async def _throughput(fn: Callable[[], Awaitable[Any]], concurrency: int,
                      seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await fn()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return round(done / (time.perf_counter() - start), 1)


async def _echo_servers(keepalive: KeepAliveConfig) -> tuple[list[grpc.aio.Server], str, str]:
    """A bare echo server, and a relay in front of it (the two-hop baseline)."""
    def identity(request: bytes, context: object) -> bytes:
        return request

    echo = grpc.aio.server(options=server_options(keepalive))
    echo.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "fleetwire.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(identity)})])
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    onward = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}",
                                       options=channel_options(keepalive))
    forward = onward.unary_unary(ECHO)

    async def relay_call(request: bytes, context: object) -> bytes:
        return bytes(await forward(request))

    relay = grpc.aio.server(options=server_options(keepalive))
    relay.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "fleetwire.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(relay_call)})])
    relay_port = relay.add_insecure_port("127.0.0.1:0")
    await relay.start()
    return [echo, relay], f"127.0.0.1:{echo_port}", f"127.0.0.1:{relay_port}"


def _build(root: Path) -> tuple[LocalFederation, str, dict[str, str], dict[str, int]]:
    """One hub and one spoke, made with the command line, as an operator would."""
    fed = LocalFederation(root=root)
    for name in ("hub", "spoke"):
        fed.init(name)
        fed.cli("tenant", "create", "--home", str(fed.homes[name]), "bench", show=False)
    spoke_home = fed.homes["spoke"]
    with open(spoke_home / "config.toml", "a") as f:
        f.write(BENCH_TEMPLATES)
    fed.cli("workspace", "create", "--home", str(spoke_home), "--tenant", "bench", "w")
    hub = fed.start("hub", "hub")
    fed.trust("spoke", "hub", address=hub.peer_address)
    fed.cli("grant", "add", "--home", str(spoke_home), "--peer", "hub", "--tenant", "bench",
            "--max-role", "admin")
    spoke = fed.start("spoke", "spoke")
    fed.trust("hub", "spoke", address=spoke.address)
    token = json.loads(fed.cli("token", "create", "--home", str(fed.homes["hub"]), "--tenant",
                               "bench", "--role", "admin", "--json", show=False).stdout)
    return fed, hub.address, {"token": token["token"]}, {"hub": hub.proc.pid,
                                                          "spoke": spoke.proc.pid}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK")


async def _timed_cpu(results: dict[str, Any], name: str, pids: dict[str, int],
                     fn: Callable[[], Awaitable[Any]], n: int) -> None:
    """Latency of fn, and the CPU time each daemon spent per call: a figure a noisy,
    shared machine disturbs far less than wall time."""
    before = {k: _cpu_seconds(p) for k, p in pids.items()}
    results[name] = _ms(await _timed(fn, n))
    for k, p in pids.items():
        results[f"{name}_{k}_cpu_ms_per_call"] = round(
            (_cpu_seconds(p) - before[k]) / n * 1000, 2)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def _measure(plan: Plan, hub_addr: str, token: str,
                   pids: dict[str, int]) -> dict[str, Any]:
    spoke_pid = pids["spoke"]
    keepalive = KeepAliveConfig()
    servers, one_hop, two_hop = await _echo_servers(keepalive)
    results: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(one_hop, options=channel_options(keepalive)) as a, \
                grpc.aio.insecure_channel(two_hop, options=channel_options(keepalive)) as b, \
                HubClient(hub_addr, token) as hub:
            echo1, echo2 = a.unary_unary(ECHO), b.unary_unary(ECHO)
            await echo1(PAYLOAD)
            await echo2(PAYLOAD)
            results["echo_one_hop"] = _ms(await _timed(lambda: echo1(PAYLOAD), plan.rounds))
            results["echo_two_hops"] = _ms(await _timed(lambda: echo2(PAYLOAD), plan.rounds))

            probe = await hub.spawn(spoke="spoke", workspace="w", template="sleep", task="",
                                    params={})
            await _timed_cpu(results, "status_registry", pids,
                             lambda: hub.status(probe.agent_id), plan.rounds)
            await _timed_cpu(results, "status_live", pids,
                             lambda: hub.status(probe.agent_id, live=True), plan.rounds)

            async def bare_spawn() -> None:
                proc = await asyncio.create_subprocess_exec("/bin/true")
                await proc.wait()

            bare = await _timed(lambda: asyncio.create_subprocess_exec("/bin/true"), plan.spawns)
            await bare_spawn()
            results["bare_spawn"] = _ms(bare)
            isolation = await _isolation_of(hub, "spoke")
            results["isolation"] = isolation

            async def bare_isolated() -> None:
                proc = await asyncio.create_subprocess_exec(*bare_isolated_argv(isolation))
                if await proc.wait() != 0:
                    raise RuntimeError(f"{shlex.join(bare_isolated_argv(isolation))} failed")

            await bare_isolated()
            results["bare_isolated_launch"] = _ms(await _timed(bare_isolated, plan.spawns))
            await _timed_cpu(results, "spawn", pids, lambda: hub.spawn(
                spoke="spoke", workspace="w", template="true", task="", params={}),
                plan.spawns)

            victims = [await hub.spawn(spoke="spoke", workspace="w", template="sleep",
                                       task="", params={}) for _ in range(plan.spawns)]
            targets = iter(victims)
            await _timed_cpu(results, "kill", pids, lambda: hub.kill(next(targets).agent_id),
                             len(victims))

            results["echo_two_hops_throughput_32"] = await _throughput(
                lambda: echo2(PAYLOAD), 32, plan.seconds)
            results["status_live_throughput_32"] = await _throughput(
                lambda: hub.status(probe.agent_id, live=True), 32, plan.seconds)

            idle_rss = _rss_mb(spoke_pid)
            sem = asyncio.Semaphore(16)

            async def crowd_one() -> None:
                async with sem:
                    await hub.spawn(spoke="spoke", workspace="w", template="sleep",
                                    task="", params={})

            await asyncio.gather(*(crowd_one() for _ in range(plan.crowd)))
            results[f"status_live_with_{plan.crowd}_agents"] = _ms(await _timed(
                lambda: hub.status(probe.agent_id, live=True), plan.rounds))
            results[f"list_with_{plan.crowd}_agents"] = _ms(await _timed(
                lambda: hub.list(), max(10, plan.rounds // 20)))
            results["spoke_rss_idle_mb"] = idle_rss
            results[f"spoke_rss_with_{plan.crowd}_agents_mb"] = _rss_mb(spoke_pid)
            start = time.perf_counter()
            try:
                killed = await hub.kill_many(operator_pb2.KillAgentsRequest(
                    workspace="w", grace_ms=5000))
                results[f"bulk_kill_{len(killed.results)}_agents_s"] = round(
                    time.perf_counter() - start, 2)
            except FleetwireError as err:
                results["bulk_kill_error"] = err.message
    finally:
        for server in servers:
            await server.stop(0)
    return results


async def _isolation_of(hub: HubClient, spoke: str, timeout: float = 30.0) -> str:
    """What the spoke says it gives agents, once its heartbeat has said it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {s.name: s.isolation for s in (await hub.spokes()).spokes}
        if found.get(spoke):
            return found[spoke]
        await asyncio.sleep(0.2)
    raise RuntimeError(f"spoke '{spoke}' told the hub no isolation within {timeout:g} s")


# A uid no agent gets (the last of the default range): the bare launch's own.
BARE_UID = 1879048192 + 65535


def bare_isolated_argv(isolation: str) -> list[str]:
    """/bin/true with the isolation the spoke gives agents, by util-linux's unshare and
    setpriv, without Fleetwire: the baseline a spawn is held to (it waits for the exit,
    a spawn only for the exec)."""
    program = ["setpriv", "--no-new-privs", "/bin/true"]
    if isolation == "full":
        return ["unshare", "--pid", "--fork", "--mount", "--ipc", "--mount-proc",
                "setpriv", f"--reuid={BARE_UID}", f"--regid={BARE_UID}", "--clear-groups",
                "--no-new-privs", "/bin/true"]
    if isolation == "namespaces":
        return ["unshare", "--user", "--map-current-user", "--pid", "--fork", "--mount",
                "--ipc", "--mount-proc", *program]
    return ["/bin/true"]


def _ratios(r: dict[str, Any], crowd: int) -> list[tuple[str, float, str, bool]]:
    """(figure, value, target, met) for the targets the benchmark is held to."""
    echo2 = r["echo_two_hops"]["p50_ms"]
    rows = [
        ("status (live) p50 / two-hop echo p50", r["status_live"]["p50_ms"] / echo2, "<= 1.5"),
        ("status throughput@32 / two-hop echo throughput@32",
         r["status_live_throughput_32"] / r["echo_two_hops_throughput_32"], ">= 0.5"),
        ("spawn p50 - (bare isolated launch p50 + two-hop echo p50), ms",
         r["spawn"]["p50_ms"] - (r["bare_isolated_launch"]["p50_ms"] + echo2), "<= 3"),
        ("kill p50 - two-hop echo p50, ms", r["kill"]["p50_ms"] - echo2, "<= 20"),
        (f"status p99 with {crowd} agents / idle",
         r[f"status_live_with_{crowd}_agents"]["p99_ms"] / r["status_live"]["p99_ms"], "<= 2"),
        (f"spoke RSS with {crowd} agents, MB", r[f"spoke_rss_with_{crowd}_agents_mb"],
         "<= 200"),
    ]
    out = []
    for name, value, target in rows:
        op, bound = target.split()
        met = value <= float(bound) if op == "<=" else value >= float(bound)
        out.append((name, round(value, 3), target, met))
    return out


def run_bench(*, quick: bool, as_json: bool) -> None:
    plan = QUICK if quick else FULL
    root = Path(tempfile.mkdtemp(prefix="fleetwire-bench-"))
    fed = None
    try:
        fed, hub_addr, creds, pids = _build(root)
        results = asyncio.run(_measure(plan, hub_addr, creds["token"], pids))
    finally:
        if fed is not None:
            fed.close()
        shutil.rmtree(root, ignore_errors=True)
    ratios = _ratios(results, plan.crowd)
    if as_json:
        click.echo(json.dumps({"plan": "quick" if quick else "full", "figures": results,
                               "ratios": [{"figure": n, "value": v, "target": t, "met": m}
                                          for n, v, t, m in ratios]}, indent=2))
        return
    click.echo(f"{'figure':<40} {'p50 ms':>9} {'p99 ms':>9} {'n':>6}")
    for name, value in results.items():
        if isinstance(value, dict):
            click.echo(f"{name:<40} {value['p50_ms']:>9.3f} {value['p99_ms']:>9.3f} "
                       f"{value['n']:>6}")
        else:
            click.echo(f"{name:<40} {value:>9}")
    click.echo("")
    for name, value, target, met in ratios:
        click.echo(f"{name:<55} {value:>9} {target:>8}  {'met' if met else 'MISSED'}")
