"""MessageMemory over a real migrated database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update

from shared.audit import AuditEntry, AuditTrail, add_audit
from shared.db import models
from shared.db.engine import make_sessions
from shared.envelope import (
    OpenedEnvelope,
    PeerKey,
    now_ms,
    open_envelope,
    seal_envelope,
)
from shared.errors import Unauthenticated, Unavailable
from shared.identity import Identity
from shared.pb.v1 import wire_pb2
from shared.replay import MessageMemory

SPOKE = "spoke-1"


class MemoryKeyring:
    def __init__(self, *identities: Identity) -> None:
        self.keys = {
            i.key_id: PeerKey(peer_name=i.name, peer_active=True, key_id=i.key_id,
                              key_active=True, public_key=i.public_key)
            for i in identities
        }

    async def find_key(self, key_id: str) -> PeerKey | None:
        return self.keys.get(key_id)


@pytest.fixture
def memory(sessions) -> MessageMemory:
    return MessageMemory(sessions)


@pytest.fixture
def hub() -> Identity:
    return Identity(name="hub-1", private_key=Ed25519PrivateKey.generate())


@pytest.fixture
def keyring(hub: Identity) -> MemoryKeyring:
    return MemoryKeyring(hub)


def command(tenant: str = "acme") -> wire_pb2.Command:
    return wire_pb2.Command(
        tenant=tenant, workspace="ws",
        principal=wire_pb2.Principal(name="alice", role=wire_pb2.ROLE_OPERATOR),
        list=wire_pb2.ListAgents())


async def sealed_and_opened(hub: Identity, keyring: MemoryKeyring, *, message_id: str,
                            tenant: str = "acme") -> OpenedEnvelope:
    signed = seal_envelope(hub, recipient=SPOKE, command=command(tenant),
                           message_id=message_id)
    return await open_envelope(signed, keyring=keyring, me=SPOKE)


class CountingHandler:
    """handle() for once(): counts calls, optionally waits for a gate or raises."""

    def __init__(self, answer: bytes = b"answer", *, gate: asyncio.Event | None = None,
                 fail: BaseException | None = None) -> None:
        self.answer = answer
        self.gate = gate
        self.fail = fail
        self.calls = 0
        self.entered = asyncio.Event()

    async def __call__(self) -> bytes:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.answer


async def row_count(sessions) -> int:
    async with sessions() as s:
        return (await s.execute(select(func.count()).select_from(models.SeenMessage))).scalar_one()


async def test_first_call_runs_handler_and_returns_its_answer(memory, sessions, hub,
                                                              keyring) -> None:
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    handler = CountingHandler(b"signed-response-1")

    assert await memory.once(opened, handler) == b"signed-response-1"
    assert handler.calls == 1

    async with sessions() as s:
        row = await s.get(models.SeenMessage, ("hub-1", "m1"))
    assert row is not None
    assert row.response == b"signed-response-1"
    assert row.envelope_sha256 == hashlib.sha256(opened.raw).hexdigest()
    assert abs(row.received_at_ms - now_ms()) < 60_000


async def test_retry_with_same_bytes_gets_stored_answer(memory, hub, keyring) -> None:
    signed = seal_envelope(hub, recipient=SPOKE, command=command(), message_id="m1")
    first = await open_envelope(signed, keyring=keyring, me=SPOKE)
    # The retry is the very same signed bytes, opened again (as a new delivery would be).
    again = await open_envelope(wire_pb2.SignedEnvelope.FromString(
        signed.SerializeToString()), keyring=keyring, me=SPOKE)
    handler = CountingHandler(b"first-answer")

    assert await memory.once(first, handler) == b"first-answer"
    second_handler = CountingHandler(b"must-not-be-used")
    assert await memory.once(again, second_handler) == b"first-answer"
    assert await memory.once(again, second_handler) == b"first-answer"
    assert handler.calls == 1
    assert second_handler.calls == 0


async def test_same_id_with_other_bytes_is_replay(memory, hub, keyring) -> None:
    original = await sealed_and_opened(hub, keyring, message_id="m1", tenant="acme")
    forged = await sealed_and_opened(hub, keyring, message_id="m1", tenant="other")
    assert original.raw != forged.raw
    await memory.once(original, CountingHandler(b"a"))

    handler = CountingHandler(b"b")
    with pytest.raises(Unauthenticated, match="replay"):
        await memory.once(forged, handler)
    assert handler.calls == 0
    # The original is still answered from memory.
    assert await memory.once(original, CountingHandler(b"c")) == b"a"


async def test_message_ids_are_per_sender(memory, hub) -> None:
    other = Identity(name="hub-2", private_key=Ed25519PrivateKey.generate())
    keyring = MemoryKeyring(hub, other)
    a = await sealed_and_opened(hub, keyring, message_id="same")
    b = await sealed_and_opened(other, keyring, message_id="same")
    ha, hb = CountingHandler(b"from-1"), CountingHandler(b"from-2")
    assert await memory.once(a, ha) == b"from-1"
    assert await memory.once(b, hb) == b"from-2"
    assert (ha.calls, hb.calls) == (1, 1)


async def test_concurrent_duplicates_run_handler_once(memory, sessions, hub,
                                                      keyring) -> None:
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    gate = asyncio.Event()
    handler = CountingHandler(b"once-only", gate=gate)

    first = asyncio.create_task(memory.once(opened, handler))
    second = asyncio.create_task(memory.once(opened, handler))
    # Hold the handler open until both deliveries are in: the second must wait.
    await handler.entered.wait()
    await asyncio.sleep(0)
    assert not second.done()
    gate.set()

    assert await asyncio.gather(first, second) == [b"once-only", b"once-only"]
    assert handler.calls == 1
    assert await row_count(sessions) == 1
    assert memory._inflight == {}


async def test_concurrent_duplicates_gather(memory, hub, keyring) -> None:
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    handler = CountingHandler(b"x")

    async def slow() -> bytes:
        for _ in range(20):
            await asyncio.sleep(0)
        return await handler()

    results = await asyncio.gather(*(memory.once(opened, slow) for _ in range(5)))
    assert results == [b"x"] * 5
    assert handler.calls == 1


async def test_failed_handler_frees_the_id(memory, sessions, hub, keyring) -> None:
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    failing = CountingHandler(fail=RuntimeError("spoke busy"))
    with pytest.raises(RuntimeError, match="spoke busy"):
        await memory.once(opened, failing)
    assert failing.calls == 1
    assert await row_count(sessions) == 0

    retry = CountingHandler(b"second-time-lucky")
    assert await memory.once(opened, retry) == b"second-time-lucky"
    assert retry.calls == 1


async def test_cancelled_handler_frees_the_id(memory, sessions, hub, keyring) -> None:
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    gate = asyncio.Event()
    stuck = CountingHandler(gate=gate)
    task = asyncio.create_task(memory.once(opened, stuck))
    await stuck.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await row_count(sessions) == 0
    assert await memory.once(opened, CountingHandler(b"ok")) == b"ok"


async def test_unanswered_row_left_by_a_crash_is_handled_again(memory, sessions, hub,
                                                               keyring) -> None:
    """A row without an answer that nobody in this process holds was left by a crash:
    the retry is handled (handlers are idempotent per message) and its answer kept."""
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    await memory.once(opened, CountingHandler(b"a"))
    async with sessions() as s, s.begin():
        await s.execute(update(models.SeenMessage).values(response=None))
    handler = CountingHandler(b"b")
    assert await memory.once(opened, handler) == b"b"
    assert handler.calls == 1
    again = CountingHandler(b"c")
    assert await memory.once(opened, again) == b"b" and again.calls == 0


async def test_forget_older_than_goes_a_chunk_at_a_time(memory, sessions, hub,
                                                       keyring) -> None:
    ids = [f"old-{n}" for n in range(5)] + ["new-1"]
    for mid in ids:
        await memory.once(await sealed_and_opened(hub, keyring, message_id=mid),
                          CountingHandler(mid.encode()))
    async with sessions() as s, s.begin():
        await s.execute(update(models.SeenMessage).values(received_at_ms=1_000))
        await s.execute(update(models.SeenMessage)
                        .where(models.SeenMessage.message_id == "new-1")
                        .values(received_at_ms=5_000))
    # 2 + 2 + 1: the last chunk is short, so there is nothing more to drop.
    assert await memory.forget_older_than(5_000, chunk=2) == 5
    async with sessions() as s:
        left = (await s.execute(select(models.SeenMessage.message_id))).scalars().all()
    assert left == ["new-1"]


async def test_forget_older_than(memory, sessions, hub, keyring) -> None:
    for mid in ("old-1", "old-2", "new-1"):
        await memory.once(await sealed_and_opened(hub, keyring, message_id=mid),
                          CountingHandler(mid.encode()))
    async with sessions() as s, s.begin():
        await s.execute(update(models.SeenMessage)
                        .where(models.SeenMessage.message_id.startswith("old-"))
                        .values(received_at_ms=1_000))
        await s.execute(update(models.SeenMessage)
                        .where(models.SeenMessage.message_id == "new-1")
                        .values(received_at_ms=5_000))

    assert await memory.forget_older_than(5_000) == 2
    async with sessions() as s:
        left = (await s.execute(select(models.SeenMessage.message_id))).scalars().all()
    assert left == ["new-1"]
    assert await memory.forget_older_than(5_000) == 0

    # A forgotten id is handled afresh.
    again = CountingHandler(b"fresh")
    assert await memory.once(await sealed_and_opened(hub, keyring, message_id="old-1"),
                             again) == b"fresh"
    assert again.calls == 1



# ---------------------------------------------------------------- processes sharing a database


async def test_a_duplicate_in_another_process_waits_for_the_first(backend, engine, hub,
                                                                  keyring) -> None:
    """Two MessageMemory owners on one database stand for two hub processes. While the
    first handles a message, the second is refused with UNAVAILABLE on PostgreSQL (the
    sender retries) and never runs it; once answered, it gets the stored answer. SQLite
    belongs to one daemon: there the other owner's claim counts as abandoned."""
    first, second = MessageMemory(make_sessions(engine)), MessageMemory(make_sessions(engine))
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    gate = asyncio.Event()
    slow = CountingHandler(b"first", gate=gate)
    task = asyncio.create_task(first.once(opened, slow))
    await slow.entered.wait()
    other = CountingHandler(b"second")
    if backend == "postgresql":
        with pytest.raises(Unavailable, match="another process"):
            await second.once(opened, other)
        assert other.calls == 0
        gate.set()
        assert await task == b"first"
        assert await second.once(opened, other) == b"first"
        assert other.calls == 0
    else:
        assert await second.once(opened, other) == b"second"
        gate.set()
        await task


async def test_a_claim_abandoned_by_another_process_is_taken_over(backend, engine, sessions,
                                                                  hub, keyring) -> None:
    """A claim another process left unanswered for longer than takeover_after_ms (it
    stopped mid-way) is handled here, once; a fresh one is not."""
    opened = await sealed_and_opened(hub, keyring, message_id="m1")
    # What a process that stopped mid-way leaves: its claim, unanswered.
    async with sessions() as s, s.begin():
        s.add(models.SeenMessage(sender=opened.envelope.sender, message_id="m1",
                                 envelope_sha256=hashlib.sha256(opened.raw).hexdigest(),
                                 response=None, received_at_ms=now_ms(),
                                 claimed_by="a-stopped-process"))
    patient = MessageMemory(make_sessions(engine), takeover_after_ms=60_000)
    if backend == "postgresql":
        with pytest.raises(Unavailable):
            await patient.once(opened, CountingHandler(b"too-early"))
    eager = MessageMemory(make_sessions(engine), takeover_after_ms=0)
    handler = CountingHandler(b"taken-over")
    await asyncio.sleep(0.002)  # the claim must be older than 0 ms
    assert await eager.once(opened, handler) == b"taken-over"
    assert handler.calls == 1
    assert await patient.once(opened, CountingHandler(b"later")) == b"taken-over"


async def test_a_query_is_recorded_with_its_answer_in_one_write(memory, sessions, hub,
                                                                keyring) -> None:
    signed = seal_envelope(hub, recipient=SPOKE, command=command(), message_id="q1")
    first = await open_envelope(signed, keyring=keyring, me=SPOKE)
    again = await open_envelope(wire_pb2.SignedEnvelope.FromString(
        signed.SerializeToString()), keyring=keyring, me=SPOKE)

    assert await memory.once(first, CountingHandler(b"first"), reads_only=True) == b"first"
    async with sessions() as s:
        row = await s.get(models.SeenMessage, ("hub-1", "q1"))
    assert row is not None and row.response == b"first" and row.claimed_by is None
    assert row.envelope_sha256 == hashlib.sha256(first.raw).hexdigest()
    # A retry of a query runs it again (it changes nothing) but gets the first answer.
    retry = CountingHandler(b"second")
    assert await memory.once(again, retry, reads_only=True) == b"first"
    assert retry.calls == 1
    assert await row_count(sessions) == 1


async def test_a_query_under_a_used_id_with_other_bytes_is_refused(memory, sessions, hub,
                                                                   keyring) -> None:
    original = await sealed_and_opened(hub, keyring, message_id="q1", tenant="acme")
    forged = await sealed_and_opened(hub, keyring, message_id="q1", tenant="other")
    await memory.once(original, CountingHandler(b"a"), reads_only=True)
    with pytest.raises(Unauthenticated, match="replay"):
        await memory.once(forged, CountingHandler(b"b"), reads_only=True)
    # Nor does a query's id let a command through with other bytes, or the reverse.
    with pytest.raises(Unauthenticated, match="replay"):
        await memory.once(forged, CountingHandler(b"b"))
    await memory.once(forged_other := await sealed_and_opened(
        hub, keyring, message_id="c1", tenant="other"), CountingHandler(b"c"))
    assert forged_other.raw != original.raw
    with pytest.raises(Unauthenticated, match="replay"):
        await memory.once(await sealed_and_opened(hub, keyring, message_id="c1"),
                          CountingHandler(b"d"), reads_only=True)
    assert await row_count(sessions) == 2


async def test_a_failed_query_records_nothing(memory, sessions, hub, keyring) -> None:
    opened = await sealed_and_opened(hub, keyring, message_id="q1")
    with pytest.raises(RuntimeError):
        await memory.once(opened, CountingHandler(fail=RuntimeError("boom")),
                          reads_only=True)
    assert await row_count(sessions) == 0
    assert await memory.once(opened, CountingHandler(b"ok"), reads_only=True) == b"ok"


# ---------------------------------------------------------------- once_within: one transaction


async def test_once_within_commits_the_change_with_the_id_and_answer(sessions, hub,
                                                                     keyring) -> None:
    """The handler's own change, the id and the answer land in one transaction: a retry
    gets the stored answer and the change is made once."""
    trail = AuditTrail(sessions)
    memory = MessageMemory(sessions, trail.write_lock)
    signed = seal_envelope(hub, recipient=SPOKE, command=command(), message_id="r1")
    first = await open_envelope(signed, keyring=keyring, me=SPOKE)
    again = await open_envelope(wire_pb2.SignedEnvelope.FromString(
        signed.SerializeToString()), keyring=keyring, me=SPOKE)
    calls = []

    def record(tx) -> bytes:
        calls.append(1)
        add_audit(tx, AuditEntry(action="test.change", outcome="allowed"))
        return b"acked"

    assert await memory.once_within(first, record, trail.apply) == b"acked"
    assert await memory.once_within(again, record, trail.apply) == b"acked"
    assert calls == [1]
    async with sessions() as s:
        row = await s.get(models.SeenMessage, ("hub-1", "r1"))
        changes = (await s.execute(select(func.count()).select_from(models.AuditRecord)
                                   .where(models.AuditRecord.action == "test.change"))
                   ).scalar_one()
    assert row is not None and row.response == b"acked" and row.claimed_by is None
    assert changes == 1

    forged = await sealed_and_opened(hub, keyring, message_id="r1", tenant="other")
    with pytest.raises(Unauthenticated, match="replay"):
        await memory.once_within(forged, record, trail.apply)
    assert calls == [1]


async def test_once_within_a_failing_handler_leaves_neither_change_nor_id(sessions, hub,
                                                                          keyring) -> None:
    trail = AuditTrail(sessions)
    memory = MessageMemory(sessions, trail.write_lock)
    opened = await sealed_and_opened(hub, keyring, message_id="r2")
    published = []

    def fail_after_change(tx) -> bytes:
        add_audit(tx, AuditEntry(action="test.change", outcome="allowed"))
        tx.after_commit(lambda: published.append("told"))
        raise RuntimeError("registry broke")

    with pytest.raises(RuntimeError, match="registry broke"):
        await memory.once_within(opened, fail_after_change, trail.apply)
    assert await row_count(sessions) == 0
    async with sessions() as s:
        assert (await s.execute(select(func.count()).select_from(models.AuditRecord))
                ).scalar_one() == 0
    # Nothing committed, so nobody was told; the id is free for the retry.
    assert published == []

    def succeed(tx) -> bytes:
        tx.after_commit(lambda: published.append("told"))
        return b"second-time"

    assert await memory.once_within(opened, succeed, trail.apply) == b"second-time"
    assert published == ["told"]
