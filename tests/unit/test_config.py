"""load_config and the slug/name rules: a bad file fails naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import (
    BUILTIN_PLACEHOLDERS,
    Config,
    TemplateConfig,
    check_name,
    check_slug,
    default_config_text,
    load_config,
)
from shared.errors import InvalidArgument


def write(home: Path, text: str) -> Path:
    (home / "config.toml").write_text(text)
    return home


def load_text(home: Path, text: str) -> Config:
    return load_config(write(home, text))


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
