"""Instance configuration: config.toml read into frozen dataclasses.

Defaults are written down once, here. A bad file fails at start-up with the key and the
reason, never later in a request. Every setting can also be set by an environment
variable FLEETWIRE_<SECTION>_<KEY>, which wins over the file; templates are definitions,
not settings, and are read from the file only.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
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
    # Most agents of one tenant running at once on this spoke; 0: an equal share of
    # max_agents among the spoke's tenants (no limit when max_agents is 0).
    max_agents_per_tenant: int = 0
    # Caps no template may exceed, and the limits of templates that set none; 0: none.
    cap_memory_mb: int = 0
    cap_cpu_seconds: int = 0
    cap_open_files: int = 0
    cap_processes: int = 0
    cap_log_mb: int = 100
    cap_cpu_percent: int = 0
    # Use cgroups where this machine allows; false: the watchdog alone (see README).
    use_cgroups: bool = True
    # Environment variables agents inherit from the spoke; everything else is dropped.
    pass_env: tuple[str, ...] = ("PATH", "LANG", "LC_ALL", "TZ")
    # What agents get (README "What an agent can and cannot reach"): "auto" (the most
    # this machine allows), "full" (own uid and namespaces: needs root), "namespaces"
    # (user, PID and mount namespaces under the spoke's uid) or "none".
    isolation: str = "auto"
    # The uids (and gids) agents run under with isolation "full": unused by any user.
    agent_uid_base: int = 1879048192
    agent_uid_count: int = 65536
    # Host folders agents may read (read-only) although they lie in a hidden place.
    agent_paths: tuple[str, ...] = ()


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
    max_cpu_percent: int = 0
    env: dict[str, str] = field(default_factory=dict)
    # The least isolation a spoke must give this template's agents ("": any).
    isolation: str = ""
    # "none": a network namespace of its own with only loopback.
    network: str = "host"
    # Keep what the agent's first process leaves running when it exits (still killed
    # with the agent); by default it is ended with it.
    keep_descendants: bool = False


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
    # Where each setting came from, by "section.key": "default", "file" or the name of
    # the FLEETWIRE_ variable that set it.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

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
    _one_of(f"{where}.isolation", tpl.isolation, ("", *ISOLATION_LEVELS))
    _one_of(f"{where}.network", tpl.network, NETWORKS)
    return tpl


def _one_of(label: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        shown = ", ".join(f'"{a}"' for a in allowed if a)
        raise InvalidArgument(f"{label}: {value!r} is not one of {shown}")


# Limits where 0 means "no limit".
_ZERO_IS_UNLIMITED = frozenset({"max_agents", "max_agents_per_tenant", "cap_memory_mb",
                                "cap_cpu_seconds", "cap_open_files", "cap_processes",
                                "cap_log_mb", "cap_cpu_percent"})
LIMITS = ("memory_mb", "cpu_seconds", "open_files", "processes", "log_mb", "cpu_percent")
ISOLATION_LEVELS = ("none", "namespaces", "full")
SPOKE_ISOLATION = ("auto", *ISOLATION_LEVELS)
NETWORKS = ("host", "none")


def _check_positive(sections: dict[str, Any], label: Callable[[str, str], str]) -> None:
    """Durations, counts and sizes must be positive: a zero skew would refuse everything."""
    for section, value in sections.items():
        for f in fields(value):
            v = getattr(value, f.name)
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if f.name in _ZERO_IS_UNLIMITED:
                if v < 0:
                    raise InvalidArgument(f"{label(section, f.name)}: must be 0 (no limit) "
                                          "or more")
            elif v <= 0:
                raise InvalidArgument(f"{label(section, f.name)}: must be greater than 0")


SECTIONS: dict[str, type[Any]] = {
    "wire": WireConfig, "retry": RetryConfig, "keepalive": KeepAliveConfig,
    "hub": HubConfig, "spoke": SpokeConfig, "database": DatabaseConfig,
}
# Every setting and its type, by section; [instance] is the name alone.
SETTINGS: dict[str, dict[str, type[Any]]] = {
    "instance": {"name": str},
    **{section: {f.name: type(f.default) for f in fields(cls)}
       for section, cls in SECTIONS.items()},
}
ENV_PREFIX = "FLEETWIRE_"
# Variables under a section's prefix that are not settings but the CLI's own options.
# FLEETWIRE_HOME, FLEETWIRE_HUB, FLEETWIRE_TOKEN and the like need no entry: no
# section's prefix (FLEETWIRE_HUB_, ...) covers them.
NOT_SETTINGS = frozenset({"FLEETWIRE_HUB_CA"})
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def env_var(section: str, key: str) -> str:
    """The environment variable of a setting: FLEETWIRE_HUB_LISTEN for hub.listen."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _from_env(var: str, kind: type[Any], raw: str) -> Any:
    """A variable's text as its setting's type (a list as the file's TOML would give)."""
    if kind is tuple:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        problem = "must be true or false (or 1/0, yes/no)"
    elif kind is int:
        try:
            return int(raw)
        except ValueError:
            problem = "must be a whole number"
    elif kind is float:
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
        problem = "must be a number"
    else:
        return raw
    raise InvalidArgument(f"{var}: {problem}, not {raw!r}; correct it or unset it")


def _env_settings(environ: Mapping[str, str]) -> dict[str, dict[str, tuple[str, Any]]]:
    """The settings FLEETWIRE_<SECTION>_<KEY> variables set: section -> key -> (variable,
    value). A variable under a section's prefix that names no setting is refused, so a
    typo cannot leave a default silently in force."""
    found: dict[str, dict[str, tuple[str, Any]]] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in NOT_SETTINGS:
            continue
        if var.startswith(env_var("templates", "")):
            raise InvalidArgument(f"{var}: templates are read from config.toml only; define "
                                  "the template in a [templates.NAME] table and unset it")
        section = next((s for s in SETTINGS if var.startswith(env_var(s, ""))), None)
        if section is None:
            continue
        key = var.removeprefix(env_var(section, "")).lower()
        kind = SETTINGS[section].get(key)
        if kind is None or var != env_var(section, key):
            names = [env_var(section, k) for k in SETTINGS[section]]
            close = difflib.get_close_matches(var, names, n=1)
            raise InvalidArgument(
                f"{var}: no such setting" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; the [{section}] settings are {', '.join(names)}; rename or unset it")
        found.setdefault(section, {})[key] = (var, _from_env(var, kind, raw))
    return found


def _apply_env(data: dict[str, Any], instance: dict[str, Any],
               environ: Mapping[str, str]) -> dict[str, str]:
    """Put the environment's settings over the file's tables (so the same checks apply
    to both) and say where each setting comes from."""
    overrides = _env_settings(environ)
    sources: dict[str, str] = {}
    for section, kinds in SETTINGS.items():
        table = instance if section == "instance" else data.get(section, {})
        if not isinstance(table, dict):
            continue  # refused as "[section] must be a table" when it is built
        set_here = overrides.get(section, {})
        for key in kinds:
            sources[f"{section}.{key}"] = (set_here[key][0] if key in set_here
                                           else "file" if key in table else "default")
        if set_here:
            table.update({key: value for key, (_, value) in set_here.items()})
            if section != "instance":
                data[section] = table
    return sources


def load_config(home: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read <home>/config.toml and the FLEETWIRE_<SECTION>_<KEY> variables of environ
    (default: os.environ), which win over the file; raise InvalidArgument naming the bad
    key or variable."""
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
        sources = _apply_env(data, instance, os.environ if environ is None else environ)

        def label(section: str, key: str) -> str:
            """How a complaint names a setting: its variable if the environment set it."""
            source = sources.get(f"{section}.{key}", "")
            return source if source.startswith(ENV_PREFIX) else f"{section}.{key}"

        name = instance.get("name")
        if not isinstance(name, str):
            raise InvalidArgument("instance.name: required string")
        check_name(label("instance", "name"), name)
        built: dict[str, Any] = {}
        for key, cls in SECTIONS.items():
            if key in data:
                built[key] = _table(cls, data.pop(key), key)
        raw_templates = data.pop("templates", {})
        if not isinstance(raw_templates, dict):
            raise InvalidArgument("[templates] must be a table of [templates.NAME] tables")
        templates = {n: _template(n, t) for n, t in raw_templates.items()}
        _check_positive(built, label)
        spoke = built.get("spoke", SpokeConfig())
        _one_of(label("spoke", "isolation"), spoke.isolation, SPOKE_ISOLATION)
        for path in spoke.agent_paths:
            if not path.startswith("/"):
                raise InvalidArgument(f"{label('spoke', 'agent_paths')}: {path!r} is not an "
                                      "absolute path")
        if data:
            raise InvalidArgument(f"{', '.join(sorted(data))}: unknown section")
        cfg = Config(home=home, name=name, templates=templates, sources=sources, **built)
        for tpl in templates.values():
            for n in LIMITS:
                own, cap = getattr(tpl, f"max_{n}"), getattr(cfg.spoke, f"cap_{n}")
                if cap and own > cap:
                    raise InvalidArgument(f"templates.{tpl.name}.max_{n} = {own} exceeds "
                                          f"{label('spoke', f'cap_{n}')} = {cap}")
        if cfg.wire.message_retention_seconds <= 2 * cfg.wire.max_clock_skew_seconds:
            raise InvalidArgument(
                f"{label('wire', 'message_retention_seconds')} must exceed twice "
                f"{label('wire', 'max_clock_skew_seconds')}")
    except InvalidArgument as exc:
        # A complaint about a variable is not about the file; anything else names it.
        where = "" if exc.message.startswith(ENV_PREFIX) else f"{path}: "
        raise InvalidArgument(f"{where}{exc.message}") from None
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
# Most agents of one tenant at once; 0: an equal share of max_agents among this spoke's
# tenants, so one tenant cannot take every place (set it to max_agents to allow that).
max_agents_per_tenant = 0
# Caps for every agent's process tree that no template may exceed (0: none). A template
# sets its own with max_memory_mb, max_cpu_seconds, max_open_files, max_processes,
# max_log_mb and max_cpu_percent (100: one core). See the README for how each is
# enforced on this machine.
cap_memory_mb = 0
cap_cpu_seconds = 0
cap_open_files = 0
cap_processes = 0
# Each agent's log keeps its newest output, at most this many MiB in two files.
cap_log_mb = 100
cap_cpu_percent = 0
# Let the kernel enforce memory and process limits through cgroups where it can.
use_cgroups = true
pass_env = ["PATH", "LANG", "LC_ALL", "TZ"]
# What agents can reach (README: "What an agent can and cannot reach"): "auto" gives the
# most this machine allows: "full" as root (each agent its own uid, PID and mount
# namespaces), else "namespaces" (a user namespace under the spoke's uid). "none" runs
# agents as plain processes of the spoke's user, and is never chosen unless set here.
isolation = "auto"
# The uids and gids agents get with "full": a range no user of this machine has.
agent_uid_base = 1879048192
agent_uid_count = 65536
# Folders agents may read although they lie where agents see nothing (/home, /root,
# /tmp, /run/user): say, where a template's program is installed.
agent_paths = []

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


MASK = "***"
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
# The password as SQLAlchemy's make_url reads it: after the user's ':', up to the '@'.
_URL_PASSWORD_RE = re.compile(r"^([\w+]+://[^:/]*):[^@]*@")
_URL_QUERY_RE = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")


def looks_secret(name: str) -> bool:
    """Whether a variable or parameter name suggests a secret value (TOKEN, KEY, ...)."""
    return any(word in name.upper() for word in _SECRET_WORDS)


def mask_url(url: str) -> str:
    """A database URL with its password and secret-looking query values shown as ***."""
    masked = _URL_PASSWORD_RE.sub(lambda m: f"{m[1]}:{MASK}@", url, count=1)
    return _URL_QUERY_RE.sub(
        lambda m: f"{m[1]}{m[2]}={MASK}" if looks_secret(m[2]) else m[0], masked)


def config_report(cfg: Config) -> dict[str, Any]:
    """What `fleetwire config show` prints: every setting's value and source, and the
    templates, with secrets masked."""
    report: dict[str, Any] = {"home": str(cfg.home)}
    for section, kinds in SETTINGS.items():
        values = {"name": cfg.name} if section == "instance" else asdict(getattr(cfg, section))
        report[section] = {
            key: {"value": _plain(mask_url(values[key]) if (section, key) == ("database", "url")
                                  else values[key]),
                  "source": cfg.sources.get(f"{section}.{key}", "default")}
            for key in kinds}
    report["templates"] = {
        name: {key: _plain(value) for key, value in asdict(tpl).items() if key != "name"}
        | {"env": {k: MASK if looks_secret(k) else v for k, v in tpl.env.items()}}
        for name, tpl in cfg.templates.items()}
    return report


def _plain(value: Any) -> Any:
    """Tuples as lists, so the text and the JSON show the same thing."""
    return list(value) if isinstance(value, tuple) else value


def config_report_text(report: dict[str, Any]) -> str:
    """A config_report as TOML-like text: a value not from the file says where it is from."""
    lines = [f"# {report['home']}: config.toml, then FLEETWIRE_<SECTION>_<KEY> variables"]
    for section in SETTINGS:
        lines += ["", f"[{section}]"]
        for key, item in report[section].items():
            source = item["source"]
            note = ("" if source == "file" else f"  # from {source}"
                    if source.startswith(ENV_PREFIX) else f"  # {source}")
            lines.append(f"{key} = {_toml_value(item['value'])}{note}")
    for name, tpl in report["templates"].items():
        lines += ["", f"[templates.{_toml_key(name)}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in tpl.items()]
    if not report["templates"]:
        lines += ["", "# no templates"]
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    return json.dumps(str(value), ensure_ascii=False)


def effective_limit(template: TemplateConfig, spoke: SpokeConfig, name: str) -> int:
    """A template's limit, or the spoke's cap when the template sets none (0: none)."""
    own, cap = getattr(template, f"max_{name}"), getattr(spoke, f"cap_{name}")
    return int(min(own, cap) if own and cap else own or cap)
