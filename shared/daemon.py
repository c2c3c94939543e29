"""What every daemon shares: health and reflection, the ready line, graceful stop on
SIGTERM/SIGINT. (How it logs is in shared/log_format.py.)"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.config import Config
from shared.envelope import now_ms
from shared.peers import check_address
from shared.replay import MessageMemory
from shared.rpc import PeerCerts
from shared.tls import load_tls_identity, make_certificate

log = logging.getLogger("fleetwire")

STOP_GRACE_SECONDS = 5.0
PRUNE_INTERVAL_SECONDS = 600.0


def add_health(server: grpc.aio.Server, service: str) -> None:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    asyncio.get_running_loop().create_task(
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING))


def add_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """gRPC server reflection listing `services` (full names), health and itself."""
    reflection.enable_server_reflection(
        [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)


def announce(role: str, cfg: Config, host: str, port: int, peers: str = "",
             metrics: str = "") -> None:
    """The line tests and scripts wait for: the daemon is serving on this port; with
    metrics, a second line says where /metrics is served."""
    print(f"fleetwire {role} '{cfg.name}' listening on {host}:{port}"
          + (f" peers on {peers}" if peers else ""), flush=True)
    if metrics:
        print(f"metrics on http://{metrics}/metrics", flush=True)


async def peer_certs(cfg: Config, sessions: async_sessionmaker[AsyncSession],
                     insecure: bool) -> PeerCerts | None:
    """This instance's TLS identity and its peers' pinned certificates; None with
    --insecure (plaintext). A home made before TLS gets its certificate now."""
    if insecure:
        log.warning("--insecure: traffic between instances is plaintext (loopback only)")
        return None
    if not cfg.tls_key_path.exists() and not cfg.tls_cert_path.exists():
        make_certificate(cfg.name, cfg.tls_key_path, cfg.tls_cert_path)
        log.info("made a TLS certificate for '%s' in %s", cfg.name, cfg.tls_cert_path)
    certs = PeerCerts(sessions, load_tls_identity(cfg.tls_key_path, cfg.tls_cert_path))
    await certs.refresh()
    return certs


def with_port(address: str, port: int) -> str:
    return f"{address.rpartition(':')[0]}:{port}"


def advertised(listen: str, port: int, advertise: str) -> str:
    """Where peers reach this daemon: --advertise, else the bound address unless it is a
    wildcard (then nobody can tell, and "" is said)."""
    if advertise:
        return check_address(advertise)
    host = listen.rpartition(":")[0].strip("[]")
    return "" if host in ("", "0.0.0.0", "::") else with_port(listen, port)


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run(main), except that the tasks left when main returns get at most
    STOP_GRACE_SECONDS to end once cancelled. asyncio.run waits for them without a
    limit, and one can wait forever: a database connection SQLAlchemy closes after a
    cancellation, whose aiosqlite worker thread has already stopped (seen: a spoke that
    did not exit on SIGTERM). Those left are logged with where they wait, and abandoned."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                _, pending = loop.run_until_complete(
                    asyncio.wait(left, timeout=STOP_GRACE_SECONDS))
                for task in pending:
                    log.warning("abandoned at exit: task %s%s", task.get_name(),
                                _stack(task))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(),
                                                     STOP_GRACE_SECONDS))
        except TimeoutError:
            log.warning("abandoned at exit: threads of the default executor")
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _stack(task: asyncio.Task[Any]) -> str:
    return "".join(f"\n  {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                   for f in task.get_stack()) or " (no frames)"


def log_tasks() -> None:
    """On SIGUSR1: log every asyncio task with where it waits, and print every thread's
    stack to stderr: what a daemon that does not stop is waiting for."""
    faulthandler.dump_traceback(all_threads=True)
    for task in asyncio.all_tasks():
        log.warning("task %s%s", task.get_name(), _stack(task))


async def serve_until_stopped(
    server: grpc.aio.Server, memory: MessageMemory, cfg: Config,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    end_streams: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; then stop taking requests and finish those in flight.

    end_streams: ends the long-lived streams being served, which would otherwise hold
    the stop for its whole grace."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, log_tasks)

    async def prune() -> None:
        while True:
            cutoff = now_ms() - cfg.wire.message_retention_seconds * 1000
            try:
                await memory.forget_older_than(cutoff)
            except Exception:
                log.exception("pruning replay memory failed")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)

    pruner = asyncio.create_task(prune())
    # Everything made so far (modules, the engine, the server) lives as long as the
    # daemon: out of the collector's sight, a full collection walks only what came
    # after, instead of delaying an occasional request by a pass over all of it (the
    # README's performance section has the figures).
    gc.collect()
    gc.freeze()
    await stop.wait()
    log.info("stopping: no new requests, finishing those in flight")
    pruner.cancel()
    if end_streams is not None:
        end_streams()
    await server.stop(STOP_GRACE_SECONDS)
    if on_stop is not None:
        await on_stop()
