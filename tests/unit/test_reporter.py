"""What a spoke sends of its outbox: the newest entry of each agent."""

from __future__ import annotations

from shared.db import models
from spoke.reporter import newest_per_agent


def entry(agent_id: str, seq: int) -> models.OutboxEntry:
    return models.OutboxEntry(id=seq * 10 + len(agent_id), hub="hub", agent_id=agent_id,
                              seq=seq, payload=b"", created_at_ms=0)


def test_of_each_agents_entries_only_the_newest_is_sent() -> None:
    queued = [entry("a", 1), entry("bb", 1), entry("a", 2), entry("a", 3), entry("bb", 2)]
    sent = newest_per_agent(queued)
    assert [(e.agent_id, e.seq) for e in sent] == [("a", 3), ("bb", 2)]


def test_single_entries_are_sent_as_they_are() -> None:
    queued = [entry("a", 4), entry("bb", 1)]
    assert newest_per_agent(queued) == queued
    assert newest_per_agent([]) == []
