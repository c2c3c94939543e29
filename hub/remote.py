"""Reaching the hub from the command line: the --hub/--token options, one client
session per command, and how times are printed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from hub.client import HubClient
from shared.cli import hub_ca, hub_ca_option

T = TypeVar("T")


def with_hub(hub_addr: str, tok: str, fn: Callable[[HubClient], Awaitable[T]]) -> T:
    ca = hub_ca()

    async def go() -> T:
        async with HubClient(hub_addr, tok, ca) as client:
            return await fn(client)
    return asyncio.run(go())


def hub_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = hub_ca_option(f)
    f = click.option("--hub", "hub_addr", envvar="FLEETWIRE_HUB", default="",
                     help="The hub's operator address HOST:PORT (or FLEETWIRE_HUB).")(f)
    return click.option("--token", "tok", envvar="FLEETWIRE_TOKEN", default="",
                        help="Operator token (or FLEETWIRE_TOKEN).")(f)


def iso_ms(ms: int) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds") if ms else None
