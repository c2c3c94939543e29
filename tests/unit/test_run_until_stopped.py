"""shared.daemon.run_until_stopped: what a daemon does with the tasks left at exit."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from shared import daemon


def test_tasks_left_at_exit_are_cancelled_and_awaited() -> None:
    ended: list[str] = []

    async def background() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            ended.append("background")

    async def main() -> None:
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)

    daemon.run_until_stopped(main())
    assert ended == ["background"]


def test_a_task_that_never_ends_is_abandoned_after_the_grace(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """What asyncio.run would wait on forever (seen: a connection close whose worker
    thread had stopped) holds the exit for STOP_GRACE_SECONDS, then is logged and left."""
    monkeypatch.setattr(daemon, "STOP_GRACE_SECONDS", 0.3)
    never = asyncio.Event()

    async def stuck() -> None:
        while True:
            try:
                await never.wait()
            except asyncio.CancelledError:
                continue  # ignores cancellation, as a wait on a dead thread would

    async def main() -> None:
        asyncio.get_running_loop().create_task(stuck(), name="stuck-close")
        await asyncio.sleep(0)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fleetwire"):
        daemon.run_until_stopped(main())
    assert time.monotonic() - started < 5
    assert any("abandoned at exit: task stuck-close" in r.getMessage()
               for r in caplog.records)
