"""What a spoke sends of its outbox, and when: the newest entry of each agent, a burst
of changes in one report."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.audit import AuditTrail
from shared.config import default_config_text, load_config
from shared.db import models
from shared.envelope import Keyring
from shared.identity import generate_key_file, load_identity
from spoke.reporter import StatusReporter, newest_per_agent
from tests.integration.helpers import eventually


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


class Paced(StatusReporter):
    """A reporter whose sends are recorded, and whose linger the test holds open."""

    def __init__(self, home: Path, trail: AuditTrail, full_batches: int = 0) -> None:
        (home / "config.toml").write_text(default_config_text("spoke"))
        cfg = load_config(home, {})
        generate_key_file(home / "key")
        super().__init__(cfg, load_identity("spoke", home / "key"), cast(Keyring, None),
                         cast(async_sessionmaker[AsyncSession], None), trail, None)
        self.lingering = asyncio.Event()
        self.release = asyncio.Event()
        # What had been queued (changes counted by the test) at each drain.
        self.drains: list[int] = []
        self.queued = 0
        self._full_batches = full_batches

    async def _gather(self) -> None:
        self.lingering.set()
        await self.release.wait()
        self.lingering.clear()
        self.release.clear()

    async def drain_once(self) -> bool:
        self.drains.append(self.queued)
        if self._full_batches:
            self._full_batches -= 1
            return True
        return False


async def wait_for(check: Callable[[], bool]) -> None:
    await eventually(check, timeout=5, what="the reporter")


async def test_changes_queued_while_the_reporter_lingers_go_in_one_report(
        tmp_path: Path) -> None:
    trail = AuditTrail(cast(async_sessionmaker[AsyncSession], None))
    reporter = Paced(tmp_path, trail)
    running = asyncio.create_task(reporter._drain_forever())
    try:
        await wait_for(lambda: reporter.drains == [0])  # the drain at start
        for _ in range(5):
            reporter.queued += 1
            trail.changed()
            await wait_for(reporter.lingering.is_set)
            assert reporter.drains == [0]  # held: nothing sent yet
        reporter.release.set()
        await wait_for(lambda: len(reporter.drains) == 2)
        assert reporter.drains == [0, 5]  # one send for the five changes
        # Nothing more is pending: the reporter waits for the next change.
        await wait_for(lambda: not reporter.release.is_set())
        assert not trail.pending.is_set() and len(reporter.drains) == 2
        reporter.queued += 1
        trail.changed()
        await wait_for(reporter.lingering.is_set)
        reporter.release.set()
        await wait_for(lambda: reporter.drains == [0, 5, 6])
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_full_batch_is_followed_at_once_by_the_next(tmp_path: Path) -> None:
    trail = AuditTrail(cast(async_sessionmaker[AsyncSession], None))
    reporter = Paced(tmp_path, trail, full_batches=2)
    running = asyncio.create_task(reporter._drain_forever())
    try:
        # Two full batches, then the rest: three sends with no change and no linger.
        await wait_for(lambda: len(reporter.drains) == 3)
        assert not reporter.lingering.is_set()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
