"""What every message is checked against, read once and kept until it changes.

A message is checked against the peer registry (its signing key, the peer's state and
pinned TLS certificate), and, on a spoke, the grants and workspaces; an operator request
on a hub against its token. Reading all of that per message was most of what a message
cost. Database triggers (migration 0006) raise one number, `security_epoch.value`, in
the transaction of every change to those tables, whoever makes it: this daemon, the CLI
in another process, another hub sharing a PostgreSQL database, a SQL shell. A daemon
reads that number once per message and keeps what it read of the tables while the
number stands; when it moved, everything kept is dropped and read again. So a
`peer revoke`, `grant revoke` or `token revoke` still acts on the next message.

Usage: a message's handler enters `view.checked()` first (one read of the number);
lookups inside it use what is kept. A lookup outside any checked() block reads the
number itself, so nothing can use what was kept without a check made for it; nor
can a long request (a bulk kill) use one check for longer than CHECK_LASTS_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, TypeVar, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import models
from shared.db.direct import direct_for

V = TypeVar("V")

# When the running request last read the epoch (monotonic seconds; set in checked()).
_checked: ContextVar[float | None] = ContextVar("security_epoch_checked", default=None)
# How long one check covers a request's lookups.
CHECK_LASTS_SECONDS = 1.0

_EPOCH = select(models.SecurityEpoch.value).where(models.SecurityEpoch.id == 1)
_MISSING = object()


class SecurityView:
    """Answers read from the security tables, kept while security_epoch stands."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *,
                 max_entries: int = 10_000) -> None:
        # Kept answers are dropped all at once past this many (unknown key ids are kept
        # too, so a flood of made-up ones must not grow it without end).
        self._max_entries = max_entries
        self._epoch: int | None = None
        self._direct = direct_for(sessions)
        self._entries: dict[Hashable, Any] = {}
        # How many times the number was read, and how many lookups were answered from
        # what was kept (what the tests look at).
        self.epoch_reads = 0
        self.hits = 0

    async def refresh(self) -> None:
        """Read the epoch; drop everything kept if it moved."""
        # One point query, on SQLite without leaving the event loop's thread
        # (shared/db/direct.py).
        row = await self._direct.first(_EPOCH)
        value = None if row is None else row[0]
        self.epoch_reads += 1
        if value is None:
            raise RuntimeError("security_epoch has no row: run `fleetwire migrate`")
        if value != self._epoch:
            self._entries.clear()
            self._epoch = int(value)

    def checked(self) -> _Checked:
        """Read the epoch once for everything looked up inside (one message): `async
        with view.checked(): ...`."""
        return _Checked(self)

    async def lookup(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> V:
        """The kept answer for key, or load() (kept if the epoch did not move while it
        ran: an answer read before a change must not outlive the change)."""
        checked_at = _checked.get()
        if checked_at is None:
            await self.refresh()
        elif time.monotonic() - checked_at > CHECK_LASTS_SECONDS:
            await self.refresh()
            _checked.set(time.monotonic())
        kept = self._entries.get(key, _MISSING)
        if kept is not _MISSING:
            self.hits += 1
            return cast(V, kept)
        epoch = self._epoch
        value = await load()
        if self._epoch == epoch:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = value
        return value


class _Checked:
    """SecurityView.checked(): a class rather than an @asynccontextmanager, whose
    generator machinery costs more than the check itself on every message."""

    __slots__ = ("_token", "_view")

    def __init__(self, view: SecurityView) -> None:
        self._view = view
        self._token: Token[float | None] | None = None

    async def __aenter__(self) -> None:
        await self._view.refresh()
        self._token = _checked.set(time.monotonic())

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._token is not None:
            _checked.reset(self._token)
