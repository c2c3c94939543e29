"""In-process fan-out of agent changes to `agent watch` streams, filtered by tenant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shared.pb.v1 import wire_pb2

# A watcher that falls this far behind is dropped rather than slowing the hub down.
QUEUE_LIMIT = 1000


@dataclass(eq=False)
class _Watcher:
    tenant: str
    workspace: str
    queue: asyncio.Queue[wire_pb2.Agent | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))


class AgentEvents:
    def __init__(self) -> None:
        self._watchers: set[_Watcher] = set()

    def publish(self, agent: wire_pb2.Agent) -> None:
        for w in list(self._watchers):
            if w.tenant != agent.tenant or (w.workspace and w.workspace != agent.workspace):
                continue
            try:
                w.queue.put_nowait(agent)
            except asyncio.QueueFull:
                self._watchers.discard(w)
                with contextlib.suppress(asyncio.QueueFull):
                    w.queue.get_nowait()
                    w.queue.put_nowait(None)  # tells the stream it was dropped

    async def watch(self, tenant: str, workspace: str) -> AsyncIterator[wire_pb2.Agent]:
        """Changes of one tenant (optionally one workspace), as they are applied."""
        watcher = _Watcher(tenant, workspace)
        self._watchers.add(watcher)
        try:
            while (agent := await watcher.queue.get()) is not None:
                yield agent
        finally:
            self._watchers.discard(watcher)
