"""How much a spoke isolates its agents, and the uids it gives them.

The level is chosen once at start-up from [spoke] isolation and what the launcher found
the machine allows (spoke/sandbox.py). Agent uids come from a configured range and are
claimed with a lock file in /run/fleetwire/uids that the agent's supervisor holds for
its life, so no two agents (of this spoke or another on the machine) share a uid, and a
uid is given again only once its supervisor, and with it the agent's whole PID
namespace, is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.config import Config
from shared.errors import InvalidArgument, ResourceExhausted
from spoke import sandbox

log = logging.getLogger(__name__)

AUTO = "auto"
CLAIMS_DIR = Path("/run/fleetwire/uids")
UID_RETRY_AFTER_MS = 5000


@dataclass(frozen=True)
class Isolation:
    """What this spoke gives its agents."""

    level: str
    # Why agents cannot start at all ("" when they can): the machine allows no
    # isolation and the config did not ask for "none".
    refusal: str = ""
    # Why the level is not higher ("" at "full").
    limited_by: str = ""

    def describe(self) -> str:
        if self.refusal:
            return "unavailable"
        return self.level

    def check(self, template: str, wanted: str, spoke: str) -> None:
        """Refuse a spawn this spoke cannot isolate as asked (or at all)."""
        if self.refusal:
            raise InvalidArgument(f"spoke '{spoke}' cannot isolate agents: {self.refusal}")
        if wanted and not sandbox.level_at_least(self.level, wanted):
            raise InvalidArgument(
                f"template '{template}' requires isolation '{wanted}' and spoke '{spoke}' "
                f"provides '{self.level}' ({self.limited_by}); use another spoke")


RECORD = "isolation.json"
_PROBE = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
          "from spoke.sandbox import probe; uid = int(sys.argv[2]); "
          "print(json.dumps({level: probe(level, uid) for level in ('full', 'namespaces')}))")


def record(run_dir: Path, isolation: Isolation) -> None:
    """Keep what this run of the spoke chose, for `identity show`."""
    (run_dir / RECORD).write_text(json.dumps(asdict(isolation)))


def recorded_or_probed(cfg: Config, run_dir: Path) -> Isolation:
    """What the spoke chose at its last start; for a spoke that never ran, what it would
    choose now (the trial runs in a child interpreter: it forks, and this process may
    have threads)."""
    try:
        return Isolation(**json.loads((run_dir / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        pass
    found = subprocess.run([sys.executable, "-I", "-c", _PROBE, json.dumps(sys.path),
                            str(cfg.spoke.agent_uid_base)], capture_output=True, text=True,
                           timeout=30, check=True)
    return choose(cfg, json.loads(found.stdout))


def choose(cfg: Config, probed: dict[str, str]) -> Isolation:
    """The level for this run; InvalidArgument when the config asks for more than the
    machine allows."""
    asked = cfg.spoke.isolation
    full, namespaces = probed.get(sandbox.FULL, "?"), probed.get(sandbox.NAMESPACES, "?")
    if asked == sandbox.NONE:
        return Isolation(sandbox.NONE, limited_by="[spoke] isolation = \"none\"")
    if not full:
        return Isolation(sandbox.FULL)
    if asked == sandbox.FULL:
        raise InvalidArgument(f"[spoke] isolation = \"full\", but {full}; run the spoke as "
                           "root, or set isolation = \"namespaces\" or \"auto\"")
    if not namespaces:
        return Isolation(sandbox.NAMESPACES, limited_by=full)
    if asked == sandbox.NAMESPACES:
        raise InvalidArgument(f"[spoke] isolation = \"namespaces\", but this machine refuses "
                           f"user namespaces ({namespaces}); allow them, or set isolation "
                           "= \"none\" to run agents without isolation")
    return Isolation(sandbox.NONE, limited_by=namespaces, refusal=(
        f"this machine refuses the namespaces agents run in ({namespaces}); set [spoke] "
        "isolation = \"none\" to run agents without isolation, or use another spoke"))


def check_uid_range(cfg: Config) -> None:
    """Refuse a range that holds root, the spoke's own uid or a user of this machine."""
    base, count = cfg.spoke.agent_uid_base, cfg.spoke.agent_uid_count
    last = base + count - 1
    if base <= 0 or last >= 0xFFFFFFFF or os.getuid() in range(base, last + 1):
        raise InvalidArgument(f"[spoke] agent_uid_base and agent_uid_count give {base}-{last}, "
                           "which holds root, the spoke's own uid or an invalid uid; "
                           "choose a range of unused uids")
    taken = sorted(u.pw_uid for u in pwd.getpwall() if base <= u.pw_uid <= last)
    if taken:
        raise InvalidArgument(f"[spoke] agent uids {base}-{last} include uid {taken[0]} of user "
                           f"'{pwd.getpwuid(taken[0]).pw_name}'; choose a range no user has")


class UidPool:
    """Claims uids for agents from [spoke] agent_uid_base/agent_uid_count."""

    def __init__(self, base: int, count: int, claims: Path = CLAIMS_DIR) -> None:
        self._base, self._count, self._claims = base, count, claims
        # Claims start after the last one handed out, so a uid just given back is the
        # last to be given again.
        self._next = 0

    def claim(self) -> tuple[int, int]:
        """A free uid and the fd of its lock file, for the agent's supervisor to hold."""
        self._claims.mkdir(mode=0o700, parents=True, exist_ok=True)
        for step in range(self._count):
            offset = (self._next + step) % self._count
            uid = self._base + offset
            path = self._claims / str(uid)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A supervisor giving its uid back unlinks the file before it unlocks:
                # a lock on an unlinked file claims nothing.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self._next = offset + 1
                    return uid, fd
            except OSError:
                pass
            os.close(fd)
        raise ResourceExhausted(
            f"every agent uid of this spoke is in use ({self._count} from "
            f"{self._base}); retry when an agent ends, or widen [spoke] agent_uid_count",
            retry_after_ms=UID_RETRY_AFTER_MS)


def exposed_paths(cfg: Config) -> tuple[str, ...]:
    """What agents may read wherever it lies: the interpreter {python} names, the
    package its demo agent runs from, and [spoke] agent_paths."""
    import spoke as spoke_package  # its own location is what is wanted

    found = {sys.prefix, sys.base_prefix, sys.exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             str(Path(spoke_package.__file__).resolve().parents[1]),
             *cfg.spoke.agent_paths}
    home = os.path.realpath(cfg.home)
    kept = []
    for path in sorted(found):
        real = os.path.realpath(path)
        if real == home or real.startswith(home + os.sep):
            log.warning("not exposing %s to agents: it is inside the spoke's home", path)
            continue
        kept.append(real)
    with contextlib.suppress(ValueError):
        kept.remove("/")
    return tuple(sorted(set(kept)))
