"""render_argv: one argv item per template item, values never split or interpreted."""

from __future__ import annotations

import pytest

from shared.config import TemplateConfig
from shared.errors import InvalidArgument
from spoke.templates import MAX_PARAM_CHARS, check_text, render_argv

BUILTINS = {
    "python": "/usr/bin/python3",
    "task": "do the thing",
    "agent_id": "a" * 32,
    "tenant": "acme",
    "workspace": "ws",
    "workdir": "/srv/fleet/acme/ws/aaaa",
}


def template(**kw) -> TemplateConfig:
    kw.setdefault("name", "demo")
    kw.setdefault("argv", ("{python}", "-m", "agent", "--task", "{task}",
                           "--steps", "{steps}", "--interval={interval}"))
    kw.setdefault("params", {"steps": "20", "interval": "0.5"})
    return TemplateConfig(**kw)


def test_defaults_used_when_not_given() -> None:
    argv = render_argv(template(), {}, BUILTINS)
    assert argv == ["/usr/bin/python3", "-m", "agent", "--task", "do the thing",
                    "--steps", "20", "--interval=0.5"]


def test_given_params_override_defaults_individually() -> None:
    argv = render_argv(template(), {"steps": "3"}, BUILTINS)
    assert argv[argv.index("--steps") + 1] == "3"
    assert argv[-1] == "--interval=0.5"


@pytest.mark.parametrize("hostile", [
    "a b c",
    "x; rm -rf /",
    "$(touch /tmp/pwned)",
    "`id`",
    "a && b || c | d > /etc/passwd",
    "'quoted' \"double\"",
    "line1\nline2",
    "--steps 999",
    "*",
])
def test_hostile_value_stays_one_argv_item(hostile: str) -> None:
    tpl = template()
    argv = render_argv(tpl, {"steps": hostile}, {**BUILTINS, "task": hostile})
    assert len(argv) == len(tpl.argv)
    assert argv[4] == hostile  # {task}
    assert argv[6] == hostile  # {steps}
    assert argv.count(hostile) == 2


def test_value_inside_a_larger_item_stays_in_that_item() -> None:
    argv = render_argv(template(), {"interval": "1; echo hi"}, BUILTINS)
    assert argv[-1] == "--interval=1; echo hi"
    assert len(argv) == 8


def test_placeholders_in_values_are_not_expanded() -> None:
    """Substitution is one pass: a value naming a placeholder stays literal."""
    argv = render_argv(template(), {"steps": "{task}{python}"},
                       {**BUILTINS, "task": "{agent_id}"})
    assert argv[4] == "{agent_id}"
    assert argv[6] == "{task}{python}"


def test_unknown_parameter_refused_and_named() -> None:
    with pytest.raises(InvalidArgument) as exc:
        render_argv(template(), {"steps": "1", "evil_flag": "x", "another": "y"}, BUILTINS)
    msg = exc.value.message
    assert "'demo'" in msg
    assert "another, evil_flag" in msg
    assert "declared: interval, steps" in msg


def test_unknown_parameter_refused_when_template_declares_none() -> None:
    tpl = template(argv=("{python}", "{task}"), params={})
    with pytest.raises(InvalidArgument, match=r"no parameter steps \(declared: none\)"):
        render_argv(tpl, {"steps": "1"}, BUILTINS)


def test_builtin_cannot_be_passed_as_parameter() -> None:
    """A spawn may not override {python} or {workdir} through params."""
    with pytest.raises(InvalidArgument, match="python"):
        render_argv(template(), {"python": "/bin/sh"}, BUILTINS)


def test_nul_in_parameter_refused() -> None:
    with pytest.raises(InvalidArgument) as exc:
        render_argv(template(), {"steps": "1\0 2"}, BUILTINS)
    assert "parameter steps" in exc.value.message
    assert "NUL" in exc.value.message


def test_parameter_length_limit() -> None:
    assert render_argv(template(), {"steps": "9" * MAX_PARAM_CHARS}, BUILTINS)[6] == (
        "9" * MAX_PARAM_CHARS)
    with pytest.raises(InvalidArgument, match=f"limit is {MAX_PARAM_CHARS}"):
        render_argv(template(), {"steps": "9" * (MAX_PARAM_CHARS + 1)}, BUILTINS)


def test_check_text() -> None:
    assert check_text("task", "fine", 10) == "fine"
    with pytest.raises(InvalidArgument, match="task contains a NUL"):
        check_text("task", "a\0", 10)
    with pytest.raises(InvalidArgument, match="task is 11 characters; the limit is 10"):
        check_text("task", "x" * 11, 10)


def test_render_does_not_mutate_template() -> None:
    tpl = template()
    render_argv(tpl, {"steps": "5"}, BUILTINS)
    assert tpl.params == {"steps": "20", "interval": "0.5"}
