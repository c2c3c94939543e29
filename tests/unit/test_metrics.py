"""Metrics: each daemon has its own registry, outcomes come from refusals, and gauges are
read on the event loop while the scrape thread waits."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.errors import EnvelopeRejected, InvalidArgument, NotFound
from shared.metrics import AGENT_STATES, Metrics, Reading, by_label, single


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    return samples(await asyncio.to_thread(get))


async def test_counts_outcomes_and_serves_gauges_read_on_the_loop() -> None:
    metrics = Metrics()
    with metrics.command("spawn"):
        pass
    with metrics.command("get") as observed:
        observed.refused(NotFound("agent 'x' not found"))
    with pytest.raises(InvalidArgument), metrics.operator_request("SpawnAgent"):
        raise InvalidArgument("bad")
    metrics.envelope_rejected(EnvelopeRejected("bad_signature", "no").rule)
    metrics.envelope_rejected("anything else")  # never a new label value
    reads = 0

    async def read() -> list[Reading]:
        nonlocal reads
        reads += 1
        return [by_label("fleetwire_agents", "agents", "state", AGENT_STATES, {"RUNNING": 2}),
                single("fleetwire_outbox_depth", "outbox", 3)]

    metrics.read_gauges(read)
    address = metrics.serve("127.0.0.1:0")
    try:
        got = await scrape(address)
    finally:
        await metrics.close()
    assert reads == 1
    assert got[("fleetwire_commands_total", frozenset({("kind", "spawn"), ("outcome", "ok")}))] == 1
    assert got[("fleetwire_commands_total",
                frozenset({("kind", "get"), ("outcome", "not_found")}))] == 1
    assert got[("fleetwire_operator_requests_total",
                frozenset({("method", "SpawnAgent"), ("outcome", "invalid_argument")}))] == 1
    assert got[("fleetwire_command_duration_seconds_count", frozenset({("kind", "get")}))] == 1
    assert got[("fleetwire_envelope_rejections_total",
                frozenset({("reason", "bad_signature")}))] == 1
    assert got[("fleetwire_envelope_rejections_total", frozenset({("reason", "other")}))] == 1
    assert got[("fleetwire_envelope_rejections_total", frozenset({("reason", "replay")}))] == 0
    assert got[("fleetwire_agents", frozenset({("state", "running")}))] == 2
    assert got[("fleetwire_agents", frozenset({("state", "lost")}))] == 0
    assert got[("fleetwire_outbox_depth", frozenset())] == 3


async def test_two_daemons_in_one_process_do_not_share_metrics() -> None:
    first, second = Metrics(), Metrics()
    with first.command("kill"):
        pass
    at_first, at_second = first.serve("127.0.0.1:0"), second.serve("127.0.0.1:0")
    try:
        one, two = await scrape(at_first), await scrape(at_second)
    finally:
        await first.close()
        await second.close()
    key = ("fleetwire_commands_total", frozenset({("kind", "kill"), ("outcome", "ok")}))
    assert one[key] == 1 and key not in two


async def test_a_failing_read_serves_the_last_reading(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.setattr("shared.metrics.READING_MAX_AGE_SECONDS", 0.0)  # read every scrape
    metrics = Metrics()
    calls = 0

    async def read() -> list[Reading]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("database gone")
        return [single("fleetwire_outbox_depth", "outbox", 5)]

    metrics.read_gauges(read)
    address = metrics.serve("127.0.0.1:0")
    try:
        assert (await scrape(address))[("fleetwire_outbox_depth", frozenset())] == 5
        assert (await scrape(address))[("fleetwire_outbox_depth", frozenset())] == 5
    finally:
        await metrics.close()
    assert calls == 2


def test_a_bad_metrics_address_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        Metrics().serve("localhost")


def test_each_command_counts_once_by_how_it_ended() -> None:
    metrics = Metrics()
    for _ in range(3):
        with metrics.command("get"):
            pass
    with pytest.raises(asyncio.CancelledError), metrics.command("get"):
        raise asyncio.CancelledError
    with pytest.raises(KeyError), metrics.command("get"):
        raise KeyError("x")
    with pytest.raises(NotFound), metrics.command("get") as observed:
        # A refusal recorded before an exception stands.
        observed.refused(EnvelopeRejected("bad_signature", "no"))
        raise NotFound("gone")
    registry = metrics.registry
    counted = {outcome: registry.get_sample_value(
        "fleetwire_commands_total", {"kind": "get", "outcome": outcome})
        for outcome in ("ok", "cancelled", "internal", "unauthenticated", "not_found")}
    assert counted == {"ok": 3, "cancelled": 1, "internal": 1, "unauthenticated": 1,
                       "not_found": None}
    assert registry.get_sample_value("fleetwire_command_duration_seconds_count",
                                     {"kind": "get"}) == 6
