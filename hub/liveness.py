"""Whether a spoke is alive, from the heartbeats the hub has received."""

from __future__ import annotations

from shared.db import models

ONLINE, OFFLINE, UNKNOWN = "ONLINE", "OFFLINE", "UNKNOWN"


def spoke_status(peer: models.Peer, now_ms: int, offline_after_seconds: float) -> str:
    """ONLINE, OFFLINE (heartbeat overdue), or UNKNOWN (never sent one)."""
    if peer.last_heartbeat_ms is None:
        return UNKNOWN
    overdue = now_ms - peer.last_heartbeat_ms > offline_after_seconds * 1000
    return OFFLINE if overdue else ONLINE
