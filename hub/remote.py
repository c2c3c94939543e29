"""Reaching the hub from the command line: the --hub/--token options, one client
session per command, and how times are printed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from hub.client import HubClient
from shared.cli import hub_ca, hub_ca_option

T = TypeVar("T")


_IDEMPOTENCY_KEY = "fleetwire.idempotency_key"


def with_hub(hub_addr: str, tok: str, fn: Callable[[HubClient], Awaitable[T]]) -> T:
    ca = hub_ca()
    # One key per invocation: what this command creates or changes, it does once.
    key = click.get_current_context().meta.get(_IDEMPOTENCY_KEY) or uuid.uuid4().hex

    async def go() -> T:
        async with HubClient(hub_addr, tok, ca, idempotency_key=key) as client:
            return await fn(client)
    return asyncio.run(go())


def _remember_key(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    ctx.meta[_IDEMPOTENCY_KEY] = value
    return value


def hub_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--idempotency-key", default="", expose_value=False,
                     callback=_remember_key, metavar="KEY",
                     help="Name this request: run again with the same key, a command that "
                          "creates or changes something gets the first run's answer "
                          "instead of doing it twice (default: a new key each run).")(f)
    f = hub_ca_option(f)
    f = click.option("--hub", "hub_addr", envvar="FLEETWIRE_HUB", default="",
                     help="The hub's operator address HOST:PORT (or FLEETWIRE_HUB).")(f)
    return click.option("--token", "tok", envvar="FLEETWIRE_TOKEN", default="",
                        help="Operator token (or FLEETWIRE_TOKEN).")(f)


def iso_ms(ms: int) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds") if ms else None
