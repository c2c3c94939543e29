"""Emergency stop of a whole spoke: `fleetwire spoke drain` and `spoke resume`.

Draining is a flag file in the spoke's home, so it works from the command line on the
spoke's machine while the daemon runs, and survives a restart. While it is there the
daemon takes no spawns and kills every agent it has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.config import Config

DRAIN_FILE = "DRAINING"
WATCH_SECONDS = 0.25


def drain_path(cfg: Config) -> Path:
    return cfg.home / DRAIN_FILE


def drain_reason(cfg: Config) -> str | None:
    """Why the spoke is draining, or None when it is not."""
    try:
        return str(json.loads(drain_path(cfg).read_text()).get("reason", ""))
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):
        return "drain requested"


def request_drain(cfg: Config, *, reason: str, by: str) -> None:
    path = drain_path(cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"reason": reason, "by": by}))
    os.replace(tmp, path)


def lift_drain(cfg: Config) -> bool:
    try:
        drain_path(cfg).unlink()
    except FileNotFoundError:
        return False
    return True
