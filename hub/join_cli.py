"""`fleetwire join-token create`, on the hub's machine (`fleetwire join` is the spoke's,
in spoke/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from hub.join import DEFAULT_TTL_SECONDS, create_join_token
from hub.remote import iso_ms
from shared.cli import audited, emit, home_option, json_option, with_session
from shared.config import load_config
from shared.durations import describe, parse_duration
from shared.tls import fingerprint


@click.group("join-token")
def join_token() -> None:
    """Single-use invitations for spokes to join this hub."""


@join_token.command("create")
@home_option
@click.option("--name", required=True, help="The joining spoke's instance name.")
@click.option("--ttl", default=describe(DEFAULT_TTL_SECONDS), show_default=True,
              help="How long the token may be used: 90s, 15m, 1h (at most 1h).")
@click.option("--pending", is_flag=True, help="The spoke joins as PENDING: its messages "
              "are refused until `fleetwire peer resume NAME` here.")
@json_option
def join_token_create(home: Path, name: str, ttl: str, pending: bool, as_json: bool) -> None:
    """Print a single-use, expiring token for spoke NAME; give it to `fleetwire join`.
    It holds no secret of the hub's: only a random secret (kept here as a hash) and
    the fingerprint of this hub's TLS certificate, which the spoke pins."""
    seconds = parse_duration(ttl, "--ttl")
    cfg = load_config(home)
    hub_fp = fingerprint(cfg.tls_cert_path.read_bytes())
    issued = with_session(home, lambda s, _: create_join_token(
        s, name=name, ttl_seconds=seconds, hub_fingerprint=hub_fp, pending=pending),
        audited("join_token.create", peer=name, target=name,
                reason=f"ttl {describe(seconds)}" + (", pending" if pending else "")))
    emit({"token": str(issued.token), "name": issued.name,
          "expires_at": iso_ms(issued.expires_at_ms), "pending": issued.pending,
          "hub_fingerprint": hub_fp}, as_json,
         f"{issued.token}\n(for spoke '{name}', single use, expires "
         f"{iso_ms(issued.expires_at_ms)}; on the spoke: fleetwire join --home DIR --hub "
         f"HOST:PORT --token TOKEN)")
