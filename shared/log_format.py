"""How a daemon writes its log on stderr: one JSON object a line (or text for a person),
with bearer tokens, join tokens and private keys masked as a safety net."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

FORMATS = ("json", "text")
# Structured fields a log call may pass with extra={...}; they become JSON fields.
EXTRA_FIELDS = ("tenant", "workspace", "message_id", "peer", "agent_id", "error")

_SECRETS = (
    (re.compile(r"fwt_[A-Za-z0-9_-]+"), "fwt_[redacted]"),
    (re.compile(r"fwj1\.[A-Za-z0-9_.:-]+"), "fwj1.[redacted]"),
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE "
                r"KEY-----|\Z)", re.DOTALL), "[redacted private key]"),
    # SQLAlchemy's errors carry the failed statement's values (a task's text, say).
    (re.compile(r"^\[parameters: .*$", re.MULTILINE), "[parameters: redacted]"),
)


def redact(text: str) -> str:
    """text with anything that looks like a token or a private key masked."""
    for pattern, mask in _SECRETS:
        text = pattern.sub(mask, text)
    return text


class RedactSecrets(logging.Filter):
    """Masks secrets in the message, the exception text and the structured fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                setattr(record, name, redact(value))
        return True


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {name: record.__dict__[name] for name in EXTRA_FIELDS
            if record.__dict__.get(name) not in (None, "")}


class JsonFormatter(logging.Formatter):
    """time (ISO 8601, UTC), level, instance, logger, event, then the extra fields;
    `exception` holds a traceback."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self._instance = instance

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _time(record), "level": record.levelname.lower(),
            "instance": self._instance, "logger": record.name,
            "event": record.getMessage(), **_extras(record)}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL INSTANCE LOGGER: EVENT key=value ...`, a traceback on following lines."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self._instance = instance

    def format(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {k}={v}" for k, v in _extras(record).items())
        line = (f"{_time(record)} {record.levelname} {self._instance} {record.name}: "
                f"{record.getMessage()}{fields}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return "\n".join(filter(None, [line, record.exc_text, record.stack_info]))


class _DaemonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (and replaces when called again)."""


def setup_logging(instance: str, log_format: str = "json", verbose: bool = False) -> None:
    """Log to stderr in log_format ("json" or "text") with secrets masked; stdout is left
    to the ready line."""
    handler = _DaemonHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter(instance) if log_format == "json"
                         else TextFormatter(instance))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DaemonHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
