"""Daemon log lines: JSON with the agreed fields (or text), secrets masked even where a
log call passes them by mistake."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from shared.log_format import JsonFormatter, RedactSecrets, TextFormatter, redact

BEARER = "fwt_" + "Ab9_-" * 8
JOIN = "fwj1.c2VjcmV0LXNlY3JldA." + "ab12" * 16
PEM = ("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIFakeFakeFakeFakeFakeFakeFake\n"
       "-----END PRIVATE KEY-----")
TASK = "the secret task text"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter("hub-1"))
    logger = logging.getLogger("fleetwire.test_log_format")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out, handler
    logger.removeHandler(handler)


def test_json_lines_have_the_fields_and_the_extras(
        logged: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, _ = logged
    logger.info("spoke %s joined", "spoke-a", extra={"peer": "spoke-a", "tenant": "acme"})
    line = json.loads(out.getvalue())
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert (line["level"], line["instance"], line["logger"], line["event"]) == (
        "info", "hub-1", "fleetwire.test_log_format", "spoke spoke-a joined")
    assert (line["peer"], line["tenant"]) == ("spoke-a", "acme")
    assert "workspace" not in line


def test_secrets_are_masked_in_messages_extras_and_tracebacks(
        logged: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, _ = logged
    logger.warning("token %s and join token %s", BEARER, JOIN, extra={"error": BEARER})
    # (The traceback shows the raising source line, so the secret is not spelled there.)
    problem = ValueError(f"key material {PEM}\n[parameters: ('{TASK}',)]")
    try:
        raise problem
    except ValueError:
        logger.exception("failed")
    text = out.getvalue()
    for secret in (BEARER, JOIN, "MC4CAQAwBQYDK2VwBCIE", TASK):
        assert secret not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["event"] == "token fwt_[redacted] and join token fwj1.[redacted]"
    assert first["error"] == "fwt_[redacted]"
    assert "[redacted private key]" in second["exception"]
    assert "[parameters: redacted]" in second["exception"]


def test_text_lines_are_for_people(
        logged: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, handler = logged
    handler.setFormatter(TextFormatter("spoke-1"))
    logger.info("re-adopted agent %s", "a1", extra={"agent_id": "a1"})
    line = out.getvalue().strip()
    assert line.endswith(" INFO spoke-1 fleetwire.test_log_format: re-adopted agent a1 "
                         "agent_id=a1")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "agent 0123abcd killed by alice via hub-1: fwt is not a token, nor fwj1 alone"
    assert redact(text) == text
