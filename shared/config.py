"""Instance configuration: config.toml read into frozen dataclasses.

Defaults are written down once, here. A bad file fails at start-up with the key and the
reason, never later in a request.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

# \Z, not $: $ also matches before a trailing newline.
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
PLACEHOLDER_RE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
# Placeholders a template may use besides its own params.
BUILTIN_PLACEHOLDERS = frozenset({"python", "task", "agent_id", "tenant", "workspace", "workdir"})


def check_slug(kind: str, value: str) -> str:
    """A tenant or workspace slug: lowercase letters, digits and '-', at most 63."""
    if not SLUG_RE.match(value):
        raise InvalidArgument(
            f"{kind} '{value}' is not a valid slug: use 1-63 lowercase letters, digits "
            "and '-', starting with a letter or digit"
        )
    return value


def check_name(kind: str, value: str) -> str:
    """An instance, principal or template name."""
    if not NAME_RE.match(value):
        raise InvalidArgument(
            f"{kind} '{value}' is not a valid name: use 1-63 letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class WireConfig:
    max_clock_skew_seconds: int = 60
    # Replay memory keeps message ids this long; must exceed the skew window.
    message_retention_seconds: int = 24 * 3600


@dataclass(frozen=True)
class RetryConfig:
    """How the hub retries a command to a spoke: same signed bytes every attempt."""

    attempts: int = 4
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 2.0
    attempt_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class KeepAliveConfig:
    """The same on every server and channel so neither side sees the other as abusive."""

    interval_ms: int = 30_000
    timeout_ms: int = 10_000


@dataclass(frozen=True)
class HubConfig:
    listen: str = "127.0.0.1:7400"
    # Where spokes reach the hub (mutual TLS): status reports, heartbeats, key news.
    peer_listen: str = "127.0.0.1:7402"
    # A spoke without a heartbeat for this long is OFFLINE (3 spoke heartbeats by default).
    offline_after_seconds: float = 15.0


@dataclass(frozen=True)
class SpokeConfig:
    listen: str = "127.0.0.1:7401"
    # Agent working folders live under <home>/<workspaces_dir>/<tenant>/<workspace>/.
    workspaces_dir: str = "workspaces"
    max_grace_seconds: int = 300
    # How often the spoke tells its hubs it is alive (and retries reports at the latest).
    heartbeat_seconds: float = 5.0
    # Most agents running at once on this spoke, all tenants together; 0: no limit.
    max_agents: int = 0
    # Caps no template may exceed, and the limits of templates that set none; 0: none.
    cap_memory_mb: int = 0
    cap_cpu_seconds: int = 0
    cap_open_files: int = 0
    cap_processes: int = 0
    cap_log_mb: int = 0
    # Use cgroups where this machine allows; false: the watchdog alone (see README).
    use_cgroups: bool = True
    # Environment variables agents inherit from the spoke; everything else is dropped.
    pass_env: tuple[str, ...] = ("PATH", "LANG", "LC_ALL", "TZ")


@dataclass(frozen=True)
class TemplateConfig:
    name: str
    argv: tuple[str, ...]
    description: str = ""
    # Declared parameters with their defaults; a spawn may set only these.
    params: dict[str, str] = field(default_factory=dict)
    grace_seconds: float = 10.0
    max_runtime_seconds: float = 3600.0
    # Most agents of this template running at once in one workspace; 0: no limit.
    max_concurrent: int = 0
    # Limits of each agent's whole process tree (see spoke/limits.py); 0: the spoke's cap.
    max_memory_mb: int = 0
    max_cpu_seconds: int = 0
    max_open_files: int = 0
    max_processes: int = 0
    max_log_mb: int = 0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatabaseConfig:
    # Empty: SQLite at <home>/state.db.
    url: str = ""


@dataclass(frozen=True)
class Config:
    home: Path
    name: str
    wire: WireConfig = WireConfig()
    retry: RetryConfig = RetryConfig()
    keepalive: KeepAliveConfig = KeepAliveConfig()
    hub: HubConfig = HubConfig()
    spoke: SpokeConfig = SpokeConfig()
    database: DatabaseConfig = DatabaseConfig()
    templates: dict[str, TemplateConfig] = field(default_factory=dict)

    @property
    def key_path(self) -> Path:
        return self.home / "identity.key"

    @property
    def tls_key_path(self) -> Path:
        return self.home / "tls.key"

    @property
    def tls_cert_path(self) -> Path:
        return self.home / "tls.crt"

    @property
    def db_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.home / 'state.db'}"

    @property
    def workspaces_root(self) -> Path:
        return self.home / self.spoke.workspaces_dir


def _table(cls: type[Any], data: Any, where: str, **extra: Any) -> Any:
    """Build dataclass cls from a TOML table, naming the key in every complaint."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        f = known.get(key)
        if f is None or key in extra:
            raise InvalidArgument(f"{where}.{key}: unknown key")
        expected = type(f.default) if f.default is not MISSING else None
        if expected is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"{where}.{key}: must be a list of strings")
            value = tuple(value)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif expected is not None and (not isinstance(value, expected)
                                       or (expected is not bool and isinstance(value, bool))):
            raise InvalidArgument(f"{where}.{key}: must be {expected.__name__}")
        values[key] = value
    return cls(**values, **extra)


def _template(name: str, data: Any) -> TemplateConfig:
    where = f"templates.{name}"
    check_name("template", name)
    if not isinstance(data, dict):
        raise InvalidArgument(f"[{where}] must be a table")
    argv = data.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidArgument(f"{where}.argv: must be a non-empty list of strings")
    params = data.get("params", {})
    env = data.get("env", {})
    shadowed = sorted(set(params) & BUILTIN_PLACEHOLDERS) if isinstance(params, dict) else []
    if shadowed:
        raise InvalidArgument(f"{where}.params: {', '.join(shadowed)} is a built-in placeholder")
    for key, table in (("params", params), ("env", env)):
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in table.items()
        ):
            raise InvalidArgument(f"{where}.{key}: must be a table of strings")
    for item in argv:
        for ph in PLACEHOLDER_RE.findall(item):
            if ph not in BUILTIN_PLACEHOLDERS and ph not in params:
                raise InvalidArgument(
                    f"{where}.argv: placeholder {{{ph}}} is neither built in "
                    f"({', '.join(sorted(BUILTIN_PLACEHOLDERS))}) nor declared in params"
                )
    rest = {k: v for k, v in data.items() if k not in ("argv", "params", "env")}
    tpl: TemplateConfig = _table(TemplateConfig, rest, where, name=name, argv=tuple(argv),
                                 params=dict(params), env=dict(env))
    for key, ok, rule in (("grace_seconds", tpl.grace_seconds >= 0, ">= 0"),
                          ("max_runtime_seconds", tpl.max_runtime_seconds > 0, "> 0"),
                          ("max_concurrent", tpl.max_concurrent >= 0, ">= 0"),
                          *((f"max_{n}", getattr(tpl, f"max_{n}") >= 0, ">= 0")
                            for n in LIMITS)):
        if not ok:
            raise InvalidArgument(f"{where}.{key} must be {rule}")
    return tpl


# Limits where 0 means "no limit".
_ZERO_IS_UNLIMITED = frozenset({"max_agents", "cap_memory_mb", "cap_cpu_seconds",
                                "cap_open_files", "cap_processes", "cap_log_mb"})
LIMITS = ("memory_mb", "cpu_seconds", "open_files", "processes", "log_mb")


def _check_positive(sections: dict[str, Any]) -> None:
    """Durations, counts and sizes must be positive: a zero skew would refuse everything."""
    for section, value in sections.items():
        for f in fields(value):
            v = getattr(value, f.name)
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if f.name in _ZERO_IS_UNLIMITED:
                if v < 0:
                    raise InvalidArgument(f"{section}.{f.name}: must be 0 (no limit) or more")
            elif v <= 0:
                raise InvalidArgument(f"{section}.{f.name}: must be greater than 0")


def load_config(home: Path) -> Config:
    """Read <home>/config.toml; raise InvalidArgument naming the bad key."""
    path = home / "config.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(
            f"{path} does not exist; create the instance with `fleetwire init --home {home}`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    try:
        instance = data.pop("instance", {})
        if not isinstance(instance, dict):
            raise InvalidArgument("[instance] must be a table")
        for key in instance:
            if key != "name":
                raise InvalidArgument(f"instance.{key}: unknown key")
        name = instance.get("name")
        if not isinstance(name, str):
            raise InvalidArgument("instance.name: required string")
        check_name("instance.name", name)
        sections = {
            "wire": WireConfig, "retry": RetryConfig, "keepalive": KeepAliveConfig,
            "hub": HubConfig, "spoke": SpokeConfig, "database": DatabaseConfig,
        }
        built: dict[str, Any] = {}
        for key, cls in sections.items():
            if key in data:
                built[key] = _table(cls, data.pop(key), key)
        raw_templates = data.pop("templates", {})
        if not isinstance(raw_templates, dict):
            raise InvalidArgument("[templates] must be a table of [templates.NAME] tables")
        templates = {n: _template(n, t) for n, t in raw_templates.items()}
        _check_positive(built)
        if data:
            raise InvalidArgument(f"{', '.join(sorted(data))}: unknown section")
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc.message}") from None
    cfg = Config(home=home, name=name, templates=templates, **built)
    for tpl in templates.values():
        for n in LIMITS:
            own, cap = getattr(tpl, f"max_{n}"), getattr(cfg.spoke, f"cap_{n}")
            if cap and own > cap:
                raise InvalidArgument(f"{path}: templates.{tpl.name}.max_{n} = {own} exceeds "
                                      f"spoke.cap_{n} = {cap}")
    if cfg.wire.message_retention_seconds <= 2 * cfg.wire.max_clock_skew_seconds:
        raise InvalidArgument(
            f"{path}: wire.message_retention_seconds must exceed twice max_clock_skew_seconds"
        )
    return cfg


def default_config_text(name: str) -> str:
    """The commented config.toml that `fleetwire init` writes."""
    return f'''# Fleetwire instance configuration. Every key below shows its default.

[instance]
name = "{name}"

[wire]
# Envelopes whose issued_at differs from this clock by more are rejected.
max_clock_skew_seconds = 60
# How long message ids are remembered for replay and retry detection.
message_retention_seconds = 86400

[hub]
# Operator API (and `fleetwire join`) address of `fleetwire hub run` (port 0: any free
# port). Served with TLS whenever it is not a loopback address.
listen = "127.0.0.1:7400"
# Where spokes send status reports and heartbeats: mutual TLS with pinned certificates.
peer_listen = "127.0.0.1:7402"
# A spoke that sent no heartbeat for this long is shown OFFLINE and commands to it fail
# fast with UNAVAILABLE.
offline_after_seconds = 15

[spoke]
# Command API address of `fleetwire spoke run` (mutual TLS with pinned certificates).
listen = "127.0.0.1:7401"
workspaces_dir = "workspaces"
max_grace_seconds = 300
# Heartbeats to the hubs this spoke knows with an address (`peer add --address`).
heartbeat_seconds = 5
# Most agents running at once on this spoke, all tenants together (0: no limit).
max_agents = 0
# Caps for every agent's process tree that no template may exceed (0: none). A template
# sets its own with max_memory_mb, max_cpu_seconds, max_open_files, max_processes and
# max_log_mb. See the README for how each is enforced on this machine.
cap_memory_mb = 0
cap_cpu_seconds = 0
cap_open_files = 0
cap_processes = 0
cap_log_mb = 0
# Let the kernel enforce memory and process limits through cgroups where it can.
use_cgroups = true
pass_env = ["PATH", "LANG", "LC_ALL", "TZ"]

# Agent templates. argv items are passed as separate arguments, never through a shell.
# Placeholders: {{python}} {{task}} {{agent_id}} {{tenant}} {{workspace}} {{workdir}}
# and any declared in params (their values are defaults a spawn may override).
[templates.demo]
description = "Built-in demo agent: prints progress, exits 0 when done or on SIGTERM"
argv = ["{{python}}", "-m", "spoke.demo_agent", "--task", "{{task}}",
        "--steps", "{{steps}}", "--interval", "{{interval}}"]
params = {{ steps = "20", interval = "0.5" }}
grace_seconds = 5
max_runtime_seconds = 3600
# Most demo agents running at once in one workspace (0: no limit). A workspace can also
# have its own limit: `fleetwire workspace create --max-agents N`.
max_concurrent = 0
'''


def effective_limit(template: TemplateConfig, spoke: SpokeConfig, name: str) -> int:
    """A template's limit, or the spoke's cap when the template sets none (0: none)."""
    own, cap = getattr(template, f"max_{name}"), getattr(spoke, f"cap_{name}")
    return int(min(own, cap) if own and cap else own or cap)
