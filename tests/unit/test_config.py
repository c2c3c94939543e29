"""load_config and the slug/name rules: a bad file or FLEETWIRE_ variable fails naming
the key or the variable; `fleetwire config show` masks secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import (
    BUILTIN_PLACEHOLDERS,
    NOT_SETTINGS,
    SETTINGS,
    Config,
    TemplateConfig,
    check_name,
    check_slug,
    config_report,
    config_report_text,
    default_config_text,
    env_var,
    load_config,
    mask_url,
)
from shared.errors import InvalidArgument


def write(home: Path, text: str) -> Path:
    (home / "config.toml").write_text(text)
    return home


def load_text(home: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    # Never the developer's environment: a stray FLEETWIRE_ variable would change results.
    return load_config(write(home, text), environ or {})


def refused(home: Path, text: str) -> str:
    """The message of the InvalidArgument that load_config raises for text."""
    with pytest.raises(InvalidArgument) as exc:
        load_text(home, text)
    msg = exc.value.message
    assert str(home / "config.toml") in msg  # every complaint names the file
    return msg


MINIMAL = '[instance]\nname = "node-1"\n'


# ---------------------------------------------------------------- the default file


def test_default_config_text_loads(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, default_config_text("spoke-a"))
    assert cfg.name == "spoke-a"
    assert cfg.home == tmp_path
    assert cfg.wire.max_clock_skew_seconds == 60
    assert cfg.wire.message_retention_seconds == 86400
    assert cfg.hub.listen == "127.0.0.1:7400"
    assert cfg.spoke.listen == "127.0.0.1:7401"
    assert cfg.spoke.pass_env == ("PATH", "LANG", "LC_ALL", "TZ")
    assert list(cfg.templates) == ["demo"]
    demo = cfg.templates["demo"]
    assert isinstance(demo, TemplateConfig)
    assert demo.name == "demo"
    assert demo.argv == ("{python}", "-m", "spoke.demo_agent", "--task", "{task}",
                         "--steps", "{steps}", "--interval", "{interval}")
    assert demo.params == {"steps": "20", "interval": "0.5"}
    # An integer in TOML becomes the float the dataclass declares.
    assert demo.grace_seconds == 5.0 and isinstance(demo.grace_seconds, float)
    assert demo.max_runtime_seconds == 3600.0


def test_default_config_matches_dataclass_defaults(tmp_path: Path) -> None:
    """The commented file and the code's defaults say the same thing."""
    cfg = load_text(tmp_path, default_config_text("n"))
    bare = load_text(tmp_path, '[instance]\nname = "n"\n')
    for section in ("wire", "retry", "keepalive", "hub", "spoke", "database"):
        assert getattr(cfg, section) == getattr(bare, section), section


def test_minimal_config_and_derived_paths(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.name == "node-1"
    assert cfg.templates == {}
    assert cfg.key_path == tmp_path / "identity.key"
    assert cfg.db_url == f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    assert cfg.workspaces_root == tmp_path / "workspaces"


def test_explicit_database_url_wins(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL + '[database]\nurl = "postgresql+asyncpg://x/y"\n')
    assert cfg.db_url == "postgresql+asyncpg://x/y"


def test_int_accepted_for_float_key(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL + "[retry]\nattempt_timeout_seconds = 3\n")
    assert cfg.retry.attempt_timeout_seconds == 3.0
    assert isinstance(cfg.retry.attempt_timeout_seconds, float)


# ---------------------------------------------------------------- refusals


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_config(tmp_path)


def test_bad_toml(tmp_path: Path) -> None:
    msg = refused(tmp_path, '[instance\nname = "x"\n')
    assert "not valid TOML" in msg


@pytest.mark.parametrize(("text", "key"), [
    (MINIMAL + "[wire]\nmax_clock_skew = 5\n", "wire.max_clock_skew"),
    (MINIMAL + "[spoke]\nlisten_addr = \"x\"\n", "spoke.listen_addr"),
    (MINIMAL + "[templates.t]\nargv = [\"a\"]\ntimeout = 3\n", "templates.t.timeout"),
    # `name` is supplied from the table name, not settable in the table.
    (MINIMAL + "[templates.t]\nargv = [\"a\"]\nname = \"u\"\n", "templates.t.name"),
])
def test_unknown_key(tmp_path: Path, text: str, key: str) -> None:
    msg = refused(tmp_path, text)
    assert f"{key}: unknown key" in msg


@pytest.mark.parametrize(("text", "key", "expected"), [
    (MINIMAL + '[wire]\nmax_clock_skew_seconds = "60"\n', "wire.max_clock_skew_seconds", "int"),
    (MINIMAL + "[retry]\nattempts = 1.5\n", "retry.attempts", "int"),
    (MINIMAL + '[retry]\ninitial_backoff_seconds = "1"\n', "retry.initial_backoff_seconds",
     "float"),
    (MINIMAL + "[retry]\nmax_backoff_seconds = true\n", "retry.max_backoff_seconds", "float"),
    (MINIMAL + "[hub]\nlisten = 7400\n", "hub.listen", "str"),
    (MINIMAL + "[templates.t]\nargv = [\"a\"]\ndescription = 1\n", "templates.t.description",
     "str"),
])
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    msg = refused(tmp_path, text)
    assert f"{key}: must be {expected}" in msg


@pytest.mark.parametrize("value", ['"PATH"', "[1, 2]", '["PATH", 3]'])
def test_pass_env_must_be_list_of_strings(tmp_path: Path, value: str) -> None:
    msg = refused(tmp_path, MINIMAL + f"[spoke]\npass_env = {value}\n")
    assert "spoke.pass_env: must be a list of strings" in msg


def test_section_must_be_table(tmp_path: Path) -> None:
    msg = refused(tmp_path, 'wire = 5\n' + MINIMAL)
    assert "[wire] must be a table" in msg


@pytest.mark.parametrize("text", [
    "",
    "[instance]\n",
    "[instance]\nname = 5\n",
    '[wire]\nmax_clock_skew_seconds = 60\n',
])
def test_missing_instance_name(tmp_path: Path, text: str) -> None:
    msg = refused(tmp_path, text)
    assert "instance.name" in msg


def test_instance_must_be_table(tmp_path: Path) -> None:
    assert "[instance] must be a table" in refused(tmp_path, 'instance = "node-1"\n')


def test_invalid_instance_name(tmp_path: Path) -> None:
    msg = refused(tmp_path, '[instance]\nname = "bad name"\n')
    assert "instance.name 'bad name' is not a valid name" in msg


def test_unknown_section(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + "[bogus]\nx = 1\n[also]\ny = 2\n")
    assert "also, bogus: unknown section" in msg


def test_placeholder_neither_builtin_nor_declared(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + '[templates.t]\nargv = ["run", "--x={nope}"]\n'
                  'params = { steps = "1" }\n')
    assert "templates.t.argv" in msg
    assert "{nope}" in msg
    for builtin in BUILTIN_PLACEHOLDERS:
        assert builtin in msg


def test_declared_and_builtin_placeholders_accepted(tmp_path: Path) -> None:
    argv = ", ".join(f'"{{{b}}}"' for b in sorted(BUILTIN_PLACEHOLDERS))
    cfg = load_text(tmp_path, MINIMAL + f'[templates.t]\nargv = [{argv}, "--n={{n}}"]\n'
                    'params = { n = "3" }\nenv = { MODE = "fast" }\n')
    t = cfg.templates["t"]
    assert t.argv[-1] == "--n={n}"
    assert t.params == {"n": "3"}
    assert t.env == {"MODE": "fast"}


@pytest.mark.parametrize(("body", "needle"), [
    ("argv = []\n", "templates.t.argv: must be a non-empty list of strings"),
    ('argv = "run"\n', "templates.t.argv: must be a non-empty list of strings"),
    ("description = \"no argv\"\n", "templates.t.argv: must be a non-empty list of strings"),
    ('argv = ["a"]\nparams = { n = 3 }\n', "templates.t.params: must be a table of strings"),
    ('argv = ["a"]\nenv = ["A=1"]\n', "templates.t.env: must be a table of strings"),
    ('argv = ["a"]\ngrace_seconds = -1\n', "grace_seconds must be >= 0"),
    ('argv = ["a"]\nmax_runtime_seconds = 0\n', "max_runtime_seconds must be > 0"),
])
def test_template_refusals(tmp_path: Path, body: str, needle: str) -> None:
    msg = refused(tmp_path, MINIMAL + "[templates.t]\n" + body)
    assert needle in msg


def test_template_name_must_be_valid(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + '[templates."bad name"]\nargv = ["a"]\n')
    assert "template 'bad name' is not a valid name" in msg


def test_retention_must_exceed_twice_skew(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + "[wire]\nmax_clock_skew_seconds = 60\n"
                  "message_retention_seconds = 120\n")
    assert "wire.message_retention_seconds" in msg
    cfg = load_text(tmp_path, MINIMAL + "[wire]\nmax_clock_skew_seconds = 60\n"
                    "message_retention_seconds = 121\n")
    assert cfg.wire.message_retention_seconds == 121


# ---------------------------------------------------------------- slugs and names


@pytest.mark.parametrize("value", ["a", "acme", "acme-2", "0day", "a" * 63])
def test_check_slug_accepts(value: str) -> None:
    assert check_slug("tenant", value) == value


@pytest.mark.parametrize("value", [
    "", "-acme", "Acme", "ac_me", "ac.me", "ac me", "a" * 64, "acme/..", "../x", "ümlaut",
    "acme\0",
])
def test_check_slug_refuses(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_slug("tenant", value)
    assert exc.value.message.startswith(f"tenant '{value}' is not a valid slug")


@pytest.mark.parametrize("value", ["a", "Hub-1", "spoke_2.eu", "0", "x" * 63])
def test_check_name_accepts(value: str) -> None:
    assert check_name("instance", value) == value


@pytest.mark.parametrize("value", [
    "", ".hidden", "-x", "_x", "a b", "a/b", "x" * 64, "naïve", "a:b",
])
def test_check_name_refuses(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_name("principal", value)
    assert exc.value.message.startswith(f"principal '{value}' is not a valid name")


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("check", [check_slug, check_name])
def test_trailing_newline_refused(check) -> None:
    with pytest.raises(InvalidArgument):
        check("tenant", "acme\n")


def test_unknown_instance_key_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + "nmae = 'typo'\n")
    assert "instance.nmae" in msg


def test_templates_must_be_table(tmp_path: Path) -> None:
    refused(tmp_path, 'templates = "demo"\n' + MINIMAL)


def test_bool_refused_for_int_key(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + "[wire]\nmax_clock_skew_seconds = true\n")
    assert "wire.max_clock_skew_seconds: must be int" in msg


def test_negative_duration_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + "[wire]\nmax_clock_skew_seconds = -5\n")
    assert "wire.max_clock_skew_seconds: must be greater than 0" in msg


def test_param_shadowing_builtin_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL + '[templates.t]\nargv = ["x"]\nparams = { task = "a" }\n')
    assert "templates.t.params: task is a built-in placeholder" in msg


# ---------------------------------------------------------------- environment variables


def env_refused(home: Path, environ: dict[str, str], text: str = MINIMAL) -> str:
    """The message of the InvalidArgument that load_config raises for environ."""
    with pytest.raises(InvalidArgument) as exc:
        load_text(home, text, environ)
    return exc.value.message


@pytest.mark.parametrize(("var", "raw", "setting", "expected"), [
    ("FLEETWIRE_HUB_LISTEN", "0.0.0.0:7400", "hub.listen", "0.0.0.0:7400"),
    ("FLEETWIRE_HUB_PEER_LISTEN", "10.0.0.1:7402", "hub.peer_listen", "10.0.0.1:7402"),
    ("FLEETWIRE_DATABASE_URL", "postgresql+asyncpg://u:pw@h/db", "database.url",
     "postgresql+asyncpg://u:pw@h/db"),
    ("FLEETWIRE_INSTANCE_NAME", "node-2", "instance.name", "node-2"),
    ("FLEETWIRE_WIRE_MAX_CLOCK_SKEW_SECONDS", "30", "wire.max_clock_skew_seconds", 30),
    ("FLEETWIRE_KEEPALIVE_INTERVAL_MS", " 20000 ", "keepalive.interval_ms", 20000),
    ("FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS", "2.5", "hub.offline_after_seconds", 2.5),
    ("FLEETWIRE_RETRY_ATTEMPT_TIMEOUT_SECONDS", "7", "retry.attempt_timeout_seconds", 7.0),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "false", "spoke.use_cgroups", False),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "0", "spoke.use_cgroups", False),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "No", "spoke.use_cgroups", False),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "yes", "spoke.use_cgroups", True),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "1", "spoke.use_cgroups", True),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "TRUE", "spoke.use_cgroups", True),
    ("FLEETWIRE_SPOKE_PASS_ENV", "PATH, HOME,,LANG,", "spoke.pass_env",
     ("PATH", "HOME", "LANG")),
    ("FLEETWIRE_SPOKE_PASS_ENV", "", "spoke.pass_env", ()),
])
def test_env_sets_each_type(tmp_path: Path, var: str, raw: str, setting: str,
                            expected: object) -> None:
    section, key = setting.split(".")
    cfg = load_text(tmp_path, MINIMAL, {var: raw})
    value = cfg.name if section == "instance" else getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)
    assert cfg.sources[setting] == var


def test_env_beats_file_and_sources_are_recorded(tmp_path: Path) -> None:
    text = MINIMAL + '[hub]\nlisten = "127.0.0.1:9000"\noffline_after_seconds = 20\n'
    cfg = load_text(tmp_path, text, {"FLEETWIRE_HUB_LISTEN": "127.0.0.1:9100"})
    assert cfg.hub.listen == "127.0.0.1:9100"
    assert cfg.hub.offline_after_seconds == 20.0
    assert cfg.sources["hub.listen"] == "FLEETWIRE_HUB_LISTEN"
    assert cfg.sources["hub.offline_after_seconds"] == "file"
    assert cfg.sources["hub.peer_listen"] == "default"
    assert cfg.sources["instance.name"] == "file"
    # Every setting has a source.
    assert set(cfg.sources) == {f"{s}.{k}" for s, keys in SETTINGS.items() for k in keys}


def test_env_supplies_instance_name_missing_from_file(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[wire]\nmax_clock_skew_seconds = 60\n",
                    {"FLEETWIRE_INSTANCE_NAME": "from-env"})
    assert cfg.name == "from-env"


def test_default_environ_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("FLEETWIRE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("FLEETWIRE_SPOKE_LISTEN", "127.0.0.1:9401")
    assert load_config(write(tmp_path, MINIMAL)).spoke.listen == "127.0.0.1:9401"


def test_every_setting_has_its_own_variable() -> None:
    names = [env_var(s, k) for s, keys in SETTINGS.items() for k in keys]
    assert len(set(names)) == len(names)
    assert not NOT_SETTINGS & set(names)
    assert "FLEETWIRE_WIRE_MAX_CLOCK_SKEW_SECONDS" in names


@pytest.mark.parametrize(("var", "raw", "needle"), [
    ("FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS", "abc", "must be a number, not 'abc'"),
    ("FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS", "nan", "must be a number, not 'nan'"),
    ("FLEETWIRE_WIRE_MAX_CLOCK_SKEW_SECONDS", "1.5", "must be a whole number, not '1.5'"),
    ("FLEETWIRE_RETRY_ATTEMPTS", "", "must be a whole number, not ''"),
    ("FLEETWIRE_SPOKE_USE_CGROUPS", "maybe", "must be true or false"),
    # The same checks as the file's.
    ("FLEETWIRE_WIRE_MAX_CLOCK_SKEW_SECONDS", "0", "must be greater than 0"),
    ("FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS", "-1", "must be greater than 0"),
    ("FLEETWIRE_SPOKE_MAX_AGENTS", "-1", "must be 0 (no limit) or more"),
    ("FLEETWIRE_INSTANCE_NAME", "bad name", "'bad name' is not a valid name"),
])
def test_bad_env_value_refused_naming_the_variable(tmp_path: Path, var: str, raw: str,
                                                   needle: str) -> None:
    msg = env_refused(tmp_path, {var: raw})
    assert msg.startswith(f"{var}") and needle in msg
    # The file is not to blame.
    assert "config.toml" not in msg


def test_bad_env_value_says_what_to_do(tmp_path: Path) -> None:
    msg = env_refused(tmp_path, {"FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS": "abc"})
    assert msg == ("FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS: must be a number, not 'abc'; "
                   "correct it or unset it")


def test_env_checked_against_file_values(tmp_path: Path) -> None:
    msg = env_refused(tmp_path, {"FLEETWIRE_WIRE_MAX_CLOCK_SKEW_SECONDS": "50000"})
    assert ("wire.message_retention_seconds must exceed twice "
            "FLEETWIRE_WIRE_MAX_CLOCK_SKEW_SECONDS") in msg
    msg = env_refused(tmp_path, {"FLEETWIRE_SPOKE_CAP_MEMORY_MB": "100"},
                      MINIMAL + '[templates.t]\nargv = ["a"]\nmax_memory_mb = 200\n')
    assert "templates.t.max_memory_mb = 200 exceeds FLEETWIRE_SPOKE_CAP_MEMORY_MB = 100" in msg


@pytest.mark.parametrize(("var", "needle"), [
    ("FLEETWIRE_HUB_LISTN", "did you mean FLEETWIRE_HUB_LISTEN?"),
    ("FLEETWIRE_SPOKE_USE_CGROUP", "did you mean FLEETWIRE_SPOKE_USE_CGROUPS?"),
    ("FLEETWIRE_HUB_listen", "did you mean FLEETWIRE_HUB_LISTEN?"),
    ("FLEETWIRE_DATABASE_URI", "FLEETWIRE_DATABASE_URL"),
    ("FLEETWIRE_INSTANCE_NAMES", "FLEETWIRE_INSTANCE_NAME"),
])
def test_unknown_variable_refused(tmp_path: Path, var: str, needle: str) -> None:
    msg = env_refused(tmp_path, {var: "x"})
    assert msg.startswith(f"{var}: no such setting") and needle in msg
    assert "rename or unset it" in msg


def test_template_variables_refused(tmp_path: Path) -> None:
    msg = env_refused(tmp_path, {"FLEETWIRE_TEMPLATES_DEMO_ARGV": "x"})
    assert "FLEETWIRE_TEMPLATES_DEMO_ARGV: templates are read from config.toml only" in msg


def test_cli_and_agent_variables_ignored(tmp_path: Path) -> None:
    """Variables that are not settings: the CLI's options, the agents' markers, others'."""
    environ = {"FLEETWIRE_HOME": "/x", "FLEETWIRE_HUB": "h:1", "FLEETWIRE_TOKEN": "fwt_x",
               "FLEETWIRE_HUB_CA": "sha256:ab", "FLEETWIRE_LOG_FORMAT": "json",
               "FLEETWIRE_METRICS": "127.0.0.1:9100", "FLEETWIRE_SPOKE": "spoke-a",
               "FLEETWIRE_AGENT_ID": "a" * 32, "FLEETWIRE_TENANT": "acme",
               "FLEETWIRE_WORKSPACE": "w", "FLEETWIRE_TASK": "t", "HUB_LISTEN": "x",
               # Not under a section's prefix, which is upper case like every name here.
               "FLEETWIRE_hub_listen": "x"}
    cfg = load_text(tmp_path, MINIMAL, environ)
    assert cfg.hub == load_text(tmp_path, MINIMAL).hub
    assert set(cfg.sources.values()) == {"default", "file"}


# ---------------------------------------------------------------- config show


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+asyncpg://fleet:secret@db:5432/fleet",
     "postgresql+asyncpg://fleet:***@db:5432/fleet"),
    ("postgresql+asyncpg://fleet@db:5432/fleet", "postgresql+asyncpg://fleet@db:5432/fleet"),
    ("postgresql+asyncpg://db/fleet", "postgresql+asyncpg://db/fleet"),
    ("postgresql+asyncpg://:secret@db/fleet", "postgresql+asyncpg://:***@db/fleet"),
    # SQLAlchemy reads the password up to the '@', '/' and '?' included.
    ("postgresql+asyncpg://u:se/cr?et@db/fleet", "postgresql+asyncpg://u:***@db/fleet"),
    ("postgresql+asyncpg://db/fleet?user=u&password=secret&ssl=require",
     "postgresql+asyncpg://db/fleet?user=u&password=***&ssl=require"),
    ("postgresql+asyncpg://u:pw@db/fleet?PASSWORD=secret",
     "postgresql+asyncpg://u:***@db/fleet?PASSWORD=***"),
    ("sqlite+aiosqlite:////var/lib/fleetwire/state.db",
     "sqlite+aiosqlite:////var/lib/fleetwire/state.db"),
    ("", ""),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_config_report_masks_and_names_sources(tmp_path: Path) -> None:
    text = MINIMAL + ('[templates.t]\nargv = ["a"]\nenv = { API_TOKEN = "t0k", '
                      'db_password = "pw1", Signing_Key = "k3y", MODE = "fast" }\n')
    cfg = load_text(tmp_path, text, {"FLEETWIRE_DATABASE_URL": "postgresql://u:pw0@h/db",
                                     "FLEETWIRE_SPOKE_PASS_ENV": "PATH"})
    report = config_report(cfg)
    assert report["database"]["url"] == {"value": "postgresql://u:***@h/db",
                                         "source": "FLEETWIRE_DATABASE_URL"}
    assert report["spoke"]["pass_env"] == {"value": ["PATH"],
                                           "source": "FLEETWIRE_SPOKE_PASS_ENV"}
    assert report["instance"]["name"] == {"value": "node-1", "source": "file"}
    assert report["hub"]["listen"]["source"] == "default"
    assert report["templates"]["t"]["env"] == {"API_TOKEN": "***", "db_password": "***",
                                               "Signing_Key": "***", "MODE": "fast"}
    assert report["templates"]["t"]["argv"] == ["a"]
    shown = config_report_text(report) + json.dumps(report)
    for secret in ("pw0", "t0k", "pw1", "k3y"):
        assert secret not in shown
    lines = config_report_text(report).splitlines()
    assert 'url = "postgresql://u:***@h/db"  # from FLEETWIRE_DATABASE_URL' in lines
    assert 'listen = "127.0.0.1:7400"  # default' in lines
    assert 'name = "node-1"' in lines
    assert "use_cgroups = true  # default" in lines
    assert "[templates.t]" in lines
    assert 'env = { API_TOKEN = "***", db_password = "***", Signing_Key = "***", ' \
           'MODE = "fast" }' in lines


FLEETWIRE = Path(sys.executable).with_name("fleetwire")


def run_fleetwire(*args: str, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
    """The installed console script, with none of the caller's FLEETWIRE_ variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
    return subprocess.run([str(FLEETWIRE), *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("cli") / "x"
    made = run_fleetwire("init", "--home", str(home), "--name", "x")
    assert made.returncode == 0, made.stderr
    return home


def test_cli_config_show_masks_the_password(instance: Path) -> None:
    env = {"FLEETWIRE_DATABASE_URL": "postgresql+asyncpg://u:pw@h/db"}
    text = run_fleetwire("config", "show", "--home", str(instance), env=env)
    as_json = run_fleetwire("config", "show", "--home", str(instance), "--json", env=env)
    for shown in (text, as_json):
        assert shown.returncode == 0, shown.stderr
        assert "pw" not in (shown.stdout + shown.stderr).replace(str(instance), "")
        assert "postgresql+asyncpg://u:***@h/db" in shown.stdout
    assert "# from FLEETWIRE_DATABASE_URL" in text.stdout
    assert "[templates.demo]" in text.stdout
    report = json.loads(as_json.stdout)
    assert report["database"]["url"]["source"] == "FLEETWIRE_DATABASE_URL"
    assert report["instance"]["name"] == {"value": "x", "source": "file"}
    assert "demo" in report["templates"]


def test_cli_bad_variable_exits_2_with_the_message(instance: Path) -> None:
    shown = run_fleetwire("config", "show", "--home", str(instance),
                          env={"FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS": "abc"})
    assert shown.returncode == 2
    assert shown.stderr.strip() == ("error: FLEETWIRE_HUB_OFFLINE_AFTER_SECONDS: must be a "
                                    "number, not 'abc'; correct it or unset it")
    typo = run_fleetwire("config", "show", "--home", str(instance),
                         env={"FLEETWIRE_HUB_LISTN": "0.0.0.0:7400"})
    assert typo.returncode == 2 and "FLEETWIRE_HUB_LISTN: no such setting" in typo.stderr


def test_cli_init_with_bad_variable_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "y"
    made = run_fleetwire("init", "--home", str(home), "--name", "y",
                         env={"FLEETWIRE_SPOKE_USE_CGROUPS": "maybe"})
    assert made.returncode == 2 and "FLEETWIRE_SPOKE_USE_CGROUPS" in made.stderr
    assert not (home / "config.toml").exists() and not (home / "identity.key").exists()
