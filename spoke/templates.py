"""Turning a template and a spawn request into argv: one item per argument, no shell."""

from __future__ import annotations

from collections.abc import Mapping

from shared.config import PLACEHOLDER_RE, TemplateConfig
from shared.errors import InvalidArgument

MAX_TASK_CHARS = 8192
MAX_PARAM_CHARS = 4096


def check_text(what: str, value: str, limit: int) -> str:
    if "\0" in value:
        raise InvalidArgument(f"{what} contains a NUL character; remove it")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters; the limit is {limit}")
    return value


def render_argv(
    template: TemplateConfig, params: Mapping[str, str], builtins: Mapping[str, str]
) -> list[str]:
    """Fill placeholders in each argv item; values never become more than one item."""
    unknown = sorted(set(params) - set(template.params))
    if unknown:
        declared = ", ".join(sorted(template.params)) or "none"
        raise InvalidArgument(
            f"template '{template.name}' has no parameter {', '.join(unknown)} "
            f"(declared: {declared})"
        )
    values = {**template.params, **params, **builtins}
    for key, value in params.items():
        check_text(f"parameter {key}", value, MAX_PARAM_CHARS)
    return [PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], item) for item in template.argv]


def describe_templates(templates: Mapping[str, TemplateConfig]) -> str:
    return ", ".join(sorted(templates)) or "none"
